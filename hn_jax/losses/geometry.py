"""Distances, pair masks and the tuples a miner hands a loss (pytorch-metric-learning's names).

Every loss of the zoo sees a query batch (B, D) and a reference set (M, D): the batch itself,
or the batch and the cross-batch memory. Which (query, reference) pairs and triplets count is
a `Tuples`, PML's `indices_tuple` as dense (B, M) arrays, so shapes stay fixed under jit.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

HIGHEST = jax.lax.Precision.HIGHEST
# PML's masked logsumexp fills with the dtype's lowest value, not -inf.
NEG_FILL = float(jnp.finfo(jnp.float32).min)
# Relative rounding of a squared distance computed from dot products in float32.
_RESOLUTION = 8 * float(jnp.finfo(jnp.float32).eps)


def normalize(x: jax.Array) -> jax.Array:
  """Rows of float32 `x` over max(||x||, 1e-12) (torch.nn.functional.normalize)."""
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=1, keepdims=True), 1e-24))


def dot(q: jax.Array, r: jax.Array) -> jax.Array:
  """q @ r.T in float32 at precision HIGHEST."""
  return jnp.matmul(q, r.T, precision=HIGHEST)


class Geometry(NamedTuple):
  """The normalized query (B, D) and reference (M, D) rows and their cosine matrix (B, M)."""
  q: jax.Array
  r: jax.Array
  cos: jax.Array

  @classmethod
  def of(cls, embeddings: jax.Array, ref_embeddings: jax.Array | None = None) -> "Geometry":
    """Of the query batch and a reference set (None: the batch itself; the reference
    carries no gradient otherwise, as a memory)."""
    if ref_embeddings is None or ref_embeddings is embeddings:
      q = normalize(embeddings)
      return cls(q, q, dot(q, q))
    q, r = normalize(embeddings), normalize(jax.lax.stop_gradient(ref_embeddings))
    return cls(q, r, dot(q, r))

  def fixed(self) -> "Geometry":
    """The same without gradient (what a miner sees)."""
    return Geometry(*(jax.lax.stop_gradient(a) for a in self))

  def squared_l2(self) -> jax.Array:
    """||q - r||^2 of the normalized rows (zero rows have norm 0, as in PML).

    From the cosine matrix, so below float32's resolution of |q|^2 + |r|^2 - 2 q.r (about
    1e-6, distances under ~1e-3) it reads 0: identical rows are at distance 0, as cdist's.
    """
    # 1 or 0 (zero rows) whatever the embeddings: no gradient (and a cheaper backward pass).
    qq = jax.lax.stop_gradient(jnp.sum(self.q * self.q, axis=1))[:, None]
    rr = jax.lax.stop_gradient(jnp.sum(self.r * self.r, axis=1))[None, :]
    sq = qq + rr - 2.0 * self.cos
    return jnp.where(sq > _RESOLUTION * (qq + rr), sq, 0.0)

  def l2(self) -> jax.Array:
    """PML's LpDistance(p=2) on normalized embeddings; gradient 0 at distance 0, like cdist."""
    sq = self.squared_l2()
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)

  def snr(self) -> jax.Array:
    """PML's SNRDistance: var(q - r) / var(q) over features (unbiased), normalized rows."""
    d = self.q.shape[1]
    qq = jnp.sum(self.q * self.q, axis=1)
    rr = jnp.sum(self.r * self.r, axis=1)
    sq, sr = jnp.sum(self.q, axis=1), jnp.sum(self.r, axis=1)
    diff_sq = qq[:, None] + rr[None, :] - 2.0 * self.cos
    diff_mean = (sq[:, None] - sr[None, :]) / d
    var_diff = jnp.maximum(diff_sq / d - diff_mean * diff_mean, 0.0) * (d / (d - 1))
    var_diff = jnp.where(diff_sq > _RESOLUTION * (qq[:, None] + rr[None, :]), var_diff, 0.0)
    var_q = (qq / d - (sq / d) ** 2) * (d / (d - 1))
    return var_diff / var_q[:, None]


@struct.dataclass
class Tuples:
  """Which (query a, reference j) pairs and triplets a loss sums over: PML's indices_tuple.

  pos, neg: (B, M) float32 multiplicities of the positive pairs (a, p) and negative pairs
    (a, n) (PML lists a pair once per mined triplet containing it, so counts, not flags).
  tpos, tneg: (B, M) bool; the triplets are {(a, p, n): tpos[a, p] & tneg[a, n] & window}.
  window: None, or a TripletMarginMiner's (margin, type_of_triplets) condition on
    d(a, n) - d(a, p) with d its normalized L2 distance.
  """
  pos: jax.Array
  neg: jax.Array
  tpos: jax.Array
  tneg: jax.Array
  window: tuple[float, str] | None = struct.field(pytree_node=False, default=None)


def label_masks(labels: jax.Array, ref_labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(same, different) label masks (B, M)."""
  same = labels[:, None] == ref_labels[None, :]
  return same, ~same


def all_pairs(labels: jax.Array, ref_labels: jax.Array, exclude: jax.Array | None) -> Tuples:
  """Every positive pair but the excluded (self) ones and every negative pair: no miner."""
  same, diff = label_masks(labels, ref_labels)
  if exclude is not None:
    same = same & ~exclude
  return Tuples(same.astype(jnp.float32), diff.astype(jnp.float32), same, diff)


def batch_stats(cos: jax.Array, labels: jax.Array,
                columns: jax.Array | None) -> dict[str, jax.Array]:
  """The aux every loss reports, from the batch's own cosine matrix (stop-gradient).

  embedding_mean_sim: mean cosine similarity over distinct pairs of the batch (near 1 when
  the embedding collapses). hn_ratio: share of anchors with a positive and a negative in the
  batch whose hardest (most similar) negative is more similar than their most similar
  positive (the paper's definition, as in triplet.py).
  `columns` are the reference columns holding the batch itself (None: the reference is it).
  """
  cos = jax.lax.stop_gradient(cos)
  if columns is not None:
    cos = jnp.take(cos, columns, axis=1)
  n = cos.shape[0]
  eye = jnp.eye(n, dtype=bool)
  mean_sim = (jnp.sum(cos) - jnp.trace(cos)) / float(max(1, n * (n - 1)))
  same = (labels[:, None] == labels[None, :]) & ~eye
  diff = labels[:, None] != labels[None, :]
  best_pos = jnp.max(jnp.where(same, cos, -jnp.inf), axis=1)
  best_neg = jnp.max(jnp.where(diff, cos, -jnp.inf), axis=1)
  valid = jnp.any(same, axis=1) & jnp.any(diff, axis=1)
  hn = jnp.sum(valid & (best_neg > best_pos)) / jnp.maximum(1, jnp.sum(valid))
  return {"embedding_mean_sim": mean_sim.astype(jnp.float32),
          "hn_ratio": hn.astype(jnp.float32)}


def masked_logsumexp(x: jax.Array, keep: jax.Array, *, add_one: bool,
                     weights: jax.Array | None = None) -> jax.Array:
  """PML's lmu.logsumexp over axis 1: log(sum over kept [+ 1]); 0 for rows with none kept.

  `weights` (same shape) count an entry that many times (pairs PML lists repeatedly).
  """
  x = jnp.where(keep, x, NEG_FILL)
  top = jnp.max(x, axis=1, keepdims=True)
  if add_one:
    top = jnp.maximum(top, 0.0)
  top = jax.lax.stop_gradient(top)
  e = jnp.where(keep, jnp.exp(jnp.where(keep, x - top, 0.0)), 0.0)
  if weights is not None:
    e = e * weights
  total = jnp.sum(e, axis=1)
  if add_one:
    total = total + jnp.exp(-top[:, 0])
  out = jnp.log(jnp.where(total > 0, total, 1.0)) + top[:, 0]
  return jnp.where(jnp.any(keep, axis=1), out, 0.0)


def avg_nonzero(losses: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """PML's AvgNonZeroReducer: mean of the entries > 0 (each counted `weights` times), or 0."""
  w = (losses > 0).astype(jnp.float32)
  if weights is not None:
    w = w * weights
  return jnp.sum(jnp.where(w > 0, losses, 0.0) * w) / jnp.maximum(jnp.sum(w), 1.0)


def mean_of(losses: jax.Array, weights: jax.Array) -> jax.Array:
  """PML's MeanReducer over the listed entries (each `weights` times), or 0 if none."""
  total = jnp.sum(weights)
  return jnp.sum(jnp.where(weights > 0, losses, 0.0) * weights) / jnp.maximum(total, 1.0)


class MetricLoss(nnx.Module):
  """Base of the losses over pairs or triplets of a query batch and a reference set.

  `kind` says what `build.check` lets compose with it: "pair" and "triplet" losses take a
  miner and cross-batch memory; "other" (the default of anything without `kind`) takes neither.
  A subclass implements `terms(geometry, tuples, labels) -> (loss, aux)`.
  """
  kind = "pair"

  def __call__(self, embeddings: jax.Array,
               labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss over every pair (triplet) of the batch, no miner: PML's `loss(emb, labels)`."""
    eye = jnp.eye(embeddings.shape[0], dtype=bool)
    return self.compute(embeddings, labels, embeddings, labels, all_pairs(labels, labels, eye))

  def compute(self, embeddings: jax.Array, labels: jax.Array, ref_embeddings: jax.Array,
              ref_labels: jax.Array, tuples: Tuples, batch_columns: jax.Array | None = None,
              geometry: Geometry | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PML's `loss(emb, labels, indices_tuple, ref_emb, ref_labels)` with dense tuples.

    `batch_columns` (B,) are the reference columns that hold the batch itself (for the aux
    statistics; None when the reference is the batch). `geometry`: `Geometry.of(embeddings,
    ref_embeddings)` when the caller has it already (a miner's), else computed here.
    """
    if geometry is None:
      geometry = Geometry.of(embeddings, ref_embeddings)
    loss, aux = self.terms(geometry, tuples, labels)
    aux = {**aux, **batch_stats(geometry.cos, labels, batch_columns)}
    return loss, {k: jax.lax.stop_gradient(jnp.asarray(v, jnp.float32)) for k, v in aux.items()}

  def terms(self, geometry: Geometry, tuples: Tuples,
            labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    raise NotImplementedError


def few_pairs(tuples: Tuples) -> jax.Array:
  """PML's GenericPairLoss returns 0 when at most one positive and one negative pair exist."""
  return (jnp.sum(tuples.pos) <= 1) & (jnp.sum(tuples.neg) <= 1)


def few_or_no_pairs(tuples: Tuples) -> jax.Array:
  """`few_pairs`, or no positive pair, or no negative pair: a loss needing both returns 0."""
  return few_pairs(tuples) | (jnp.sum(tuples.pos) == 0) | (jnp.sum(tuples.neg) == 0)


def as_factory(cls: type) -> Callable[..., nnx.Module]:
  """`cls` as a registry factory: keyword-only, its __init__'s signature, its `kind`."""

  def factory(**kwargs: Any) -> nnx.Module:
    return cls(**kwargs)

  signature = inspect.signature(cls.__init__)
  factory.__signature__ = signature.replace(
      parameters=[p for p in signature.parameters.values() if p.name != "self"])
  factory.__name__ = factory.__qualname__ = cls.__name__
  factory.__doc__ = cls.__doc__
  factory.kind = cls.kind
  factory.cls = cls
  return factory
