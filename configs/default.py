"""Every setting of a run with its default: `hn_jax.run_config.defaults()`, where each has its
one-line comment (ResNet50 with the paper's CUB schedule, on the embedded digits data), listed
with its default and comment in docs/settings.md.

The dataset configs beside this file start from these defaults and set only what differs.
Override any value on the command line: `--config.loss=shn --config.learning_rate=0.002`.
What the settings reproduce (losses, samplers, transforms, the paper's per-dataset values) is
in docs/protocol.md. On a resumed run only the settings in `hn_jax/run_config.py`'s
CHANGEABLE may change.
"""

import ml_collections

from hn_jax import run_config


def get_config() -> ml_collections.ConfigDict:
  return run_config.defaults()
