"""Exact retrieval recall by cosine similarity, in blocks of queries of bounded memory.

Recall@K needs no sort. For each query we count the gallery items of *another* label that
are at least as similar as its most similar item of its own label; the query is a hit at
K exactly when that count is below K. One integer per query answers every K at once, and
a block of queries only ever holds its own row of similarities.

Tie rule: an item of another label with exactly the same similarity as the best correct
item is ranked ahead of it (ties count against the query), so recall is never overstated;
a collapsed embedding, where everything ties, scores 0. A query with no item of its own
label in the gallery is always a miss.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Bytes of working memory per similarity entry (the float32 value plus fused temporaries).
_BYTES_PER_ENTRY = 8


def l2_normalize(x: np.ndarray | jax.Array) -> jax.Array:
  """Rows scaled to unit norm (zero rows stay zero)."""
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("exclude_self",))
def _ranks_of_first_hit(queries, query_labels, gallery, gallery_labels, offset, *,
                        exclude_self: bool):
  sims = jnp.matmul(queries, gallery.T, precision=jax.lax.Precision.HIGHEST)
  rows = jnp.arange(queries.shape[0])
  if exclude_self:
    sims = sims.at[rows, offset + rows].set(-jnp.inf, mode="drop")
  same = query_labels[:, None] == gallery_labels[None, :]
  best_correct = jnp.max(jnp.where(same, sims, -jnp.inf), axis=1)
  ahead = jnp.sum(~same & (sims >= best_correct[:, None]), axis=1)
  return jnp.where(jnp.isfinite(best_correct), ahead, gallery.shape[0])


def first_hit_ranks(queries: np.ndarray, query_labels: np.ndarray,
                    gallery: np.ndarray | None = None, gallery_labels: np.ndarray | None = None,
                    *, max_bytes: int = 2 * 1024**3) -> np.ndarray:
  """For each query, the 0-based rank of its first correct item in the gallery.

  Without a gallery, every query searches the other queries (leave-one-out). Queries with
  no correct item get the gallery size. Similarities in flight stay under `max_bytes`.
  """
  exclude_self = gallery is None
  if exclude_self:
    gallery, gallery_labels = queries, query_labels
  q = l2_normalize(queries)
  g = l2_normalize(gallery)
  qy = jnp.asarray(query_labels, jnp.int32)
  gy = jnp.asarray(gallery_labels, jnp.int32)
  num_queries, num_gallery = q.shape[0], g.shape[0]
  block = int(max(1, min(num_queries, max_bytes // (_BYTES_PER_ENTRY * max(1, num_gallery)))))
  ranks = []
  for start in range(0, num_queries, block):
    q_block, y_block = q[start:start + block], qy[start:start + block]
    pad = block - q_block.shape[0]
    if pad:  # keep one compiled shape; padded rows are dropped below
      q_block = jnp.pad(q_block, ((0, pad), (0, 0)))
      y_block = jnp.pad(y_block, (0, pad), constant_values=-1)
    r = _ranks_of_first_hit(q_block, y_block, g, gy, start, exclude_self=exclude_self)
    ranks.append(np.asarray(r)[:block - pad])
  return np.concatenate(ranks) if ranks else np.zeros((0,), np.int64)


def recall_at_k(embeddings: np.ndarray, labels: np.ndarray, ks: Sequence[int],
                gallery: np.ndarray | None = None, gallery_labels: np.ndarray | None = None,
                *, max_bytes: int = 2 * 1024**3) -> dict[int, float]:
  """Recall@K by cosine similarity: leave-one-out within `embeddings`, or against `gallery`."""
  if (gallery is None) != (gallery_labels is None):
    raise ValueError("pass both gallery and gallery_labels, or neither")
  if len(embeddings) != len(labels):
    raise ValueError(f"{len(embeddings)} embeddings but {len(labels)} labels")
  ranks = first_hit_ranks(embeddings, labels, gallery, gallery_labels, max_bytes=max_bytes)
  return {int(k): float(np.mean(ranks < k)) if len(ranks) else 0.0 for k in ks}
