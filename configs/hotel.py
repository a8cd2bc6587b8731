"""Hotels-50K as in the paper (docs/protocol.md section 5): ResNet50, 256-d, batch 512, 200 epochs.

Prepare once (the layout it reads, and the counts to expect: docs/datasets.md):
`python -m hn_jax.tools.prepare --dataset=hotels50k --manual_dir=/path/to/hotels50k
--data_dir=/path/to/prepared` (the folder with input/dataset/*.csv and images/), then train
with `--config.data_dir=/path/to/prepared` (or set HN_DATA_DIR). Logged as HOTEL: the test
images are queries against the training images, by hotel and by chain. Starts from
torchvision's ImageNet ResNet50, as the paper (`pretrained="imagenet"`, docs/weights.md).
"""

from hn_jax import run_config


def get_config():
  config = run_config.defaults()
  config.dataset = "hotels50k"
  config.pretrained = "imagenet"  # torchvision's, downloaded once (docs/weights.md)
  config.mean = (0.5838, 0.5146, 0.4470)
  config.std = (0.6298, 0.6112, 0.4445)
  config.embedding_dim = 256
  config.batch_size = 512
  config.num_epochs = 200
  config.sampler = "sample"
  config.repeat = 5
  config.lr_drop_epochs = (100, 150)
  config.eval_every = 40
  config.learning_rate = 0.1  # sct; shn: 0.01
  config.eval_batch_size = 512
  return config
