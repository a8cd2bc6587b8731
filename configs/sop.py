"""Stanford Online Products as in the paper (docs/protocol.md section 5): ResNet50, 512-d, batch 512.

Prepare once (the layout it reads, and the counts to expect: docs/datasets.md):
`python -m hn_jax.tools.prepare --dataset=sop --manual_dir=/path/to/Stanford_Online_Products
--data_dir=/path/to/prepared`, then train with `--config.data_dir=/path/to/prepared` (or set
HN_DATA_DIR). Starts from torchvision's ImageNet ResNet50, as the paper (`pretrained="imagenet"`,
docs/weights.md).
"""

from hn_jax import run_config


def get_config():
  config = run_config.defaults()
  config.dataset = "sop"
  config.pretrained = "imagenet"  # torchvision's, downloaded once (docs/weights.md)
  config.mean = (0.5807, 0.5396, 0.5044)
  config.std = (0.2901, 0.2974, 0.3095)
  config.embedding_dim = 512
  config.batch_size = 512
  config.num_epochs = 200
  config.sampler = "sample"
  config.repeat = 5
  config.lr_drop_epochs = (100, 150)
  config.learning_rate = 0.03  # sct; shn: 0.01
  config.eval_batch_size = 512
  return config
