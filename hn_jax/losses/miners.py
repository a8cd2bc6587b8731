"""Miners: which pairs or triplets of the batch (and memory) a loss sees, PML 2.9's semantics.

A miner maps (embeddings, labels, ref_embeddings, ref_labels) to a `geometry.Tuples` without
gradient. `exclude` (B, M) marks pairs that are never candidates (the batch's diagonal);
`remove` (B, M) pairs dropped after mining (the cross-batch memory's copies of the batch
itself, which PML's miners do see). A triplet miner fills both views of its `Tuples`: its
triplets, and the pairs PML's loss would read from them (each once per triplet).

- multi_similarity (epsilon=0.1): positives less similar than the hardest negative plus
  epsilon, negatives more similar than the least similar positive minus epsilon (cosine).
  Wang et al., CVPR 2019.
- triplet_margin (margin=0.2, type_of_triplets="all"): triplets with d_an - d_ap <= margin;
  "hard" also <= 0, "semihard" also > 0, "easy" those > margin (normalized L2).
- batch_hard: per anchor its farthest positive and nearest negative (normalized L2).
  Hermans, Beyer, Leibe 2017.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from hn_jax.losses.geometry import Geometry, Tuples, label_masks
from hn_jax.losses.triplet_margin import TRIPLET_TYPES, in_window, triplet_counts

_MINERS: dict[str, type] = {}
MINER_NAMES: list[str] = []


def register_miner(name: str) -> Callable[[type], type]:
  def add(cls: type) -> type:
    _MINERS[name] = cls
    MINER_NAMES.append(name)
    return cls
  return add


def miner_parameters(name: str) -> dict[str, Any]:
  """The miner's parameters and their defaults."""
  signature = inspect.signature(_MINERS[name].__init__)
  return {p.name: p.default for p in signature.parameters.values() if p.name != "self"}


def create_miner(name: str, **params: Any) -> "Miner":
  if name not in _MINERS:
    raise ValueError(f"unknown miner {name!r}; use one of {', '.join(MINER_NAMES)}")
  return _MINERS[name](**params)


def _candidates(labels, ref_labels, exclude):
  same, diff = label_masks(labels, ref_labels)
  if exclude is not None:
    same, diff = same & ~exclude, diff & ~exclude
  return same, diff


def _drop(mask: jax.Array, remove: jax.Array | None) -> jax.Array:
  return mask if remove is None else mask & ~remove


class Miner(nnx.Module):
  """Base: `miner(emb, labels, ref_emb, ref_labels, exclude=, remove=) -> Tuples`."""

  def __call__(self, embeddings: jax.Array, labels: jax.Array, ref_embeddings: jax.Array,
               ref_labels: jax.Array, *, exclude: jax.Array | None = None,
               remove: jax.Array | None = None, geometry: Geometry | None = None) -> Tuples:
    """`geometry`: `Geometry.of(embeddings, ref_embeddings)` if the caller has it."""
    if geometry is None:
      geometry = Geometry.of(embeddings, ref_embeddings)
    geometry = geometry.fixed()
    same, diff = _candidates(labels, ref_labels, exclude)
    return self.mine(geometry, same, diff, remove)

  def mine(self, geometry: Geometry, same: jax.Array, diff: jax.Array,
           remove: jax.Array | None) -> Tuples:
    raise NotImplementedError


@register_miner("multi_similarity")
class MultiSimilarityMiner(Miner):
  """Pairs: S_ap - epsilon < max_n S_an and S_an + epsilon > min_p S_ap (CosineSimilarity)."""

  def __init__(self, epsilon: float = 0.1):
    self.epsilon = epsilon

  def mine(self, geometry, same, diff, remove):
    s = geometry.cos
    hardest_neg = jnp.max(jnp.where(diff, s, -jnp.inf), axis=1, keepdims=True)
    weakest_pos = jnp.min(jnp.where(same, s, jnp.inf), axis=1, keepdims=True)
    pos = _drop(same & (s - self.epsilon < hardest_neg), remove)
    neg = diff & (s + self.epsilon > weakest_pos)
    return Tuples(pos.astype(jnp.float32), neg.astype(jnp.float32), pos, neg)


@register_miner("triplet_margin")
class TripletMarginMiner(Miner):
  """Triplets with d_an - d_ap <= margin (and <= 0 hard, > 0 semihard; > margin easy)."""

  def __init__(self, margin: float = 0.2, type_of_triplets: str = "all"):
    if type_of_triplets not in TRIPLET_TYPES:
      raise ValueError(f"triplet_margin miner: unknown type_of_triplets "
                       f"{type_of_triplets!r}; use one of {', '.join(TRIPLET_TYPES)}")
    self.margin, self.type_of_triplets = margin, type_of_triplets

  def mine(self, geometry, same, diff, remove):
    d = geometry.l2()
    tpos = _drop(same, remove)
    window = (self.margin, self.type_of_triplets)
    pos, neg = triplet_counts(d, tpos, diff, in_window(window))
    return Tuples(pos, neg, tpos, diff, window)


@register_miner("batch_hard")
class BatchHardMiner(Miner):
  """One triplet per anchor: its farthest positive and its nearest negative (LpDistance)."""

  def __init__(self):
    pass

  def mine(self, geometry, same, diff, remove):
    d = geometry.l2()
    low = float(jnp.finfo(jnp.float32).min)
    p = jnp.argmax(jnp.where(same, d, low), axis=1)
    n = jnp.argmin(jnp.where(diff, d, -low), axis=1)
    m = d.shape[1]
    tpos = jax.nn.one_hot(p, m, dtype=bool)
    tneg = jax.nn.one_hot(n, m, dtype=bool)
    keep = jnp.any(same, axis=1) & jnp.any(diff, axis=1)
    keep = keep & ~jnp.any(_drop(tpos, remove) != tpos, axis=1)
    tpos, tneg = tpos & keep[:, None], tneg & keep[:, None]
    return Tuples(tpos.astype(jnp.float32), tneg.astype(jnp.float32), tpos, tneg)
