"""Proxy and classification losses: proxy_nca, proxy_anchor, normalized_softmax, arcface,
cosface and soft_triple, as pytorch-metric-learning 2.9 computes them (docs/losses.md).

Each loss owns trainable arrays (proxies, a class-weight matrix, SoftTriple's centers): float32
`nnx.Param`s shaped and initialized as PML does (same layout, same distribution), trained with
the model. They are replicated on every device: they are small (classes x embedding_dim), and
every device's copy of the global-batch loss reads all of them, so sharding them would only
add communication. Embeddings and weights are L2-normalized by max(||v||, 1e-12) as
torch.nn.functional.normalize does; all matmuls run at precision HIGHEST in float32.

Every module maps `(embeddings (N, D), labels (N,) in [0, num_classes))` to `(loss, aux)`; aux
holds float32 scalars without gradient: `embedding_mean_sim` (mean cosine similarity over
distinct pairs of the batch), `proxy_pos_sim` (mean similarity of an embedding to its own
class), `proxy_neg_sim` (mean similarity to the other classes) and `proxy_accuracy` (share of
the batch most similar to its own class). The "similarity" to a class is the loss's own:
cosine to the proxy or weight column, SoftTriple's soft-max over the class's centers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hn_jax.losses.registry import register

_HIGHEST = jax.lax.Precision.HIGHEST
# torch.nn.functional.normalize's eps: vectors shorter than this are divided by it.
_NORM_EPS = 1e-12


def _normalize(v: jax.Array, axis: int) -> jax.Array:
  """v / max(||v||, 1e-12) along `axis`, with a finite gradient at v = 0."""
  v = v.astype(jnp.float32)
  # sqrt(max(|v|^2, eps^2)) == max(|v|, eps); the clamp's gradient is 0, as torch's.
  return v / jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=axis, keepdims=True), _NORM_EPS ** 2))


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_HIGHEST)


def _mean_pair_similarity(u: jax.Array) -> jax.Array:
  """Mean of u_i . u_j over i != j (0 for one row): triplet.py's embedding_mean_sim in O(ND).

  sum_{i != j} u_i . u_j = |sum_i u_i|^2 - sum_i |u_i|^2.
  """
  n = u.shape[0]
  total = jnp.sum(u, axis=0)
  pairs = jnp.sum(total * total) - jnp.sum(u * u)
  return pairs / float(max(1, n * (n - 1)))


def _target(values: jax.Array, labels: jax.Array) -> jax.Array:
  """values[i, labels[i]] for each row i."""
  return jnp.take_along_axis(values, labels[:, None], axis=1)[:, 0]


def _aux(u: jax.Array, class_sims: jax.Array, labels: jax.Array,
         **extra: jax.Array) -> dict[str, jax.Array]:
  """The aux dict from normalized embeddings and each row's similarity to every class."""
  c = class_sims.shape[1]
  pos = _target(class_sims, labels)
  neg = (jnp.sum(class_sims, axis=1) - pos) / float(max(1, c - 1))
  aux = {
      "embedding_mean_sim": _mean_pair_similarity(u),
      "proxy_pos_sim": jnp.mean(pos),
      "proxy_neg_sim": jnp.mean(neg),
      "proxy_accuracy": jnp.mean(jnp.argmax(class_sims, axis=1) == labels),
      **extra,
  }
  return {k: jax.lax.stop_gradient(v.astype(jnp.float32)) for k, v in aux.items()}


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-row softmax cross-entropy of integer labels."""
  return jax.nn.logsumexp(logits, axis=1) - _target(logits, labels)


def _check(name: str, *requirements: tuple[bool, str]) -> None:
  """Raises one ValueError line naming the first hyperparameter requirement that fails."""
  for ok, requirement in requirements:
    if not ok:
      raise ValueError(f"loss {name!r} needs {requirement}; fix it in the loss's "
                       f"hyperparameters")


def _check_sizes(name: str, embedding_dim: int, num_classes: int) -> None:
  if embedding_dim < 1 or num_classes < 1:
    raise ValueError(f"loss {name!r} needs embedding_dim >= 1 and num_classes >= 1, got "
                     f"{embedding_dim} and {num_classes}")


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


def _uniform(rngs: nnx.Rngs, shape: tuple[int, ...], bound: float) -> nnx.Param:
  return nnx.Param(jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound))


# ---------------------------------------------------------------------------------------------
# Proxy losses: one proxy per class, proxies (num_classes, D).


class ProxyNCA(nnx.Module):
  """loss = mean_i -log softmax_c(-s * ||u_i - p_c||^2)[y_i], u and p L2-normalized.

  Proxies (num_classes, D) ~ N(0, 1). Rows whose probability underflows to 0 are left out of
  the mean, as PML does (its mean is then NaN; ours is 0). Movshovitz-Attias et al.: "No Fuss
  Distance Metric Learning using Proxies", ICCV 2017.
  """

  kind = "proxy"

  def __init__(self, *, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
               softmax_scale: float = 1.0):
    self.softmax_scale = softmax_scale
    self.proxies = _normal(rngs, (num_classes, embedding_dim), 1.0)

  def __call__(self, embeddings: jax.Array,
               labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    u = _normalize(embeddings, axis=1)
    p = _normalize(self.proxies[...], axis=1)
    cos = _matmul(u, p.T)
    # torch.cdist's expansion, clamped at 0, then squared back (LpDistance(power=2)).
    dist2 = jnp.maximum(jnp.sum(u * u, axis=1)[:, None] + jnp.sum(p * p, axis=1)[None, :]
                        - 2.0 * cos, 0.0)
    log_prob = _target(jax.nn.log_softmax(-self.softmax_scale * dist2, axis=1), labels)
    kept = jnp.exp(log_prob) != 0
    loss = -jnp.sum(jnp.where(kept, log_prob, 0.0)) / jnp.maximum(1, jnp.sum(kept))
    return loss, _aux(u, cos, labels)


class ProxyAnchor(nnx.Module):
  """loss = mean_{p in P+} log(1+sum_{x in p} e^{a(m-s_xp)}) + mean_p log(1+sum_{x notin p} e^{a(m+s_xp)})

  s_xp is the cosine of embedding x and proxy p, P+ the classes present in the batch. Proxies
  (num_classes, D) ~ kaiming_normal fan_out: N(0, 2 / num_classes). Kim, Kim, Cho, Kwak:
  "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020.
  """

  kind = "proxy"

  def __init__(self, *, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
               margin: float = 0.1, alpha: float = 32.0):
    self.margin = margin
    self.alpha = alpha
    self.proxies = _normal(rngs, (num_classes, embedding_dim), math.sqrt(2.0 / num_classes))

  def __call__(self, embeddings: jax.Array,
               labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    u = _normalize(embeddings, axis=1)
    num_classes = self.proxies.shape[0]
    cos = _matmul(u, _normalize(self.proxies[...], axis=1).T)
    positive = labels[:, None] == jnp.arange(num_classes)[None, :]

    def log1p_sum_exp(x, mask):
      """log(1 + sum over masked rows of e^x), per column."""
      x = jnp.where(mask, x, -jnp.inf)
      top = jax.lax.stop_gradient(jnp.maximum(jnp.max(x, axis=0), 0.0))
      return top + jnp.log(jnp.exp(-top) + jnp.sum(jnp.exp(x - top), axis=0))

    pos_term = log1p_sum_exp(self.alpha * (self.margin - cos), positive)
    neg_term = log1p_sum_exp(self.alpha * (cos + self.margin), ~positive)
    num_present = jnp.sum(jnp.any(positive, axis=0))
    loss = jnp.sum(pos_term) / jnp.maximum(1, num_present) + jnp.sum(neg_term) / num_classes
    return loss, _aux(u, cos, labels, proxy_classes_present=num_present)


# ---------------------------------------------------------------------------------------------
# Classification losses: a weight column per class (or per center), W (D, num_classes).


class NormalizedSoftmax(nnx.Module):
  """loss = mean_i CE(cos(u_i, w_c) / T, y_i), w_c the columns of W.

  W (D, num_classes) ~ N(0, 1). Zhai, Wu: "Classification is a Strong Baseline for Deep Metric
  Learning", BMVC 2019.
  """

  kind = "proxy"

  def __init__(self, *, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
               temperature: float = 0.05):
    self.temperature = temperature
    self.W = _normal(rngs, (embedding_dim, num_classes), 1.0)

  def __call__(self, embeddings: jax.Array,
               labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    u = _normalize(embeddings, axis=1)
    cos = _matmul(u, _normalize(self.W[...], axis=0))
    loss = jnp.mean(_cross_entropy(cos / self.temperature, labels))
    return loss, _aux(u, cos, labels)


class _MarginSoftmax(nnx.Module):
  """CE over s * cos(u_i, w_c) with the label's cosine replaced by `label_logit(cos)`;
  w_c is column c of W (D, num_classes) ~ N(0, 1)."""

  kind = "proxy"

  def __init__(self, *, embedding_dim: int, num_classes: int, rngs: nnx.Rngs, margin: float,
               scale: float):
    self.margin = margin
    self.scale = scale
    self.W = _normal(rngs, (embedding_dim, num_classes), 1.0)

  def label_logit(self, cos: jax.Array) -> jax.Array:
    raise NotImplementedError

  def __call__(self, embeddings: jax.Array,
               labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    u = _normalize(embeddings, axis=1)
    cos = _matmul(u, _normalize(self.W[...], axis=0))
    target = self.label_logit(_target(cos, labels))
    loss = _margin_cross_entropy(self.scale * cos, self.scale * target, labels)
    return loss, _aux(u, cos, labels)


class ArcFace(_MarginSoftmax):
  """loss = mean_i CE(s * cos(theta_ic + m [c = y_i]), y_i), theta_ic = angle(u_i, w_c).

  Past theta > 180deg - m the label's logit is s (cos theta - m sin m), which keeps falling.
  w_c is column c of W (D, num_classes) ~ N(0, 1); `margin` in degrees. Deng, Guo, Xue,
  Zafeiriou: "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019.
  """

  def __init__(self, *, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
               margin: float = 28.6, scale: float = 64.0):
    super().__init__(embedding_dim=embedding_dim, num_classes=num_classes, rngs=rngs,
                     margin=margin, scale=scale)

  def label_logit(self, cos: jax.Array) -> jax.Array:
    m = math.radians(self.margin)
    c = jnp.clip(cos, -1.0, 1.0)
    # cos(theta + m) = c cos m - sin(theta) sin m; sin(theta)'s gradient is 0 (not infinite)
    # at theta = 0 or 180deg, where PML's acos gives NaN.
    one_minus = 1.0 - c * c
    sin = jnp.where(one_minus > 0, jnp.sqrt(jnp.where(one_minus > 0, one_minus, 1.0)), 0.0)
    # theta <= pi - m  <=>  cos(theta) >= cos(pi - m) = -cos(m).
    return jnp.where(c >= -math.cos(m), c * math.cos(m) - sin * math.sin(m),
                     c - m * math.sin(m))


class CosFace(_MarginSoftmax):
  """loss = mean_i CE(s * (cos(u_i, w_c) - m [c = y_i]), y_i).

  w_c is column c of W (D, num_classes) ~ N(0, 1). Wang et al.: "CosFace: Large Margin Cosine
  Loss for Deep Face Recognition", CVPR 2018.
  """

  def __init__(self, *, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
               margin: float = 0.35, scale: float = 64.0):
    super().__init__(embedding_dim=embedding_dim, num_classes=num_classes, rngs=rngs,
                     margin=margin, scale=scale)

  def label_logit(self, cos: jax.Array) -> jax.Array:
    return cos - self.margin


def _margin_cross_entropy(logits: jax.Array, target: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy of `logits` with each row's label logit replaced by `target`."""
  own = labels[:, None] == jnp.arange(logits.shape[1])[None, :]
  logits = jnp.where(own, target[:, None], logits)
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - target)


class SoftTriple(nnx.Module):
  """loss = mean_i CE(la (S_ic - margin [c = y_i]), y_i), S_ic = sum_k softmax_k(s_ick/gamma) s_ick

  s_ick is the cosine of u_i and center k of class c. Centers: fc (D, num_classes * K), K =
  centers_per_class, column c * K + k is center k of class c, ~ kaiming_uniform(a=sqrt(5)) as
  PML: U(-b, b), b = 1 / sqrt(num_classes * K). No center regularizer (PML has none). Qian et
  al.: "SoftTriple Loss: Deep Metric Learning Without Triplet Sampling", ICCV 2019.
  """

  kind = "proxy"

  def __init__(self, *, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
               centers_per_class: int = 10, la: float = 20.0, gamma: float = 0.1,
               margin: float = 0.01):
    self.centers_per_class = centers_per_class
    self.la = la
    self.gamma = gamma
    self.margin = margin
    columns = num_classes * centers_per_class
    self.fc = _uniform(rngs, (embedding_dim, columns), 1.0 / math.sqrt(columns))

  def __call__(self, embeddings: jax.Array,
               labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    u = _normalize(embeddings, axis=1)
    sims = _matmul(u, _normalize(self.fc[...], axis=0))
    sims = sims.reshape(u.shape[0], -1, self.centers_per_class)
    weights = jax.nn.softmax(sims / self.gamma, axis=2)
    class_sims = jnp.sum(weights * sims, axis=2)
    own = labels[:, None] == jnp.arange(class_sims.shape[1])[None, :]
    logits = self.la * (class_sims - jnp.where(own, self.margin, 0.0))
    loss = jnp.mean(_cross_entropy(logits, labels))
    return loss, _aux(u, class_sims, labels)


# ---------------------------------------------------------------------------------------------
# Factories: PML's hyperparameter names and defaults, checked before anything is built.


def proxy_nca(*, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
              softmax_scale: float = 1.0) -> ProxyNCA:
  _check_sizes("proxy_nca", embedding_dim, num_classes)
  _check("proxy_nca", (softmax_scale > 0, f"softmax_scale > 0, got {softmax_scale}"))
  return ProxyNCA(embedding_dim=embedding_dim, num_classes=num_classes, rngs=rngs,
                  softmax_scale=float(softmax_scale))


def proxy_anchor(*, embedding_dim: int, num_classes: int, rngs: nnx.Rngs, margin: float = 0.1,
                 alpha: float = 32.0) -> ProxyAnchor:
  _check_sizes("proxy_anchor", embedding_dim, num_classes)
  _check("proxy_anchor", (alpha > 0, f"alpha > 0, got {alpha}"))
  return ProxyAnchor(embedding_dim=embedding_dim, num_classes=num_classes, rngs=rngs,
                     margin=float(margin), alpha=float(alpha))


def normalized_softmax(*, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
                       temperature: float = 0.05) -> NormalizedSoftmax:
  _check_sizes("normalized_softmax", embedding_dim, num_classes)
  _check("normalized_softmax", (temperature > 0, f"temperature > 0, got {temperature}"))
  return NormalizedSoftmax(embedding_dim=embedding_dim, num_classes=num_classes, rngs=rngs,
                           temperature=float(temperature))


def arcface(*, embedding_dim: int, num_classes: int, rngs: nnx.Rngs, margin: float = 28.6,
            scale: float = 64.0) -> ArcFace:
  _check_sizes("arcface", embedding_dim, num_classes)
  _check("arcface", (0 <= margin < 180, f"margin in degrees in [0, 180), got {margin}"),
         (scale > 0, f"scale > 0, got {scale}"))
  return ArcFace(embedding_dim=embedding_dim, num_classes=num_classes, rngs=rngs,
                 margin=float(margin), scale=float(scale))


def cosface(*, embedding_dim: int, num_classes: int, rngs: nnx.Rngs, margin: float = 0.35,
            scale: float = 64.0) -> CosFace:
  _check_sizes("cosface", embedding_dim, num_classes)
  _check("cosface", (scale > 0, f"scale > 0, got {scale}"))
  return CosFace(embedding_dim=embedding_dim, num_classes=num_classes, rngs=rngs,
                 margin=float(margin), scale=float(scale))


def soft_triple(*, embedding_dim: int, num_classes: int, rngs: nnx.Rngs,
                centers_per_class: int = 10, la: float = 20.0, gamma: float = 0.1,
                margin: float = 0.01) -> SoftTriple:
  _check_sizes("soft_triple", embedding_dim, num_classes)
  _check("soft_triple",
         (float(centers_per_class).is_integer() and centers_per_class >= 1,
          f"an integer centers_per_class >= 1, got {centers_per_class}"),
         (la > 0, f"la > 0, got {la}"), (gamma > 0, f"gamma > 0, got {gamma}"))
  return SoftTriple(embedding_dim=embedding_dim, num_classes=num_classes, rngs=rngs,
                    centers_per_class=int(centers_per_class), la=float(la),
                    gamma=float(gamma), margin=float(margin))


# What a study searches (hn_jax.tools.study): ranges around each paper's setting, in the spirit
# of the Metric Learning Reality Check's; the learning rate is the study's default range.
SEARCH_SPACES = {
    "proxy_nca": {"softmax_scale": (1.0, 64.0, "log")},
    "proxy_anchor": {"margin": (0.0, 0.5, "linear"), "alpha": (1.0, 128.0, "log")},
    "normalized_softmax": {"temperature": (0.01, 1.0, "log")},
    "arcface": {"margin": (5.0, 60.0, "linear"), "scale": (8.0, 100.0, "log")},
    "cosface": {"margin": (0.05, 0.6, "linear"), "scale": (8.0, 100.0, "log")},
    "soft_triple": {"la": (1.0, 100.0, "log"), "gamma": (0.01, 1.0, "log"),
                    "margin": (0.0, 0.5, "linear")},
}
for _factory in (proxy_nca, proxy_anchor, normalized_softmax, arcface, cosface, soft_triple):
  _factory.kind = "proxy"  # neither miners nor cross-batch memory (hn_jax.losses.build)
  register(_factory.__name__, _factory, search_space=SEARCH_SPACES[_factory.__name__])
