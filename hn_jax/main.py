"""Command line: `python -m hn_jax.main --config=configs/digits.py --workdir=DIR`.

Any config value can be overridden, e.g. `--config.loss=shn --config.seed=3`.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for TensorBoard logs and checkpoints.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # TensorFlow only feeds data: keep it off the accelerators JAX uses.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  from hn_jax import train  # pylint: disable=g-import-not-at-top
  logging.info("Config:\n%s", FLAGS.config)
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.ConfigError as e:
    sys.exit(f"hn_jax: error: {e}")


if __name__ == "__main__":
  app.run(main)
