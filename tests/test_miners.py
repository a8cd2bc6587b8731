"""Miners against float64 references: the pairs and triplets they pick, and losses over them
(value and gradient), with PML's conversions between pairs and triplets."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hn_jax import losses
from hn_jax.losses import miners
from hn_jax.losses.triplet_margin import window_mask
from hn_jax.testing import loss_references as R

N, D, M = 12, 6, 16
ROWS = (0, 5, 10, 11)  # rows whose gradient is checked by finite differences

MINERS = {
    "multi_similarity": ("multi_similarity", dict(epsilon=0.2), R.multi_similarity_miner),
    "triplet_margin/all": ("triplet_margin", dict(margin=0.3), R.triplet_margin_miner),
    "triplet_margin/hard": ("triplet_margin", dict(margin=0.3, type_of_triplets="hard"),
                            R.triplet_margin_miner),
    "triplet_margin/semihard": ("triplet_margin",
                                dict(margin=0.4, type_of_triplets="semihard"),
                                R.triplet_margin_miner),
    "triplet_margin/easy": ("triplet_margin", dict(margin=0.1, type_of_triplets="easy"),
                            R.triplet_margin_miner),
    "batch_hard": ("batch_hard", {}, R.batch_hard_miner),
}


def _data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N, D)).astype(np.float32)
  y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3])
  r = rng.normal(size=(M, D)).astype(np.float32)
  r[:N] = x  # a memory-like reference: holds the batch and 4 others
  ry = np.concatenate([y, [0, 1, 3, 2]])
  return x, y, r, ry


@functools.cache
def _miner(key):
  name, params, _ = MINERS[key]
  miner = miners.create_miner(name, **params)

  @jax.jit
  def own(x, y):
    return miner(x, y, x, y, exclude=jnp.eye(x.shape[0], dtype=bool))

  @jax.jit
  def with_reference(x, y, r, ry, remove):
    return miner(x, y, r, ry, remove=remove)
  return own, with_reference


def _counts(pairs, shape):
  out = np.zeros(shape)
  for i, j in pairs:
    out[i, j] += 1
  return out


def _triplets(tuples, x, r):
  d = R.l2(x, r)
  tpos, tneg = np.asarray(tuples.tpos), np.asarray(tuples.tneg)
  out = set()
  for a, p in zip(*np.nonzero(tpos)):
    for n in np.nonzero(tneg[a])[0]:
      if bool(window_mask(jnp.asarray(d[a, n] - d[a, p]), tuples.window)):
        out.add((int(a), int(p), int(n)))
  return out


@pytest.mark.parametrize("key", sorted(MINERS))
@pytest.mark.parametrize("reference", [False, True])
def test_miner_picks_the_reference_tuples(key, reference):
  _, params, ref_miner = MINERS[key]
  x, y, r, ry = _data(seed=len(key))
  own, with_reference = _miner(key)
  if reference:
    skip = [(i, i) for i in range(N)]
    remove = np.zeros((N, M), bool)
    remove[np.arange(N), np.arange(N)] = True
    tuples = with_reference(x, y, r, ry, remove)
    expected = ref_miner(x, list(y), r, list(ry), skip_self=skip, **params)
  else:
    r, ry = x, y
    tuples = own(x, y)
    expected = ref_miner(x, list(y), **params)
  if key == "multi_similarity":
    pos, neg = expected
    triplets = set(R.pairs_to_triplets(pos, neg))
  else:
    triplets = set(expected)
    pos, neg = R.triplets_to_pairs(expected)
    assert len(expected) > 0
  shape = (N, len(r))
  np.testing.assert_array_equal(np.asarray(tuples.pos), _counts(pos, shape))
  np.testing.assert_array_equal(np.asarray(tuples.neg), _counts(neg, shape))
  assert _triplets(tuples, x, r) == triplets


# loss, its hyperparameters, miner key, how the reference loss reads the miner's output
COMBOS = [
    ("contrastive", dict(neg_margin=1.2), "triplet_margin/all", "pairs"),
    ("lifted_structure", {}, "triplet_margin/semihard", "pairs"),
    ("ntxent", dict(temperature=0.5), "batch_hard", "pairs"),
    ("multi_similarity", dict(beta=10.0), "multi_similarity", "pairs"),
    ("triplet_margin", dict(margin=0.2), "multi_similarity", "triplets"),
    ("triplet_margin", dict(margin=0.5), "triplet_margin/easy", "triplets"),
    ("margin", {}, "triplet_margin/hard", "triplets"),
]


@pytest.mark.parametrize("loss_name, params, miner_key, view", COMBOS)
def test_loss_over_mined_tuples_matches_reference(loss_name, params, miner_key, view):
  miner_name, miner_params, ref_miner = MINERS[miner_key]
  module = losses.build(loss_name, embedding_dim=D, num_classes=4, rngs=nnx.Rngs(0),
                        loss_params=params, miner=miner_name, miner_params=miner_params)
  x, y, _, _ = _data(seed=7)
  value, grad = jax.jit(jax.value_and_grad(lambda e: module(e, jnp.asarray(y))[0]))(x)
  mined = ref_miner(x, list(y), **miner_params)
  if miner_key == "multi_similarity":
    pos, neg = mined
    triplets = R.pairs_to_triplets(pos, neg)
  else:
    triplets = mined
    pos, neg = R.triplets_to_pairs(mined)
  fn = getattr(R, loss_name)
  if view == "pairs":
    ref = lambda e: fn(e, e, pos, neg, **params)  # noqa: E731
  elif loss_name == "margin":
    ref = lambda e: fn(e, e, triplets, list(y), **params)  # noqa: E731
  else:
    ref = lambda e: fn(e, e, triplets, **params)  # noqa: E731
  expected = ref(x)
  assert expected != 0.0
  np.testing.assert_allclose(float(value), expected, rtol=2e-5, atol=2e-6)
  expected_grad = R.numeric_gradient(ref, x, rows=ROWS)[list(ROWS)]
  np.testing.assert_allclose(np.asarray(grad)[list(ROWS)], expected_grad,
                             atol=2e-4 * max(1.0, np.abs(expected_grad).max()))


def test_unknown_miner_and_type_are_refused():
  with pytest.raises(ValueError, match="unknown miner 'x'; use one of multi_similarity"):
    miners.create_miner("x")
  with pytest.raises(ValueError, match="type_of_triplets 'medium'"):
    miners.create_miner("triplet_margin", type_of_triplets="medium")
  assert miners.miner_parameters("triplet_margin") == dict(margin=0.2, type_of_triplets="all")
  assert miners.miner_parameters("multi_similarity") == dict(epsilon=0.1)
  assert miners.miner_parameters("batch_hard") == {}
