"""CUB-200-2011 as in the paper (docs/protocol.md section 5): ResNet50, 64-d, batch 128, 80 epochs.

Prepare once (the layout it reads, and the counts to expect: docs/datasets.md):
`python -m hn_jax.prepare --dataset=cub --manual_dir=/path/to/CUB_200_2011
--data_dir=/path/to/prepared`, then train with `--config.data_dir=/path/to/prepared` (or set
HN_DATA_DIR). The paper starts from ImageNet weights: add
`--config.pretrained=/path/to/resnet50-0676ba61.pth` (torchvision's file).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = "cub"
  config.mean = (0.4707, 0.4601, 0.4549)
  config.std = (0.2767, 0.2760, 0.2850)
  config.model = "resnet50"
  config.image_size = 256
  config.embedding_dim = 64
  config.batch_size = 128
  config.num_epochs = 80
  config.sampler = "filled"
  config.repeat = 1
  config.lr_drop_epochs = (40,)
  config.eval_every = 10
  config.learning_rate = 0.009  # sct; shn: 0.002
  return config
