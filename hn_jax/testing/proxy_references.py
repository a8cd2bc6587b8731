"""Float64 NumPy references for the proxy and classification losses (hn_jax/losses/proxies.py).

Written from each paper's formula, one sample (or one class) at a time, with
pytorch-metric-learning's conventions where the paper leaves a choice: vectors normalized by
max(||v||, 1e-12), weight layouts (proxies (C, D); W and SoftTriple's centers (D, C * K)),
ArcFace's fallback past 180deg - m. `numerical_gradient` differentiates any of them.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

EPS = 1e-12


def unit(v: np.ndarray) -> np.ndarray:
  """v / max(||v||, 1e-12) for one vector."""
  v = np.asarray(v, np.float64)
  return v / max(math.sqrt(float(v @ v)), EPS)


def log_sum_exp(values) -> float:
  values = np.asarray(values, np.float64)
  top = values.max()
  return float(top + math.log(np.exp(values - top).sum()))


def softmax_cross_entropy(logits, label: int) -> float:
  """-log(e^{z_label} / sum_c e^{z_c})."""
  return log_sum_exp(logits) - float(logits[label])


def proxy_nca(x, y, proxies, *, softmax_scale: float = 1.0) -> float:
  """Movshovitz-Attias et al. 2017: -log(e^{-s d(x, p_y)} / sum_c e^{-s d(x, p_c)}), d the
  squared Euclidean distance of the normalized x and proxies; mean over the samples whose
  probability is not 0."""
  p = np.array([unit(row) for row in proxies])
  terms = []
  for xi, yi in zip(x, y):
    diff = unit(xi)[None, :] - p
    logits = -softmax_scale * (diff * diff).sum(axis=1)
    prob = math.exp(logits[yi] - logits.max()) / np.exp(logits - logits.max()).sum()
    if prob != 0:
      terms.append(softmax_cross_entropy(logits, yi))
  return float(np.mean(terms))


def proxy_anchor(x, y, proxies, *, margin: float = 0.1, alpha: float = 32.0) -> float:
  """Kim et al. 2020, eq. 4, one proxy at a time: positive part averaged over the proxies of
  classes in the batch, negative part over all proxies."""
  u = np.array([unit(row) for row in x])
  y = np.asarray(y)
  pos_total = neg_total = 0.0
  for c, pc in enumerate(proxies):
    s = u @ unit(pc)
    pos, neg = s[y == c], s[y != c]
    if len(pos):
      pos_total += math.log1p(np.exp(-alpha * (pos - margin)).sum())
    neg_total += math.log1p(np.exp(alpha * (neg + margin)).sum())
  return pos_total / len(set(y.tolist())) + neg_total / len(proxies)


def _column_cosines(xi, w) -> np.ndarray:
  """Cosine of the vector xi and each column of w."""
  w = np.asarray(w, np.float64)
  return (w.T @ unit(xi)) / np.maximum(np.sqrt((w * w).sum(axis=0)), EPS)


def normalized_softmax(x, y, w, *, temperature: float = 0.05) -> float:
  """Zhai & Wu 2019: cross-entropy of cos(x, w_c) / T, w_c the columns of W."""
  return float(np.mean([softmax_cross_entropy(_column_cosines(xi, w) / temperature, yi)
                        for xi, yi in zip(x, y)]))


def arcface(x, y, w, *, margin: float = 28.6, scale: float = 64.0) -> float:
  """Deng et al. 2019, eq. 3: s cos(theta_y + m) for the label, s cos(theta_c) elsewhere; past
  theta_y > pi - m, s (cos theta_y - m sin m). `margin` in degrees."""
  m = math.radians(margin)
  terms = []
  for xi, yi in zip(x, y):
    cos = _column_cosines(xi, w)
    theta = math.acos(min(1.0, max(-1.0, cos[yi])))
    logits = scale * cos
    if theta <= math.pi - m:
      logits[yi] = scale * math.cos(theta + m)
    else:
      logits[yi] = scale * (math.cos(theta) - m * math.sin(m))
    terms.append(softmax_cross_entropy(logits, yi))
  return float(np.mean(terms))


def cosface(x, y, w, *, margin: float = 0.35, scale: float = 64.0) -> float:
  """Wang et al. 2018, eq. 4: s (cos theta_y - m) for the label, s cos theta_c elsewhere."""
  terms = []
  for xi, yi in zip(x, y):
    cos = _column_cosines(xi, w)
    logits = scale * cos
    logits[yi] = scale * (cos[yi] - margin)
    terms.append(softmax_cross_entropy(logits, yi))
  return float(np.mean(terms))


def soft_triple(x, y, fc, *, centers_per_class: int = 10, la: float = 20.0,
                gamma: float = 0.1, margin: float = 0.01) -> float:
  """Qian et al. 2019, eqs. 7-9 (without the center regularizer): S_c = sum_k
  softmax_k(s_k / gamma) s_k over class c's centers (columns c * K + k of fc); cross-entropy
  of la * (S_c - margin [c = y])."""
  num_classes = fc.shape[1] // centers_per_class
  terms = []
  for xi, yi in zip(x, y):
    s = _column_cosines(xi, fc).reshape(num_classes, centers_per_class)  # class c's row
    weights = np.exp(s / gamma - (s / gamma).max(axis=1, keepdims=True))
    relaxed = (weights * s).sum(axis=1) / weights.sum(axis=1)
    logits = la * relaxed
    logits[yi] -= la * margin
    terms.append(softmax_cross_entropy(logits, yi))
  return float(np.mean(terms))


REFERENCES: dict[str, Callable[..., float]] = {
    "proxy_nca": proxy_nca, "proxy_anchor": proxy_anchor,
    "normalized_softmax": normalized_softmax, "arcface": arcface, "cosface": cosface,
    "soft_triple": soft_triple,
}


def numerical_gradient(f: Callable[[np.ndarray], float], a: np.ndarray,
                       h: float = 1e-6) -> np.ndarray:
  """Central differences of f at a (float64). Rows of a that are 0 step by 1e-18 instead:
  below the normalization's eps, where x / 1e-12 is linear, so the step stays inside it."""
  a = np.asarray(a, np.float64)
  grad = np.zeros_like(a)
  zero_rows = ~np.any(a != 0, axis=-1)
  for idx in np.ndindex(*a.shape):
    step = 1e-18 if a.ndim == 2 and zero_rows[idx[0]] else h
    plus, minus = a.copy(), a.copy()
    plus[idx] += step
    minus[idx] -= step
    grad[idx] = (f(plus) - f(minus)) / (2 * step)
  return grad
