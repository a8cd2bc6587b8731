"""Triplet losses with batch-hard mining: hn, shn and sct (docs/protocol.md section 1).

Every anchor takes its *easiest* positive and its *hardest* (for `shn`: hardest semi-hard)
negative from the whole batch it is given. Called on the global batch inside a jitted,
data-parallel step, the mining sees every device's images, exactly as on one device.

- hn:  mean over valid anchors of softplus((neg - pos) / t).
- shn: the same, with only negatives no more similar than the positive eligible.
- sct: softplus on easy triplets; on hard ones only `lam * neg`, pushing the negative away
  and leaving the positive alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hn_jax.losses.registry import register

METHODS = ("hn", "shn", "sct")

# Positives more similar than this are near-identical copies and are skipped.
DUPLICATE_SIMILARITY = 0.9999
# Masked-out candidates read as this similarity; an anchor whose choice is this is invalid.
_MASKED = -1.0


def cosine_similarities(embeddings: jax.Array) -> jax.Array:
  """Row-normalized (max(||f||, 1e-12)) float32 embeddings' similarity matrix.

  In float32 on every backend (precision HIGHEST): at default precision TPUs multiply float32
  in one bfloat16 pass and recent GPUs in TF32, which would decide the duplicate cut, the
  hardest negative and its ties on similarities rounded to 3 digits, unlike the release.
  """
  f = embeddings.astype(jnp.float32)
  # sqrt(max(|f|^2, eps^2)) == max(|f|, eps), with a finite gradient at f = 0.
  norm = jnp.sqrt(jnp.maximum(jnp.sum(f * f, axis=1, keepdims=True), 1e-24))
  u = f / norm
  return jnp.matmul(u, u.T, precision=jax.lax.Precision.HIGHEST)


def triplet_terms(pos: jax.Array, neg: jax.Array, *, method: str = "sct", lam: float = 1.0,
                  temperature: float = 0.1,
                  hard_threshold: float = 0.8) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each triplet's term of the loss of `method`, from its positive and negative similarity.

  Elementwise over `pos` and `neg` (any equal shapes). Returns (term, hard, easy): hn and
  shn's term is softplus((neg - pos) / t); sct's is that on easy triplets, `lam * neg` on
  hard ones (neg > pos or neg > hard_threshold) and 0 on neither (neg == pos).
  """
  contrastive = jax.nn.softplus((neg - pos) / temperature)
  hard = (neg > pos) | (neg > hard_threshold)
  easy = (neg < pos) & (neg < hard_threshold)
  if method == "sct":
    term = jnp.where(easy, contrastive, 0.0) + lam * jnp.where(hard, neg, 0.0)
  else:
    term = contrastive
  return term, hard, easy


def triplet_loss(embeddings: jax.Array, labels: jax.Array, *, method: str = "sct",
                 lam: float = 1.0, temperature: float = 0.1,
                 hard_threshold: float = 0.8) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The batch-hard triplet loss of `method` ("hn", "shn" or "sct").

  Args:
    embeddings: (N, D) unnormalized embeddings; any float dtype, computed in float32.
    labels: (N,) integer class labels.
    method: "hn" (hardest negative), "shn" (hardest semi-hard negative) or "sct"
      (selectively contrastive).
    lam: weight of the hard-triplet term of sct.
    temperature: the softmax temperature t.
    hard_threshold: sct counts a triplet as hard when its negative similarity exceeds this.

  Returns:
    (loss, aux): the scalar loss and float32 scalars `hn_ratio` (share of valid anchors whose
    negative is more similar than their positive), `num_valid`, `num_hard`, `num_easy`
    (sct's split, reported for every method), `pos_sim`, `neg_sim` (means over valid
    anchors) and `embedding_mean_sim` (mean cosine similarity over distinct pairs: near 1
    when the embedding collapses).
  """
  if method not in METHODS:
    raise ValueError(f"unknown loss method {method!r}; choose one of {', '.join(METHODS)}")
  n = embeddings.shape[0]
  sims = cosine_similarities(embeddings)
  eye = jnp.eye(n, dtype=bool)
  sims = jnp.where(eye, _MASKED, sims)
  fixed = jax.lax.stop_gradient(sims)

  same = labels[:, None] == labels[None, :]
  pos_ok = same & ~eye & (fixed <= DUPLICATE_SIMILARITY)
  pos_candidates = jnp.where(pos_ok, fixed, _MASKED)
  pos_idx = jnp.argmax(pos_candidates, axis=1)
  pos_value = jnp.max(pos_candidates, axis=1)

  neg_ok = ~same
  if method == "shn":
    neg_ok = neg_ok & (fixed <= pos_value[:, None])
  neg_candidates = jnp.where(neg_ok, fixed, _MASKED)
  neg_idx = jnp.argmax(neg_candidates, axis=1)
  neg_value = jnp.max(neg_candidates, axis=1)

  valid = (pos_value > -1) & (pos_value < 1) & (neg_value > -1) & (neg_value < 1)
  pos = jnp.take_along_axis(sims, pos_idx[:, None], axis=1)[:, 0]
  neg = jnp.take_along_axis(sims, neg_idx[:, None], axis=1)[:, 0]

  term, hard, easy = triplet_terms(pos, neg, method=method, lam=lam, temperature=temperature,
                                   hard_threshold=hard_threshold)
  hard = valid & hard
  easy = valid & easy
  num_valid = jnp.sum(valid)
  num_hard = jnp.sum(hard)
  num_easy = jnp.sum(easy)

  total = jnp.sum(jnp.where(valid, term, 0.0))
  if method == "sct":
    loss = total / jnp.maximum(1, num_easy + num_hard)
  else:
    loss = total / jnp.maximum(1, num_valid)

  per_valid = jnp.maximum(1, num_valid).astype(jnp.float32)
  off_diagonal = jnp.sum(jnp.where(eye, 0.0, fixed)) / float(max(1, n * (n - 1)))
  aux = {
      "hn_ratio": jnp.sum(valid & (neg > pos)) / per_valid,
      "num_valid": num_valid.astype(jnp.float32),
      "num_hard": num_hard.astype(jnp.float32),
      "num_easy": num_easy.astype(jnp.float32),
      "pos_sim": jnp.sum(jnp.where(valid, pos, 0.0)) / per_valid,
      "neg_sim": jnp.sum(jnp.where(valid, neg, 0.0)) / per_valid,
      "embedding_mean_sim": off_diagonal,
  }
  aux = {k: jax.lax.stop_gradient(v) for k, v in aux.items()}
  return loss, aux


class BatchHardTriplet(nnx.Module):
  """The paper's loss of `method` (hn, shn or sct) as a module: `triplet_loss` of the batch.

  loss = mean over valid anchors of softplus((S_an - S_ap) / temperature) with the easiest
  positive and the hardest (shn: hardest semi-hard) negative; sct replaces the term of a hard
  triplet by lam * S_an. Xuan, Stylianou, Liu, Pless: "Hard negative examples are hard, but
  useful", ECCV 2020.
  """

  def __init__(self, method: str, *, lam: float = 1.0, temperature: float = 0.1,
               hard_threshold: float = 0.8):
    self.method = method
    self.lam = lam
    self.temperature = temperature
    self.hard_threshold = hard_threshold

  def __call__(self, embeddings: jax.Array,
               labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    return triplet_loss(embeddings, labels, method=self.method, lam=self.lam,
                        temperature=self.temperature, hard_threshold=self.hard_threshold)


def _paper_factory(method: str):
  def factory(*, embedding_dim: int, num_classes: int, rngs: nnx.Rngs, lam: float = 1.0,
              temperature: float = 0.1, hard_threshold: float = 0.8) -> BatchHardTriplet:
    del embedding_dim, num_classes, rngs  # nothing trainable
    return BatchHardTriplet(method, lam=lam, temperature=temperature,
                            hard_threshold=hard_threshold)
  factory.__name__ = f"{method}_loss"
  return factory


# What a study searches (hn_jax.tools.study): the temperature around the paper's 0.1, sct's
# weight around its 1, and the learning rate of plain SGD around the rates the paper's
# configs use.
_SEARCH_SPACE = {"learning_rate": (0.03, 3.0, "log"), "temperature": (0.03, 0.3, "log")}
for _method in METHODS:
  register(_method, _paper_factory(_method),
           search_space=dict(_SEARCH_SPACE, **({"lam": (0.25, 4.0, "log")}
                                                if _method == "sct" else {})))
