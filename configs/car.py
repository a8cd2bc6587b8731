"""Cars196 as in the paper (docs/protocol.md section 5): ResNet50, 64-d, batch 128, 80 epochs.

Prepare once (the layout it reads, and the counts to expect: docs/datasets.md):
`python -m hn_jax.tools.prepare --dataset=cars --manual_dir=/path/to/cars196
--data_dir=/path/to/prepared` (the folder with cars_annos.mat and car_ims/, or the devkit
layout), then train with `--config.data_dir=/path/to/prepared` (or set HN_DATA_DIR).
Starts from torchvision's ImageNet ResNet50, as the paper (`pretrained="imagenet"`: downloaded
once, docs/weights.md; `--config.pretrained=PATH` reads a file, `=none` starts from random).
"""

from hn_jax import run_config


def get_config():
  config = run_config.defaults()
  config.dataset = "cars"
  config.pretrained = "imagenet"  # torchvision's, downloaded once (docs/weights.md)
  config.mean = (0.4853, 0.4965, 0.4295)
  config.std = (0.2237, 0.2193, 0.2568)
  config.learning_rate = 0.02  # sct; shn: 0.004
  return config
