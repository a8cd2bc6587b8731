"""Metric-learning losses over the global batch, by name (docs/losses.md).

`create(name, *, embedding_dim, num_classes, rngs, **hyperparameters)` returns an nnx.Module
called as `module(embeddings, labels) -> (loss, aux)`; `NAMES` lists the registered names;
`register(name, factory)` adds one; `build` makes a run's loss from its config's names
(with `check` refusing what cannot work). The paper's hn, shn and sct are `triplet.triplet_loss`.
"""

from hn_jax.losses.build import build, check  # noqa: F401
from hn_jax.losses.registry import (MemoryState, NAMES, create, hyperparameters,  # noqa: F401
                                    register, search_space)
from hn_jax.losses.triplet import (DUPLICATE_SIMILARITY, METHODS,  # noqa: F401
                                   cosine_similarities, triplet_loss, triplet_terms)  # registers hn, shn, sct
from hn_jax.losses import proxies  # noqa: F401  (registers the proxy and classification losses)
