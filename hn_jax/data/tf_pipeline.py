"""The uncached image path (tf.data): decode, resize and crop records or in-memory images.

Used for splits without a decoded-image cache (`config.cache=off`, or too large for memory
and disk, as Hotels-50K's million images) and to build the caches of prepared datasets.
Records are read by index in chunks, parsed and decoded (JPEG of any kind PIL writes,
including grayscale and CMYK, or PNG; always to RGB) in parallel by a deterministic
tf.data map. Output pixels are uint8, rounded after the resize, exactly as the cache holds
them: a batch is the same whether it comes from here or from a cache, up to the rare pixel
whose resized value lies within float rounding of a half grey level.

The random crop and flip of each image come from `samplers.augment_words` (NumPy),
so that this path and the cached one make the same draws.
"""

from __future__ import annotations

from typing import Callable, Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from hn_jax.data import resize

try:  # the input pipeline never needs an accelerator; leave its memory to JAX
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow was initialized already
  pass

# Images read per call into the ArrayRecord files (one Python call per chunk).
_READ_CHUNK = 32
_RECORD_FEATURES = {"image": tf.io.FixedLenFeature([], tf.string)}


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """An encoded JPEG (grayscale, RGB or CMYK) or PNG image -> uint8 RGB (H, W, 3)."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  return tf.ensure_shape(image, (None, None, 3))


def decode_record(record: tf.Tensor) -> tf.Tensor:
  """A serialized record of a prepared split -> its image, uint8 RGB (H, W, 3)."""
  return decode_image(tf.io.parse_single_example(record, _RECORD_FEATURES)["image"])


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _resized_shape(shape: tf.Tensor, short: int) -> tf.Tensor:
  """(H, W) after resizing the shorter side to `short` (float32)."""
  hw = tf.cast(shape[:2], tf.float32)
  return tf.maximum(tf.round(hw * (short / tf.reduce_min(hw))), short)


def _resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
  new = tf.cast(_resized_shape(tf.shape(image), size), tf.int32)
  return tf.image.resize(tf.cast(image, tf.float32), new, method="bilinear", antialias=True)


def normalize(image: tf.Tensor, mean, std) -> tf.Tensor:
  """uint8 or float pixels in [0, 255] -> (x / 255 - mean) / std, float32."""
  image = tf.cast(image, tf.float32)
  return (image / 255.0 - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def crop_offset(words: tf.Tensor, limit: tf.Tensor) -> tf.Tensor:
  """floor(word / 2**32 x limit): a uniform offset in [0, limit) from a 32-bit word."""
  return tf.cast(tf.bitwise.right_shift(words * tf.cast(limit, tf.int64), 32), tf.int32)


def train_crop(image: tf.Tensor, words: tf.Tensor, image_size: int) -> tf.Tensor:
  """Resize shorter side to int(1.1 x size), crop size x size at the offsets the first two
  `words` draw: uint8 (size, size, 3). (The flip, the third word's top bit, is the step's.)

  The resize and the crop are one op: ScaleAndTranslate computes only the crop's pixels of
  the resized image (the filter of `tf.image.resize`, which is that op without
  translation), 1.35 times less CPU than resizing the whole image first.
  """
  size = image_size
  image = tf.convert_to_tensor(image)
  resized = _resized_shape(tf.shape(image), resize.train_short_side(size))
  limit = tf.cast(resized, tf.int32) - size + 1
  offset = tf.stack([crop_offset(words[0], limit[0]), crop_offset(words[1], limit[1])])
  image = tf.raw_ops.ScaleAndTranslate(
      images=image[None], size=[size, size],
      scale=resized / tf.cast(tf.shape(image)[:2], tf.float32),
      translation=-tf.cast(offset, tf.float32), kernel_type="triangle", antialias=True)[0]
  return _to_uint8(tf.ensure_shape(image, (size, size, 3)))


def eval_crop(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """Resize shorter side to size, center crop: uint8 (size, size, 3)."""
  image = _resize_shorter_side(image, image_size)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  top, left = (h - image_size) // 2, (w - image_size) // 2
  image = image[top:top + image_size, left:left + image_size]
  return _to_uint8(tf.ensure_shape(image, (image_size, image_size, 3)))


def train_resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """The train cache's form: shorter side resized to int(1.1 x size), uint8."""
  return _to_uint8(_resize_shorter_side(image, resize.train_short_side(image_size)))


def train_transform(image, words, config: ml_collections.ConfigDict) -> tf.Tensor:
  """`train_crop`, mirrored by the third word, normalized (float32): what the step sees."""
  words = np.asarray(words, np.int64)
  image = train_crop(image, tf.constant(words), config.image_size)
  if words[2] >> 31:
    image = image[:, ::-1]
  return normalize(image, config.mean, config.std)


def eval_transform(image, config: ml_collections.ConfigDict) -> tf.Tensor:
  """`eval_crop`, normalized (float32): what the embed step sees of an image."""
  return normalize(eval_crop(image, config.image_size), config.mean, config.std)


def _elements(images, rows: np.ndarray) -> tuple[tf.data.Dataset, Callable]:
  """The element of each of `rows`, in order, and the function (in the graph) that turns an
  element into its uint8 RGB image.

  In memory: the images themselves. From records: the serialized records, read in chunks,
  parsed and decoded by that function (inside the caller's parallel map).
  """
  rows = np.asarray(rows, np.int64)
  if isinstance(images, np.ndarray):
    pixels = tf.constant(images)
    ds = tf.data.Dataset.from_tensor_slices(rows).map(lambda i: tf.gather(pixels, i))
    return ds, lambda element: element
  source = images

  def read(chunk: np.ndarray) -> np.ndarray:
    return np.array(source.read(chunk), dtype=object)

  ds = tf.data.Dataset.from_tensor_slices(rows).batch(_READ_CHUNK)
  ds = ds.map(lambda chunk: tf.ensure_shape(tf.numpy_function(read, [chunk], tf.string,
                                                                stateful=False), (None,)),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.unbatch(), decode_record


def _batches(columns: tuple[tf.data.Dataset, ...], load: Callable,
             local: int) -> Iterator[dict]:
  """`load` of each element of the zipped `columns`, in parallel and in order, in batches of
  `local`, as NumPy."""
  ds = tf.data.Dataset.zip(columns)
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  yield from ds.as_numpy_iterator()


def train_batches(images, rows: np.ndarray, words: np.ndarray, labels: np.ndarray,
                  config: ml_collections.ConfigDict, local: int) -> Iterator[dict]:
  """Batches of `local` uint8 crops of the images `rows`, with their labels."""
  elements, decode = _elements(images, rows)
  size = config.image_size

  def load(element, word, label):
    return {"images": train_crop(decode(element), word, size), "labels": label}

  yield from _batches((elements, tf.data.Dataset.from_tensor_slices(words.astype(np.int64)),
                       tf.data.Dataset.from_tensor_slices(labels)), load, local)


def eval_batches(images, rows: np.ndarray, labels: np.ndarray, mask: np.ndarray,
                 config: ml_collections.ConfigDict, local: int) -> Iterator[dict]:
  """Batches of `local` uint8 center crops of the images `rows`, with labels and mask."""
  elements, decode = _elements(images, rows)
  size = config.image_size

  def load(element, label, valid):
    return {"images": eval_crop(decode(element), size), "labels": label, "mask": valid}

  yield from _batches((elements, tf.data.Dataset.from_tensor_slices(labels),
                       tf.data.Dataset.from_tensor_slices(mask)), load, local)


def decoded(images, kind: str, image_size: int, rows: np.ndarray | None = None
            ) -> Iterator[np.ndarray]:
  """Every image (or those of `rows`) of a record source in a cache's form, in order: uint8."""
  rows = np.arange(len(images)) if rows is None else np.asarray(rows)
  elements, decode = _elements(images, rows)
  if kind == "train":
    prepare = lambda e: train_resize(decode(e), image_size)
  else:
    prepare = lambda e: eval_crop(decode(e), image_size)
  ds = elements.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  yield from ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def decoded_shapes(images, rows: np.ndarray) -> np.ndarray:
  """(H, W) of the decoded images `rows` (for estimating a cache's size)."""
  elements, decode = _elements(images, rows)
  ds = elements.map(lambda e: tf.shape(decode(e))[:2], num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
  return np.array(list(ds.as_numpy_iterator()), np.int64).reshape(-1, 2)
