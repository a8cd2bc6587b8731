"""The whole input path, host side: nothing here imports training, evaluation or the commands.

- `splits`: a split's images (in memory, or records of a prepared dataset) and labels.
- `datasets`: datasets by name, their splits and what their evaluation retrieves.
- `in_memory`: the datasets that need no download (digits, synthetic glyphs).
- `samplers`: the batch samplers' index streams and each image's augmentation draws.
- `image_cache`: decoded images kept in memory or in a checked file, and the policy that
  chooses where.
- `tf_pipeline`: the uncached tf.data path (decode, resize, crop); the only TensorFlow user.
- `input_pipeline`: this process's uint8 batches for training and evaluation, and device prefetch.
- `tfds_builders`: TFDS builders reading each benchmark's published layout.
"""
