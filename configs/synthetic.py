"""Procedural glyphs (`hn_jax.data.in_memory.synthetic_images`): learning tests and benchmarks.

200 classes of 10 images generated in memory (no prepare step), classes 0-99 train and
100-199 test. `python -m hn_jax.main --config=configs/synthetic.py --workdir=/tmp/hn_syn`;
`--config.image_size=256 --config.model=resnet50` for a throughput run at the paper's size.
"""

from hn_jax import run_config


def get_config():
  config = run_config.defaults()
  config.dataset = "synthetic"
  config.image_size = 32
  config.mean = (0.58, 0.58, 0.57)  # Of the generated images scaled to [0, 1].
  config.std = (0.26, 0.26, 0.25)
  config.model = "small"
  config.embedding_dim = 32
  config.batch_size = 64
  config.num_epochs = 20
  config.lr_drop_epochs = (15,)
  config.learning_rate = 0.3
  config.eval_every = 5
  config.eval_batch_size = 512
  return config
