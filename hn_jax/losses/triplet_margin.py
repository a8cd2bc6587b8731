"""Losses over triplets, as pytorch-metric-learning 2.9 computes them (docs/losses.md).

The triplets of a `Tuples` are {(a, p, n): tpos[a, p], tneg[a, n], window(d_an - d_ap)}.
A hinge summed over them needs no (B, M, M) tensor: per anchor, the negatives sorted by
distance and their running sums give every positive's count and sum of active negatives
(O(B M log M)). Only swap and smooth_loss need each triplet; they loop over anchor blocks.
"""

from __future__ import annotations

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


def _bounds(window: tuple[float, str] | None, extra_upper: float | None
            ) -> tuple[list[float], list[float], float | None]:
  """The window (and t < extra_upper) as bounds on t: (closed uppers t <= u, open uppers
  t < u, open lower t > l or None)."""
  closed, opened, lower = [], [], None
  if window is not None:
    margin, kind = window
    if kind == "easy":
      lower = margin
    else:
      closed.append(margin)
      if kind == "hard":
        closed.append(0.0)
      elif kind == "semihard":
        lower = 0.0
  if extra_upper is not None:
    opened.append(extra_upper)
  return closed, opened, lower


def _search(sorted_rows: jax.Array, queries: jax.Array, side: str) -> jax.Array:
  return jax.vmap(lambda a, v: jnp.searchsorted(a, v, side=side))(sorted_rows, queries)


def negatives_in_window(d: jax.Array, tpos: jax.Array, tneg: jax.Array,
                        window: tuple[float, str] | None, extra_upper: float | None = None,
                        with_sums: bool = False) -> tuple[jax.Array, jax.Array | None]:
  """For every (a, p): how many negatives n of a have t = d_an - d_ap in the window (and
  t < extra_upper), and (with_sums) the sum of their d_an, differentiable in d. (B, M) each;
  0 where not tpos."""
  b, m = d.shape
  if window is None and extra_upper is None and not with_sums:  # every negative: no sort
    return jnp.where(tpos, jnp.sum(tneg, axis=1, keepdims=True), 0).astype(jnp.float32), None
  key = jnp.where(tneg, jax.lax.stop_gradient(d), jnp.inf)
  order = jnp.argsort(key, axis=1)
  sorted_key = jnp.take_along_axis(key, order, axis=1)
  total = jnp.sum(tneg, axis=1, keepdims=True)
  base = jax.lax.stop_gradient(d)
  closed, opened, lower = _bounds(window, extra_upper)
  hi = jnp.broadcast_to(total, (b, m))
  for u in closed:
    hi = jnp.minimum(hi, _search(sorted_key, base + u, "right"))
  for u in opened:
    hi = jnp.minimum(hi, _search(sorted_key, base + u, "left"))
  lo = (jnp.zeros((b, m), hi.dtype) if lower is None
        else _search(sorted_key, base + lower, "right"))
  hi = jnp.maximum(hi, lo)
  count = jnp.where(tpos, hi - lo, 0).astype(jnp.float32)
  if not with_sums:
    return count, None
  values = jnp.take_along_axis(jnp.where(tneg, d, 0.0), order, axis=1)
  running = jnp.concatenate([jnp.zeros((b, 1), d.dtype), jnp.cumsum(values, axis=1)], axis=1)
  sums = (jnp.take_along_axis(running, hi, axis=1) - jnp.take_along_axis(running, lo, axis=1))
  return count, jnp.where(tpos, sums, 0.0)


def positives_in_window(d: jax.Array, tpos: jax.Array, tneg: jax.Array,
                        window: tuple[float, str] | None) -> jax.Array:
  """For every (a, n): how many positives p of a have t = d_an - d_ap in the window.
  (B, M); 0 where not tneg."""
  total = jnp.sum(tpos, axis=1, keepdims=True).astype(jnp.float32)
  if window is None:
    return jnp.where(tneg, total, 0.0)
  d = jax.lax.stop_gradient(d)
  key = jnp.sort(jnp.where(tpos, d, jnp.inf), axis=1)
  margin, kind = window
  # t <= c  <=>  d_ap >= d_an - c ;  t > c  <=>  d_ap < d_an - c.
  below = lambda c: _search(key, d - c, "left")  # noqa: E731  (#{d_ap < d_an - c})
  if kind == "easy":
    count = below(margin)
  else:
    count = total - below(margin)
    if kind == "hard":
      count = jnp.minimum(count, total - below(0.0))
    elif kind == "semihard":
      count = jnp.maximum(count - (total - below(0.0)), 0)
  return jnp.where(tneg, count, 0).astype(jnp.float32)


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
      count, sums = negatives_in_window(d, tuples.tpos, tuples.tneg, tuples.window,
                                        extra_upper=self.margin, with_sums=True)
      total = jnp.sum(count * (d + self.margin) - sums)
      count = jnp.sum(count)
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
    per_pos, _ = negatives_in_window(d, tuples.tpos, tuples.tneg, tuples.window)
    per_neg = positives_in_window(d, tuples.tpos, tuples.tneg, tuples.window)
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


register("triplet_margin", as_factory(TripletMarginLoss))
register("margin", as_factory(MarginLoss))
