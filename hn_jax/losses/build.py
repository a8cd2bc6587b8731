"""A loss by name, with an optional miner and cross-batch memory (docs/losses.md).

`check(...)` validates a choice in one line before anything compiles; `build(...)` returns
the module a train step calls as `module(embeddings, labels) -> (loss, aux)`.
Only losses whose factory declares `kind` "pair" or "triplet" take a miner or memory;
a factory without `kind` (hn, shn, sct, the proxy losses) counts as "other".
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from hn_jax.losses import registry
from hn_jax.losses.geometry import Geometry, MetricLoss
from hn_jax.losses.memory import CrossBatchMemory
from hn_jax.losses.miners import MINER_NAMES, create_miner, miner_parameters
from hn_jax.losses.triplet_margin import TRIPLET_TYPES

COMPOSABLE = ("pair", "triplet")


def kind(name: str) -> str:
  """The loss's kind: "pair", "triplet" or "other"."""
  return getattr(registry.factory_of(name), "kind", "other")


def check(name: str, loss_params: Mapping[str, Any] | None = None, miner: str = "",
          miner_params: Mapping[str, Any] | None = None, memory_size: int = 0) -> None:
  """Raises ValueError (one line) if the loss, miner or memory choice is invalid."""
  if name not in registry.NAMES:
    raise ValueError(f"unknown loss {name!r}; use one of {', '.join(registry.NAMES)}")
  valid = registry.hyperparameters(name)
  unknown = sorted(set(loss_params or {}) - set(valid))
  if unknown:
    raise ValueError(f"loss {name!r} has no hyperparameter {', '.join(unknown)}; "
                     f"its hyperparameters: {', '.join(valid) or '(none)'}")
  if not isinstance(memory_size, int) or isinstance(memory_size, bool) or memory_size < 0:
    raise ValueError(f"memory_size must be an integer >= 0 (0: no cross-batch memory), "
                     f"got {memory_size!r}")
  if miner and miner not in MINER_NAMES:
    raise ValueError(f"unknown miner {miner!r}; use one of {', '.join(MINER_NAMES)} "
                     "(or none)")
  if miner_params and not miner:
    raise ValueError("miner_params given without a miner; name one of "
                     f"{', '.join(MINER_NAMES)}")
  if miner:
    valid = miner_parameters(miner)
    unknown = sorted(set(miner_params or {}) - set(valid))
    if unknown:
      raise ValueError(f"miner {miner!r} has no parameter {', '.join(unknown)}; "
                       f"its parameters: {', '.join(valid) or '(none)'}")
    kind_of_triplets = (miner_params or {}).get("type_of_triplets", "all")
    if kind_of_triplets not in TRIPLET_TYPES:
      raise ValueError(f"unknown type_of_triplets {kind_of_triplets!r}; use one of "
                       f"{', '.join(TRIPLET_TYPES)}")
  if (miner or memory_size) and kind(name) not in COMPOSABLE:
    what = "a miner" if miner else "cross-batch memory"
    composable = [n for n in registry.NAMES if kind(n) in COMPOSABLE]
    raise ValueError(f"loss {name!r} does not take {what} (it is not pair or triplet "
                     f"based); use one of {', '.join(composable)}")
  if memory_size and (loss_params or {}).get("swap"):
    raise ValueError(f"loss {name!r}: swap=True does not work with cross-batch memory "
                     "(as in PML); set swap=False or memory_size=0")
  triplets_per_anchor = (loss_params or {}).get("triplets_per_anchor", "all")
  if triplets_per_anchor != "all":
    raise ValueError(f"loss {name!r}: triplets_per_anchor={triplets_per_anchor!r} is not "
                     "supported; use 'all' and a miner to pick fewer triplets")


class Mined(nnx.Module):
  """A pair or triplet loss over the tuples its miner picks from the batch."""

  def __init__(self, loss: MetricLoss, miner: nnx.Module):
    self.loss = loss
    self.miner = miner

  def __call__(self, embeddings: jax.Array,
               labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    eye = jnp.eye(embeddings.shape[0], dtype=bool)
    geometry = Geometry.of(embeddings)
    tuples = self.miner(embeddings, labels, embeddings, labels, exclude=eye, geometry=geometry)
    loss, aux = self.loss.compute(embeddings, labels, embeddings, labels, tuples,
                                  geometry=geometry)
    aux = {**aux, "num_pos_pairs": jax.lax.stop_gradient(jnp.sum(tuples.pos)),
           "num_neg_pairs": jax.lax.stop_gradient(jnp.sum(tuples.neg))}
    return loss, aux


def build(name: str, *, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
          loss_params: Mapping[str, Any] | None = None, miner: str = "",
          miner_params: Mapping[str, Any] | None = None,
          memory_size: int = 0) -> nnx.Module:
  """The loss `name` (its hyperparameters `loss_params`), mined by `miner` (its parameters
  `miner_params`; "" for none), against a cross-batch memory of `memory_size` embeddings
  (0 for none): a module called `(embeddings, labels) -> (loss, aux)`."""
  check(name, loss_params, miner, miner_params, memory_size)
  loss = registry.create(name, embedding_dim=embedding_dim, num_classes=num_classes,
                         rngs=rngs, **dict(loss_params or {}))
  mining = create_miner(miner, **dict(miner_params or {})) if miner else None
  if memory_size:
    return CrossBatchMemory(loss, embedding_size=embedding_dim, memory_size=memory_size,
                            miner=mining)
  if mining is not None:
    return Mined(loss, mining)
  return loss
