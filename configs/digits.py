"""The embedded default: scikit-learn's handwritten digits, trained in minutes on a CPU.

Classes 0-4 train and 5-9 test. `python -m hn_jax.main --config=configs/digits.py
--workdir=/tmp/hn_digits`.
"""

from hn_jax import run_config


def get_config():
  config = run_config.defaults()
  config.image_size = 32
  config.mean = (0.305, 0.305, 0.305)  # Of the training digits scaled to [0, 1].
  config.std = (0.378, 0.378, 0.378)
  config.model = "small"
  config.embedding_dim = 32
  config.batch_size = 64
  config.num_epochs = 20
  config.lr_drop_epochs = (15,)
  config.learning_rate = 0.05
  config.eval_every = 5
  config.eval_batch_size = 512
  return config
