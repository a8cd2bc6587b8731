"""A run's loss from its config's names: `build` makes it, `check` refuses what cannot work.

`build(name, ...)` is the loss `name` of the registry with `loss_params` for its
hyperparameters (the others at their defaults). Miners and cross-batch memory come with the
pair and triplet losses; until then `check` refuses a miner or a memory size in one line.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from flax import nnx

from hn_jax.losses import registry


def check(name: str, loss_params: Mapping[str, Any] | None = None, miner: str = "",
          miner_params: Mapping[str, Any] | None = None, memory_size: int = 0) -> None:
  """Raises ValueError (one line naming the valid choices) for settings `build` refuses."""
  if name not in registry.NAMES:
    raise ValueError(f"unknown loss {name!r}; use one of {', '.join(registry.NAMES)}")
  valid = registry.hyperparameters(name)
  unknown = sorted(set(loss_params or {}) - set(valid))
  if unknown:
    raise ValueError(f"loss {name!r} has no hyperparameter {', '.join(unknown)}; its "
                     f"hyperparameters: {', '.join(valid) or '(none)'}")
  missing = sorted(k for k, v in valid.items()
                   if v is inspect.Parameter.empty and k not in (loss_params or {}))
  if missing:
    raise ValueError(f"loss {name!r} needs the hyperparameter {', '.join(missing)} (give "
                     f"--config.loss_params.{missing[0]}=VALUE)")
  if miner or miner_params:
    raise ValueError(f"miner {miner!r}: loss {name!r} takes no miner (none are registered)")
  if memory_size:
    raise ValueError(f"memory_size={memory_size}: loss {name!r} has no cross-batch memory; "
                     "leave memory_size at 0")


def build(name: str, *, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
          loss_params: Mapping[str, Any] | None = None, miner: str = "",
          miner_params: Mapping[str, Any] | None = None, memory_size: int = 0) -> nnx.Module:
  """The loss `name`, called as `loss(embeddings, labels) -> (loss, aux)`."""
  check(name, loss_params, miner, miner_params, memory_size)
  return registry.create(name, embedding_dim=embedding_dim, num_classes=num_classes, rngs=rngs,
                         **dict(loss_params or {}))
