"""In-shop Clothes Retrieval as in the paper (docs/protocol.md section 5): ResNet50, 512-d, batch 512.

Prepare once (the layout it reads, and the counts to expect: docs/datasets.md):
`python -m hn_jax.tools.prepare --dataset=inshop --manual_dir=/path/to/inshop
--data_dir=/path/to/prepared` (the folder with Eval/ and img/), then train with
`--config.data_dir=/path/to/prepared` (or set HN_DATA_DIR). Logged as ICR; queries are
retrieved from the gallery. Starts from torchvision's ImageNet ResNet50, as the paper
(`pretrained="imagenet"`, docs/weights.md).
"""

from hn_jax import run_config


def get_config():
  config = run_config.defaults()
  config.dataset = "inshop"
  config.pretrained = "imagenet"  # torchvision's, downloaded once (docs/weights.md)
  config.mean = (0.8324, 0.8109, 0.8041)
  config.std = (0.2206, 0.2378, 0.2444)
  config.embedding_dim = 512
  config.batch_size = 512
  config.num_epochs = 200
  config.sampler = "sample"
  config.repeat = 5
  config.lr_drop_epochs = (100, 150)
  config.learning_rate = 0.1  # sct; shn: 0.3
  config.eval_batch_size = 512
  return config
