"""Losses over pairs, as pytorch-metric-learning 2.9 computes them (docs/losses.md).

Each is PML's loss with its default distance and reducer, as dense (B, M) masked math over a
query batch and a reference set: `module(embeddings, labels)` uses every pair of the batch,
`module.compute(...)` any `geometry.Tuples` (a miner's, the cross-batch memory's).
d is the L2 distance of L2-normalized embeddings, S their cosine similarity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hn_jax.losses.geometry import (NEG_FILL, Geometry, MetricLoss, as_factory, avg_nonzero,
                                    few_or_no_pairs, few_pairs, masked_logsumexp, mean_of)
from hn_jax.losses.registry import register

_TINY = float(jnp.finfo(jnp.float32).tiny)


def _row_logsumexp(x: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per row: (stop-gradient max m over weights > 0, sum of weights * exp(x - m)); m is 0
  and the sum 0 on rows without any."""
  keep = weights > 0
  top = jax.lax.stop_gradient(jnp.max(jnp.where(keep, x, NEG_FILL), axis=1))
  top = jnp.where(jnp.any(keep, axis=1), top, 0.0)
  shifted = jnp.where(keep, x - top[:, None], 0.0)  # no inf * 0 in the gradient
  total = jnp.sum(jnp.where(keep, jnp.exp(shifted), 0.0) * weights, axis=1)
  return top, total


class ContrastiveLoss(MetricLoss):
  """relu(d_ap - pos_margin) and relu(neg_margin - d_an), each averaged over its nonzero terms.

  Hadsell, Chopra, LeCun: "Dimensionality reduction by learning an invariant mapping",
  CVPR 2006. PML: ContrastiveLoss (LpDistance, AvgNonZeroReducer per part).
  """
  kind = "pair"

  def __init__(self, *, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
               pos_margin: float = 0.0, neg_margin: float = 1.0):
    del embedding_dim, num_classes, rngs
    self.pos_margin = pos_margin
    self.neg_margin = neg_margin

  def distance(self, geometry: Geometry) -> jax.Array:
    return geometry.l2()

  def terms(self, geometry, tuples, labels):
    d = self.distance(geometry)
    pos = avg_nonzero(jax.nn.relu(d - self.pos_margin), tuples.pos)
    neg = avg_nonzero(jax.nn.relu(self.neg_margin - d), tuples.neg)
    loss = jnp.where(few_pairs(tuples), 0.0, pos + neg)
    return loss, {"pos_loss": pos, "neg_loss": neg}


class SignalToNoiseRatioContrastiveLoss(ContrastiveLoss):
  """Contrastive loss on the SNR distance var(x_j - x_a) / var(x_a) (normalized rows).

  Yuan, Chen, Xu, Huang: "Signal-to-noise ratio: a robust distance metric for deep metric
  learning", CVPR 2019. PML: SignalToNoiseRatioContrastiveLoss (SNRDistance, AvgNonZero).
  """

  def distance(self, geometry: Geometry) -> jax.Array:
    return geometry.snr()


class MultiSimilarityLoss(MetricLoss):
  """mean_a 1/a log(1 + sum_p e^{-a (S_ap - base)}) + 1/b log(1 + sum_n e^{b (S_an - base)}).

  (a = alpha, b = beta.)

  Wang, Han, Huang, Dong, Scott: "Multi-similarity loss with general pair weighting for deep
  metric learning", CVPR 2019. PML: MultiSimilarityLoss (CosineSimilarity, MeanReducer).
  """
  kind = "pair"

  def __init__(self, *, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
               alpha: float = 2.0, beta: float = 50.0, base: float = 0.5):
    del embedding_dim, num_classes, rngs
    self.alpha, self.beta, self.base = alpha, beta, base

  def terms(self, geometry, tuples, labels):
    s = geometry.cos
    pos = masked_logsumexp(self.alpha * (self.base - s), tuples.pos > 0, add_one=True)
    neg = masked_logsumexp(self.beta * (s - self.base), tuples.neg > 0, add_one=True)
    loss = jnp.mean(pos / self.alpha + neg / self.beta)
    return jnp.where(few_pairs(tuples), 0.0, loss), {}


class CircleLoss(MetricLoss):
  """softplus(lse_p -g [1+m-S_ap]_+ (S_ap-1+m) + lse_n g [S_an+m]_+ (S_an-m)), nonzero mean.

  Sun et al.: "Circle loss: a unified perspective of pair similarity optimization",
  CVPR 2020. PML: CircleLoss (CosineSimilarity, AvgNonZeroReducer; weights stop-gradient).
  """
  kind = "pair"

  def __init__(self, *, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
               m: float = 0.4, gamma: float = 80.0):
    del embedding_dim, num_classes, rngs
    self.m, self.gamma = m, gamma

  def terms(self, geometry, tuples, labels):
    s = geometry.cos
    fixed = jax.lax.stop_gradient(s)
    pos_mask, neg_mask = tuples.pos > 0, tuples.neg > 0
    logit_p = -self.gamma * jax.nn.relu(1 + self.m - fixed) * (s - (1 - self.m))
    logit_n = self.gamma * jax.nn.relu(fixed + self.m) * (s - self.m)
    lse = (masked_logsumexp(logit_p, pos_mask, add_one=False)
           + masked_logsumexp(logit_n, neg_mask, add_one=False))
    rows = jnp.any(pos_mask, axis=1) & jnp.any(neg_mask, axis=1)
    losses = jnp.where(rows, jax.nn.softplus(lse), 0.0)
    return jnp.where(few_pairs(tuples), 0.0, avg_nonzero(losses)), {}


class LiftedStructureLoss(MetricLoss):
  """mean_(a,p) 1/2 [d_ap - pos_margin + log sum_{(k,n): k in {a,p}} e^{neg_margin - d_kn}]_+^2.

  Oh Song, Xiang, Jegelka, Savarese: "Deep metric learning via lifted structured feature
  embedding", CVPR 2016. PML: LiftedStructureLoss (LpDistance, MeanReducer over positive
  pairs). As PML, the negatives of (a, p) are the negative pairs anchored at query a or at
  query index p (none when p >= the batch size, e.g. a memory slot).
  """
  kind = "pair"

  def __init__(self, *, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
               neg_margin: float = 1.0, pos_margin: float = 0.0):
    del embedding_dim, num_classes, rngs
    self.neg_margin, self.pos_margin = neg_margin, pos_margin

  def terms(self, geometry, tuples, labels):
    d = geometry.l2()
    b, m = d.shape
    top, total = _row_logsumexp(self.neg_margin - d, tuples.neg)  # (B,)
    # Row p of the negatives, for reference column p < B (p != a: one row counted once).
    cols = jnp.arange(m)
    top_p = jnp.where(cols < b, jnp.pad(top, (0, max(0, m - b)), constant_values=NEG_FILL)[:m],
                      NEG_FILL)
    total_p = jnp.where(cols < b, jnp.pad(total, (0, max(0, m - b)))[:m], 0.0)
    other = cols[None, :] != jnp.arange(b)[:, None]
    top_p = jnp.where(other, top_p[None, :], NEG_FILL)
    total_p = jnp.where(other, total_p[None, :], 0.0)
    peak = jnp.maximum(top[:, None], top_p)
    both = (total[:, None] * jnp.exp(top[:, None] - peak) + total_p * jnp.exp(top_p - peak))
    lse = jnp.where(both > 0, jnp.log(jnp.where(both > 0, both, 1.0)) + peak, 0.0)
    per_pair = jax.nn.relu(lse + d - self.pos_margin) ** 2 / 2
    loss = mean_of(per_pair, tuples.pos)
    return jnp.where(few_or_no_pairs(tuples), 0.0, loss), {}


class GeneralizedLiftedStructureLoss(MetricLoss):
  """mean_a [log sum_p e^{d_ap - pos_margin} + log sum_n e^{neg_margin - d_an}]_+.

  Hermans, Beyer, Leibe: "In defense of the triplet loss for person re-identification",
  2017 (its generalized lifted structure loss). PML: GeneralizedLiftedStructureLoss
  (LpDistance, MeanReducer over anchors).
  """
  kind = "pair"

  def __init__(self, *, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
               neg_margin: float = 1.0, pos_margin: float = 0.0):
    del embedding_dim, num_classes, rngs
    self.neg_margin, self.pos_margin = neg_margin, pos_margin

  def terms(self, geometry, tuples, labels):
    d = geometry.l2()
    pos = masked_logsumexp(d - self.pos_margin, tuples.pos > 0, add_one=False)
    neg = masked_logsumexp(self.neg_margin - d, tuples.neg > 0, add_one=False)
    loss = jnp.mean(jax.nn.relu(pos + neg))
    return jnp.where(few_pairs(tuples), 0.0, loss), {}


class NTXentLoss(MetricLoss):
  """mean_(a,p) -log(e^{S_ap/t} / (e^{S_ap/t} + sum_n e^{S_an/t})): InfoNCE over labels.

  Chen, Kornblith, Norouzi, Hinton: "A simple framework for contrastive learning of visual
  representations" (SimCLR), ICML 2020. PML: NTXentLoss (CosineSimilarity, MeanReducer over
  positive pairs).
  """
  kind = "pair"

  def __init__(self, *, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
               temperature: float = 0.07):
    del embedding_dim, num_classes, rngs
    self.temperature = temperature

  def terms(self, geometry, tuples, labels):
    s = geometry.cos / self.temperature
    top, total = _row_logsumexp(s, tuples.neg)
    peak = jax.lax.stop_gradient(jnp.maximum(s, top[:, None]))
    numerator = jnp.exp(s - peak)
    denominator = numerator + total[:, None] * jnp.exp(top[:, None] - peak)
    per_pair = -jnp.log(numerator / denominator + _TINY)
    loss = mean_of(per_pair, tuples.pos)
    return jnp.where(few_or_no_pairs(tuples), 0.0, loss), {}


class SupConLoss(MetricLoss):
  """mean_a (nonzero) -1/|P(a)| sum_p log(e^{S_ap/t} / sum_{j in P(a) or N(a)} e^{S_aj/t}).

  Khosla et al.: "Supervised contrastive learning", NeurIPS 2020. PML: SupConLoss
  (CosineSimilarity, AvgNonZeroReducer over anchors).
  """
  kind = "pair"

  def __init__(self, *, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
               temperature: float = 0.1):
    del embedding_dim, num_classes, rngs
    self.temperature = temperature

  def terms(self, geometry, tuples, labels):
    s = geometry.cos / self.temperature
    s = s - jax.lax.stop_gradient(jnp.max(s, axis=1, keepdims=True))
    pos_mask = (tuples.pos > 0).astype(jnp.float32)
    keep = (tuples.pos > 0) | (tuples.neg > 0)
    log_prob = s - masked_logsumexp(s, keep, add_one=False)[:, None]
    mean_log_prob = (jnp.sum(pos_mask * log_prob, axis=1)
                     / (jnp.sum(pos_mask, axis=1) + _TINY))
    loss = avg_nonzero(-mean_log_prob)
    return jnp.where(few_or_no_pairs(tuples), 0.0, loss), {}


class FastAPLoss(MetricLoss):
  """mean_a 1 - 1/|P(a)| sum_bins h+_b H+_b / H_b: AP from soft histograms of d^2 in [0, 4].

  Cakir, He, Xia, Kulis, Sclaroff: "Deep metric learning to rank", CVPR 2019. PML:
  FastAPLoss (LpDistance(power=2), MeanReducer over anchors with a positive). Like PML's it
  takes no reference set, so neither a miner nor memory (kind "other").
  """
  kind = "other"

  def __init__(self, *, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
               num_bins: int = 10):
    del embedding_dim, num_classes, rngs
    self.num_bins = int(num_bins)

  def terms(self, geometry, tuples, labels):
    d = geometry.l2() ** 2
    pos, neg = (tuples.pos > 0).astype(jnp.float32), (tuples.neg > 0).astype(jnp.float32)
    delta = 4.0 / self.num_bins
    mids = jnp.linspace(0.0, 4.0, self.num_bins + 1, dtype=jnp.float32)
    pos_hist, neg_hist = [], []
    for e in range(self.num_bins + 1):
      pulse = jax.nn.relu(1 - jnp.abs(d - mids[e]) / delta)
      pos_hist.append(jnp.sum(pulse * pos, axis=1))
      neg_hist.append(jnp.sum(pulse * neg, axis=1))
    pos_hist, neg_hist = jnp.stack(pos_hist, 1), jnp.stack(neg_hist, 1)
    total_pos = jnp.cumsum(pos_hist, axis=1)
    total = jnp.cumsum(pos_hist + neg_hist, axis=1)
    product = pos_hist * total_pos
    safe_h = (product > 0) & (total > 0)
    ap = jnp.sum(jnp.where(safe_h, product / jnp.where(safe_h, total, 1.0), 0.0), axis=1)
    n_pos = jnp.sum(pos, axis=1)
    safe_n = n_pos > 0
    losses = 1 - ap / jnp.maximum(n_pos, 1.0)
    loss = mean_of(losses, safe_n.astype(jnp.float32))
    return jnp.where(jnp.any(safe_h), loss, 0.0), {}


# What a study searches (hn_jax.tools.study), around PML's defaults in the spirit of the Metric
# Learning Reality Check's ranges; the learning rate is the study's default range.
_MARGINS = {"pos_margin": (0.0, 0.5, "linear"), "neg_margin": (0.3, 1.5, "linear")}
register("contrastive", as_factory(ContrastiveLoss), search_space=_MARGINS)
register("multi_similarity", as_factory(MultiSimilarityLoss),
         search_space={"alpha": (0.5, 20.0, "log"), "beta": (10.0, 80.0, "log"),
                       "base": (0.0, 1.0, "linear")})
register("circle", as_factory(CircleLoss),
         search_space={"m": (0.1, 0.5, "linear"), "gamma": (16.0, 256.0, "log")})
register("lifted_structure", as_factory(LiftedStructureLoss), search_space=_MARGINS)
register("generalized_lifted_structure", as_factory(GeneralizedLiftedStructureLoss),
         search_space=_MARGINS)
register("ntxent", as_factory(NTXentLoss), search_space={"temperature": (0.01, 1.0, "log")})
register("supcon", as_factory(SupConLoss), search_space={"temperature": (0.01, 1.0, "log")})
register("fast_ap", as_factory(FastAPLoss), search_space={"num_bins": (5, 50, "int")})
register("snr_contrastive", as_factory(SignalToNoiseRatioContrastiveLoss),
         search_space=_MARGINS)
