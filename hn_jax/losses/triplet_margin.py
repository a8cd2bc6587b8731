"""Losses over triplets, as pytorch-metric-learning 2.9 computes them (docs/losses.md).

The triplets of a `Tuples` are {(a, p, n): tpos[a, p], tneg[a, n], window(d_an - d_ap)}.
A hinge summed over them needs no (B, M, M) tensor: it is linear in d where it is nonzero,
so counts of the triplets each pair is in (`triplet_counts`, B x M memory) give its value
and gradient. Only swap and smooth_loss need each triplet; they loop over anchor blocks.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from hn_jax.losses.geometry import MetricLoss, Tuples, as_factory
from hn_jax.losses.registry import register

TRIPLET_TYPES = ("all", "hard", "semihard", "easy")
# Elements of one anchor block's (b, M, M) tensors in the per-triplet path.
_BLOCK_ELEMENTS = 1 << 22


def window_mask(t: jax.Array, window: tuple[float, str] | None) -> jax.Array:
  """TripletMarginMiner's condition on t = d_an - d_ap (True everywhere without a window)."""
  if window is None:
    return jnp.ones(t.shape, bool)
  margin, kind = window
  if kind == "easy":
    return t > margin
  keep = t <= margin
  if kind == "hard":
    keep = keep & (t <= 0)
  elif kind == "semihard":
    keep = keep & (t > 0)
  return keep


def triplet_counts(d: jax.Array, tpos: jax.Array, tneg: jax.Array,
                   keep: Callable[[jax.Array, jax.Array], jax.Array]
                   ) -> tuple[jax.Array, jax.Array]:
  """How many triplets (a, p, n) with tpos[a, p], tneg[a, n] and keep(d_ap, d_an) each pair
  is in: (per positive pair (a, p), per negative pair (a, n)), (B, M) float32, no gradient.

  Round r takes every anchor's r-th positive at once, so the cost is (the most positives of
  an anchor) x B x M, and memory B x M: a few rounds for batches of a few images per class.
  """
  d = jax.lax.stop_gradient(d)
  rank = jnp.where(tpos, jnp.cumsum(tpos, axis=1, dtype=jnp.int32), 0)
  rounds = jnp.max(rank, initial=0)

  def one_round(carry):
    r, per_pos, per_neg = carry
    chosen = rank == r
    ap = jnp.sum(jnp.where(chosen, d, 0.0), axis=1, keepdims=True)  # d of the r-th positive
    active = tneg & jnp.any(chosen, axis=1, keepdims=True) & keep(ap, d)
    per_neg = per_neg + active
    per_pos = per_pos + jnp.where(chosen, jnp.sum(active, axis=1, keepdims=True,
                                                  dtype=jnp.int32), 0)
    return r + 1, per_pos, per_neg

  zeros = jnp.zeros(d.shape, jnp.int32)
  _, per_pos, per_neg = jax.lax.while_loop(lambda c: c[0] <= rounds, one_round,
                                           (jnp.int32(1), zeros, zeros))
  return per_pos.astype(jnp.float32), per_neg.astype(jnp.float32)


def in_window(window: tuple[float, str] | None) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """keep(d_ap, d_an) of a TripletMarginMiner's window (everything without one)."""
  return lambda ap, an: window_mask(an - ap, window)


def _anchor_blocks(b: int, m: int) -> int:
  return max(1, min(b, _BLOCK_ELEMENTS // max(1, m * m)))


class TripletMarginLoss(MetricLoss):
  """mean over triplets with a nonzero term of [d_ap - d_an + margin]_+ (softplus if smooth).

  Weinberger, Saul: "Distance metric learning for large margin nearest neighbor
  classification", JMLR 2009; Schroff, Kalenichenko, Philbin: "FaceNet", CVPR 2015 (swap:
  Balntas et al., BMVC 2016). PML: TripletMarginLoss (LpDistance, AvgNonZeroReducer), every
  triplet of the batch (triplets_per_anchor="all").
  """
  kind = "triplet"

  def __init__(self, *, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
               margin: float = 0.05, swap: bool = False, smooth_loss: bool = False,
               triplets_per_anchor: str = "all"):
    del embedding_dim, num_classes, rngs
    if triplets_per_anchor != "all":
      raise ValueError(f"triplet_margin: triplets_per_anchor={triplets_per_anchor!r} is not "
                       "supported; use 'all' (a miner picks fewer triplets)")
    self.margin, self.swap, self.smooth_loss = margin, bool(swap), bool(smooth_loss)

  def terms(self, geometry, tuples, labels):
    d = geometry.l2()
    if self.swap or self.smooth_loss:
      total, count = self._per_triplet(d, tuples)
    else:
      window = in_window(tuples.window)
      # PML's test of a nonzero term: (d_ap - d_an) + margin > 0.
      per_pos, per_neg = triplet_counts(
          d, tuples.tpos, tuples.tneg, lambda ap, an: window(ap, an) & (ap - an + self.margin > 0))
      # The sum of d_ap - d_an + margin over those triplets (the counts are constants).
      total = jnp.sum(per_pos * (d + self.margin)) - jnp.sum(per_neg * d)
      count = jnp.sum(per_pos)
    return total / jnp.maximum(count, 1.0), {"num_nonzero_triplets": count}

  def _per_triplet(self, d: jax.Array, tuples: Tuples) -> tuple[jax.Array, jax.Array]:
    b, m = d.shape
    if self.swap and b != m:
      raise ValueError("triplet_margin: swap needs the reference to be the batch "
                       "(PML indexes its query-by-reference matrix with reference indices)")
    block = _anchor_blocks(b, m)
    pad = (-b) % block
    padded = lambda x: jnp.pad(x, ((0, pad), (0, 0)))  # noqa: E731
    rows = (padded(d).reshape(-1, block, m), padded(tuples.tpos).reshape(-1, block, m),
            padded(tuples.tneg).reshape(-1, block, m))

    def one(args):
      dap, tpos, tneg = args
      an = dap[:, None, :]
      ap = dap[:, :, None]
      keep = tpos[:, :, None] & tneg[:, None, :]
      keep = keep & window_mask(jax.lax.stop_gradient(an - ap), tuples.window)
      if self.swap:
        an = jnp.minimum(an, d[None, :, :])
      violation = ap - an + self.margin
      term = jax.nn.softplus(violation) if self.smooth_loss else jax.nn.relu(violation)
      keep = keep & (term > 0)
      return jnp.sum(jnp.where(keep, term, 0.0)), jnp.sum(keep, dtype=jnp.float32)

    totals, counts = jax.lax.map(one, rows)
    return jnp.sum(totals), jnp.sum(counts)


class MarginLoss(MetricLoss):
  """sum over triplets of [d_ap - beta + margin]_+ + [beta - d_an + margin]_+, divided by the
  number of nonzero terms; + nu * beta when beta is learned (one beta per class).

  Wu, Manmatha, Smola, Kraehenbuehl: "Sampling matters in deep embedding learning",
  ICCV 2017. PML: MarginLoss (LpDistance, DivisorReducer), every triplet of the batch.
  """
  kind = "triplet"

  def __init__(self, *, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
               margin: float = 0.2, nu: float = 0.0, beta: float = 1.2,
               triplets_per_anchor: str = "all", learn_beta: bool = False):
    del embedding_dim, rngs
    if triplets_per_anchor != "all":
      raise ValueError(f"margin: triplets_per_anchor={triplets_per_anchor!r} is not "
                       "supported; use 'all' (a miner picks fewer triplets)")
    self.margin, self.nu, self.learn_beta = margin, nu, bool(learn_beta)
    if self.learn_beta:
      self.beta = nnx.Param(jnp.full((max(1, num_classes),), beta, jnp.float32))
    else:
      self.beta = float(beta)

  def terms(self, geometry, tuples, labels):
    d = geometry.l2()
    if self.learn_beta:
      beta = jnp.take(self.beta[...], labels, mode="clip")[:, None]
    else:
      beta = self.beta
    pos_loss = jax.nn.relu(d - beta + self.margin)
    neg_loss = jax.nn.relu(beta - d + self.margin)
    if tuples.window is None:  # every (positive, negative) of an anchor: counts by rows
      per_pos = jnp.where(tuples.tpos, jnp.sum(tuples.tneg, axis=1, keepdims=True), 0)
      per_neg = jnp.where(tuples.tneg, jnp.sum(tuples.tpos, axis=1, keepdims=True), 0)
      per_pos, per_neg = per_pos.astype(jnp.float32), per_neg.astype(jnp.float32)
    else:
      per_pos, per_neg = triplet_counts(d, tuples.tpos, tuples.tneg, in_window(tuples.window))
    total = jnp.sum(pos_loss * per_pos) + jnp.sum(neg_loss * per_neg)
    divisor = (jnp.sum(jnp.where(pos_loss > 0, per_pos, 0.0))
               + jnp.sum(jnp.where(neg_loss > 0, per_neg, 0.0)))
    triplets = jnp.sum(per_pos)
    loss = jnp.where(divisor > 0, total / jnp.maximum(divisor, 1.0), 0.0)
    if self.learn_beta and self.beta[...].shape[0] == 1:
      loss = loss + self.nu * self.beta[...][0]  # PML: one beta's term is not divided
    elif self.learn_beta:
      reg = jnp.sum(beta[:, 0] * self.nu * jnp.sum(per_pos, axis=1))
      loss = loss + jnp.where(divisor > 0, reg / jnp.maximum(divisor, 1.0), 0.0)
    return jnp.where(triplets > 0, loss, 0.0), {"num_triplets": triplets}


# What a study searches (hn_jax.tools.study); the learning rate is the study's default range.
register("triplet_margin", as_factory(TripletMarginLoss),
         search_space={"margin": (0.01, 0.5, "linear")})
register("margin", as_factory(MarginLoss),
         search_space={"margin": (0.05, 0.5, "linear"), "beta": (0.8, 1.6, "linear")})
