"""CUB-200-2011 as in the paper (docs/protocol.md section 5): ResNet50, 64-d, batch 128, 80 epochs.

Prepare once (the layout it reads, and the counts to expect: docs/datasets.md):
`python -m hn_jax.tools.prepare --dataset=cub --manual_dir=/path/to/CUB_200_2011
--data_dir=/path/to/prepared`, then train with `--config.data_dir=/path/to/prepared` (or set
HN_DATA_DIR). Starts from torchvision's ImageNet ResNet50, as the paper (`pretrained="imagenet"`:
`resnet50-0676ba61.pth`, downloaded once, docs/weights.md; `--config.pretrained=PATH` reads a
file, `=none` starts from random).
"""

from hn_jax import run_config


def get_config():
  config = run_config.defaults()
  config.dataset = "cub"
  config.pretrained = "imagenet"  # torchvision's, downloaded once (docs/weights.md)
  config.mean = (0.4707, 0.4601, 0.4549)
  config.std = (0.2767, 0.2760, 0.2850)
  return config
