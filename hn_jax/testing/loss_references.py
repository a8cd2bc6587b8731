"""Float64 NumPy references of the pair and triplet losses, miners and cross-batch memory.

Written from each paper's formula and pytorch-metric-learning's documented reductions, with
explicit Python loops over anchors, pairs and triplets (lists, with repeats, as PML's index
tuples): slow, obvious, and independent of the dense JAX code in hn_jax/losses/.
A query batch x (B, D) is compared with a reference set r (M, D); without one, r is x and a
sample is never its own positive.
"""

from __future__ import annotations

import math

import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def l2(x, r):
  u, v = normalize(x), normalize(r)
  return np.array([[np.linalg.norm(a - b) for b in v] for a in u])


def cos(x, r):
  u, v = normalize(x), normalize(r)
  return np.array([[float(np.dot(a, b)) for b in v] for a in u])


def snr(x, r):
  u, v = normalize(x), normalize(r)
  return np.array([[np.var(a - b, ddof=1) / np.var(a, ddof=1) for b in v] for a in u])


def all_pairs(labels, ref_labels=None, skip_self=None):
  """PML's every-pair tuple: positive pairs (i, j) with equal labels, i != j without a
  reference (or (i, j) not in skip_self), negative pairs with different labels."""
  own = ref_labels is None
  ref_labels = labels if own else ref_labels
  skip = set(skip_self or ())
  pos, neg = [], []
  for i, yi in enumerate(labels):
    for j, yj in enumerate(ref_labels):
      if yi == yj and not (own and i == j) and (i, j) not in skip:
        pos.append((i, j))
      elif yi != yj:
        neg.append((i, j))
  return pos, neg


def pairs_to_triplets(pos, neg):
  return [(a, p, n) for a, p in pos for a2, n in neg if a == a2]


def triplets_to_pairs(triplets):
  return [(a, p) for a, p, _ in triplets], [(a, n) for a, _, n in triplets]


def _mean_nonzero(values):
  kept = [v for v in values if v > 0]
  return float(np.mean(kept)) if kept else 0.0


def _lse(values):
  values = np.asarray(values, np.float64)
  top = values.max()
  return top + math.log(np.sum(np.exp(values - top)))


def _few(pos, neg):
  return len(pos) <= 1 and len(neg) <= 1


# ----- pair losses: (x, r, pos, neg) with pos/neg lists of (query, reference) -----

def contrastive(x, r, pos, neg, pos_margin=0.0, neg_margin=1.0, distance=l2):
  """Hadsell et al. 2006: mean nonzero [d_ap - m+]_+ + mean nonzero [m- - d_an]_+."""
  if _few(pos, neg):
    return 0.0
  d = distance(x, r)
  return (_mean_nonzero([max(d[i, j] - pos_margin, 0.0) for i, j in pos])
          + _mean_nonzero([max(neg_margin - d[i, j], 0.0) for i, j in neg]))


def snr_contrastive(x, r, pos, neg, pos_margin=0.0, neg_margin=1.0):
  """Yuan et al. 2019: the contrastive loss on var(x_j - x_i) / var(x_i)."""
  return contrastive(x, r, pos, neg, pos_margin, neg_margin, distance=snr)


def _by_anchor(pairs, b):
  rows = [[] for _ in range(b)]
  for i, j in pairs:
    rows[i].append(j)
  return rows


def multi_similarity(x, r, pos, neg, alpha=2.0, beta=50.0, base=0.5):
  """Wang et al. 2019, per anchor, averaged over every anchor."""
  if _few(pos, neg):
    return 0.0
  s = cos(x, r)
  b = len(x)
  pos_rows, neg_rows = _by_anchor(set(pos), b), _by_anchor(set(neg), b)
  total = 0.0
  for i in range(b):
    if pos_rows[i]:
      total += math.log1p(sum(math.exp(-alpha * (s[i, j] - base)) for j in pos_rows[i])) / alpha
    if neg_rows[i]:
      total += math.log1p(sum(math.exp(beta * (s[i, j] - base)) for j in neg_rows[i])) / beta
  return total / b


def circle(x, r, pos, neg, m=0.4, gamma=80.0, weight_sims=None):
  """Sun et al. 2020. The weights [1 + m - s]_+ and [s + m]_+ are constants (no gradient):
  `weight_sims` gives the similarities they are taken from (default: x's own)."""
  if _few(pos, neg):
    return 0.0
  s = cos(x, r)
  w = s if weight_sims is None else weight_sims
  pos_rows, neg_rows = _by_anchor(set(pos), len(x)), _by_anchor(set(neg), len(x))
  losses = []
  for i in range(len(x)):
    if not pos_rows[i] or not neg_rows[i]:
      continue
    lp = _lse([-gamma * max(1 + m - w[i, j], 0) * (s[i, j] - (1 - m)) for j in pos_rows[i]])
    ln = _lse([gamma * max(w[i, j] + m, 0) * (s[i, j] - m) for j in neg_rows[i]])
    losses.append(np.logaddexp(0.0, lp + ln))
  return _mean_nonzero(losses)


def lifted_structure(x, r, pos, neg, neg_margin=1.0, pos_margin=0.0):
  """Oh Song et al. 2016 as PML: per listed positive pair (i, j), the negative pairs
  anchored at i or at j (j a query index)."""
  if _few(pos, neg) or not pos or not neg:
    return 0.0
  d = l2(x, r)
  losses = []
  for i, j in pos:
    terms = [neg_margin - d[k, n] for k, n in neg if k == i or k == j]
    lse = _lse(terms) if terms else 0.0
    losses.append(max(lse + d[i, j] - pos_margin, 0.0) ** 2 / 2)
  return float(np.mean(losses))


def generalized_lifted_structure(x, r, pos, neg, neg_margin=1.0, pos_margin=0.0):
  """Hermans et al. 2017: mean over anchors of [lse_p (d - m+) + lse_n (m- - d)]_+."""
  if _few(pos, neg):
    return 0.0
  d = l2(x, r)
  pos_rows, neg_rows = _by_anchor(set(pos), len(x)), _by_anchor(set(neg), len(x))
  total = 0.0
  for i in range(len(x)):
    lp = _lse([d[i, j] - pos_margin for j in pos_rows[i]]) if pos_rows[i] else 0.0
    ln = _lse([neg_margin - d[i, j] for j in neg_rows[i]]) if neg_rows[i] else 0.0
    total += max(lp + ln, 0.0)
  return total / len(x)


def ntxent(x, r, pos, neg, temperature=0.07):
  """Chen et al. 2020 (SimCLR's NT-Xent) with labels: per listed positive pair."""
  if _few(pos, neg) or not pos or not neg:
    return 0.0
  s = cos(x, r) / temperature
  losses = []
  for i, j in pos:
    logits = [s[i, j]] + [s[k, n] for k, n in neg if k == i]
    losses.append(_lse(logits) - s[i, j])
  return float(np.mean(losses))


def supcon(x, r, pos, neg, temperature=0.1):
  """Khosla et al. 2020: per anchor, -mean over positives of log softmax over pos + neg."""
  if _few(pos, neg) or not pos or not neg:
    return 0.0
  s = cos(x, r) / temperature
  pos_rows, neg_rows = _by_anchor(set(pos), len(x)), _by_anchor(set(neg), len(x))
  losses = []
  for i in range(len(x)):
    if not pos_rows[i]:
      losses.append(0.0)
      continue
    norm = _lse([s[i, j] for j in pos_rows[i] + neg_rows[i]])
    losses.append(-float(np.mean([s[i, j] - norm for j in pos_rows[i]])))
  return _mean_nonzero(losses)


def fast_ap(x, labels, num_bins=10):
  """Cakir et al. 2019: 1 - AP from triangular histograms of squared distances on [0, 4]."""
  d2 = l2(x, x) ** 2
  delta = 4.0 / num_bins
  centers = [4.0 * e / num_bins for e in range(num_bins + 1)]
  losses, any_safe = [], False
  for i in range(len(x)):
    p = [j for j in range(len(x)) if j != i and labels[j] == labels[i]]
    n = [j for j in range(len(x)) if labels[j] != labels[i]]
    if not p:
      continue
    hp = [sum(max(1 - abs(d2[i, j] - c) / delta, 0.0) for j in p) for c in centers]
    hn = [sum(max(1 - abs(d2[i, j] - c) / delta, 0.0) for j in n) for c in centers]
    cum_p, cum = np.cumsum(hp), np.cumsum(np.add(hp, hn))
    ap = 0.0
    for e in range(num_bins + 1):
      if hp[e] * cum_p[e] > 0 and cum[e] > 0:
        ap += hp[e] * cum_p[e] / cum[e]
        any_safe = True
    losses.append(1 - ap / len(p))
  return float(np.mean(losses)) if losses and any_safe else 0.0


# ----- triplet losses: (x, r, triplets) with triplets a list of (a, p, n) -----

def triplet_margin(x, r, triplets, margin=0.05, swap=False, smooth_loss=False):
  """Weinberger & Saul 2009 / Schroff et al. 2015: mean nonzero [d_ap - d_an + margin]_+
  (softplus if smooth; d_an -> min(d_an, d_pn) with swap, Balntas et al. 2016)."""
  d = l2(x, r)
  terms = []
  for a, p, n in triplets:
    an = min(d[a, n], d[p, n]) if swap else d[a, n]
    v = d[a, p] - an + margin
    terms.append(float(np.logaddexp(0.0, v)) if smooth_loss else max(v, 0.0))
  return _mean_nonzero(terms)


def margin(x, r, triplets, labels, margin=0.2, nu=0.0, beta=1.2, learn_beta=False):
  """Wu et al. 2017: sum of [d_ap - b + m]_+ + [b - d_an + m]_+ over the nonzero terms'
  count; beta a scalar or per class (indexed by the anchor's label); + nu * beta learned."""
  if not triplets:
    return 0.0
  d = l2(x, r)
  betas = np.atleast_1d(np.asarray(beta, np.float64))
  b_of = (lambda a: betas[0]) if betas.size == 1 else (lambda a: betas[labels[a]])
  total, divisor, reg = 0.0, 0, 0.0
  for a, p, n in triplets:
    pos = max(d[a, p] - b_of(a) + margin, 0.0)
    neg = max(b_of(a) - d[a, n] + margin, 0.0)
    total += pos + neg
    divisor += int(pos > 0) + int(neg > 0)
    reg += b_of(a) * nu
  loss = total / divisor if divisor else 0.0
  if learn_beta and betas.size == 1:
    loss += betas[0] * nu
  elif learn_beta and divisor:
    loss += reg / divisor
  return loss


# ----- miners: (x, labels, r, ref_labels, skip_self) -> pair lists or triplets -----

def _candidates(labels, ref_labels, own):
  pos = [(i, j) for i in range(len(labels)) for j in range(len(ref_labels))
         if labels[i] == ref_labels[j] and not (own and i == j)]
  neg = [(i, j) for i in range(len(labels)) for j in range(len(ref_labels))
         if labels[i] != ref_labels[j]]
  return pos, neg


def multi_similarity_miner(x, labels, r=None, ref_labels=None, epsilon=0.1, skip_self=()):
  """Wang et al. 2019's pair mining on cosine similarity; skip_self pairs dropped after."""
  own = r is None
  r, ref_labels = (x, labels) if own else (r, ref_labels)
  s = cos(x, r)
  pos, neg = _candidates(labels, ref_labels, own)
  out_p, out_n = [], []
  for i in range(len(x)):
    ps = [s[i, j] for a, j in pos if a == i]
    ns = [s[i, j] for a, j in neg if a == i]
    out_p += [(i, j) for a, j in pos if a == i and ns and s[i, j] - epsilon < max(ns)]
    out_n += [(i, j) for a, j in neg if a == i and ps and s[i, j] + epsilon > min(ps)]
  return [q for q in out_p if q not in set(skip_self)], out_n


def triplet_margin_miner(x, labels, r=None, ref_labels=None, margin=0.2,
                         type_of_triplets="all", skip_self=()):
  """Triplets by t = d_an - d_ap: all t <= margin; hard also t <= 0; semihard also t > 0;
  easy t > margin."""
  own = r is None
  r, ref_labels = (x, labels) if own else (r, ref_labels)
  d = l2(x, r)
  pos, neg = _candidates(labels, ref_labels, own)
  out = []
  for a, p in pos:
    if (a, p) in set(skip_self):
      continue
    for a2, n in neg:
      if a2 != a:
        continue
      t = d[a, n] - d[a, p]
      keep = {"all": t <= margin, "hard": t <= margin and t <= 0,
              "semihard": t <= margin and t > 0, "easy": t > margin}[type_of_triplets]
      if keep:
        out.append((a, p, n))
  return out


def batch_hard_miner(x, labels, r=None, ref_labels=None, skip_self=()):
  """Hermans et al. 2017: per anchor the farthest positive and nearest negative (first in
  index order on ties); the triplet dropped if its positive is the anchor itself."""
  own = r is None
  r, ref_labels = (x, labels) if own else (r, ref_labels)
  d = l2(x, r)
  out = []
  for a in range(len(x)):
    ps = [j for j in range(len(r)) if ref_labels[j] == labels[a] and not (own and j == a)]
    ns = [j for j in range(len(r)) if ref_labels[j] != labels[a]]
    if not ps or not ns:
      continue
    p = max(ps, key=lambda j: (d[a, j], -j))
    n = min(ns, key=lambda j: (d[a, j], j))
    if (a, p) not in set(skip_self):
      out.append((a, p, n))
  return out


# ----- cross-batch memory -----

class MemoryReference:
  """Cross-batch memory as a concatenation: every embedding ever enqueued, in order; the
  memory is the last `size` of them, the k-th (from 0) sitting in slot k % size."""

  def __init__(self, size: int):
    self.size = size
    self.history: list[tuple[np.ndarray, int]] = []

  def enqueue(self, x: np.ndarray, labels) -> tuple[np.ndarray, np.ndarray, list]:
    """Adds the batch; returns (reference embeddings, reference labels, self pairs) in slot
    order, the self pairs being (query i, slot of query i's own copy)."""
    start = len(self.history)
    self.history += [(np.asarray(e, np.float64), int(y)) for e, y in zip(x, labels)]
    last = range(max(0, len(self.history) - self.size), len(self.history))
    slots = sorted(last, key=lambda k: k % self.size)
    r = np.stack([self.history[k][0] for k in slots])
    ref_labels = np.array([self.history[k][1] for k in slots])
    skip = [(i, (start + i) % self.size) for i in range(len(x))]
    return r, ref_labels, skip


def numeric_gradient(f, x, h=1e-6, rows=None):
  """Central differences of the float64 function f at x (only `rows`; the rest left 0)."""
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(*x.shape):
    if rows is not None and idx[0] not in rows:
      continue
    up, down = x.copy(), x.copy()
    up[idx] += h
    down[idx] -= h
    g[idx] = (f(up) - f(down)) / (2 * h)
  return g
