"""Metric-learning losses over the global batch, by name (docs/losses.md).

`create(name, *, embedding_dim, num_classes, rngs, **hyperparameters)` returns an nnx.Module
called as `module(embeddings, labels) -> (loss, aux)`; `NAMES` lists the registered names;
`register(name, factory)` adds one. The paper's hn, shn and sct are `triplet.triplet_loss`;
pytorch-metric-learning's pair and triplet losses are in `pair` and `triplet_margin`.
`build(name, ..., miner=, memory_size=)` composes a loss with a miner (`MINER_NAMES`) and
cross-batch memory; `check(...)` validates that choice in one line.
"""

from hn_jax.losses.registry import (MemoryState, NAMES, hyperparameters,  # noqa: F401
                                    register, search_space)
# Registration order is NAMES' order: the paper's losses first.
from hn_jax.losses.triplet import (DUPLICATE_SIMILARITY, METHODS,  # noqa: F401
                                   cosine_similarities, triplet_loss, triplet_terms)
from hn_jax.losses import pair, triplet_margin, proxies  # noqa: F401,I100  (register the rest)
from hn_jax.losses.build import build, check, kind  # noqa: F401
from hn_jax.losses.miners import MINER_NAMES  # noqa: F401


def create(name: str, *, embedding_dim: int, num_classes: int, rngs: "nnx.Rngs",
           miner: str = "", miner_params: dict | None = None, memory_size: int = 0,
           **hyperparameters) -> "nnx.Module":
  """The loss `name` with `hyperparameters` (the others at their defaults), mined by `miner`
  (`miner_params` in PML's names) and against a cross-batch memory of `memory_size`
  embeddings where given: a module called `(embeddings, labels) -> (loss, aux)` (`build`)."""
  return build(name, embedding_dim=embedding_dim, num_classes=num_classes, rngs=rngs,
               loss_params=hyperparameters, miner=miner, miner_params=miner_params,
               memory_size=memory_size)
