"""Metric-learning losses over the global batch, by name (docs/losses.md).

`create(name, *, embedding_dim, num_classes, rngs, **hyperparameters)` returns an nnx.Module
called as `module(embeddings, labels) -> (loss, aux)`; `NAMES` lists the registered names;
`register(name, factory)` adds one. The paper's hn, shn and sct are `triplet.triplet_loss`.
"""

from hn_jax.losses.registry import (MemoryState, NAMES, create, hyperparameters,  # noqa: F401
                                    register)
from hn_jax.losses.triplet import (DUPLICATE_SIMILARITY, METHODS,  # noqa: F401
                                   cosine_similarities, triplet_loss, triplet_terms)  # registers hn, shn, sct
from hn_jax.losses import pair, triplet_margin  # noqa: F401,E402  (register the zoo)
