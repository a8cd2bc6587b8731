"""The pair and triplet losses against float64 references (hn_jax/testing/loss_references.py):
value and gradient on random batches and edge cases; registry names and defaults; check()."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hn_jax import losses
from hn_jax.testing import loss_references as R

N, D = 12, 6


def _pairs(fn):
  return lambda x, y, p: fn(x, x, *R.all_pairs(list(y)), **p)


def _triplets(fn):
  return lambda x, y, p: fn(x, x, R.pairs_to_triplets(*R.all_pairs(list(y))), **p)


# name -> (hyperparameters other than the defaults, the reference of the whole batch)
CASES = {
    "contrastive": (dict(pos_margin=0.3, neg_margin=1.2), _pairs(R.contrastive)),
    "snr_contrastive": (dict(pos_margin=0.5, neg_margin=1.5), _pairs(R.snr_contrastive)),
    "multi_similarity": (dict(alpha=2.5, beta=10.0, base=0.3), _pairs(R.multi_similarity)),
    "circle": (dict(m=0.3, gamma=16.0), _pairs(R.circle)),
    "lifted_structure": (dict(neg_margin=1.1, pos_margin=0.2), _pairs(R.lifted_structure)),
    "generalized_lifted_structure": (dict(neg_margin=1.3, pos_margin=0.1),
                                     _pairs(R.generalized_lifted_structure)),
    "ntxent": (dict(temperature=0.3), _pairs(R.ntxent)),
    "supcon": (dict(temperature=0.2), _pairs(R.supcon)),
    "fast_ap": (dict(num_bins=7), lambda x, y, p: R.fast_ap(x, list(y), **p)),
    "triplet_margin": (dict(margin=0.3), _triplets(R.triplet_margin)),
    "triplet_margin/swap": (dict(margin=0.3, swap=True), _triplets(R.triplet_margin)),
    "triplet_margin/smooth": (dict(margin=0.1, smooth_loss=True), _triplets(R.triplet_margin)),
    "margin": (dict(margin=0.3, beta=1.0),
               lambda x, y, p: R.margin(x, x, R.pairs_to_triplets(*R.all_pairs(list(y))),
                                        list(y), **p)),
}

DEFAULTS = {
    "contrastive": dict(pos_margin=0.0, neg_margin=1.0),
    "snr_contrastive": dict(pos_margin=0.0, neg_margin=1.0),
    "multi_similarity": dict(alpha=2.0, beta=50.0, base=0.5),
    "circle": dict(m=0.4, gamma=80.0),
    "lifted_structure": dict(neg_margin=1.0, pos_margin=0.0),
    "generalized_lifted_structure": dict(neg_margin=1.0, pos_margin=0.0),
    "ntxent": dict(temperature=0.07),
    "supcon": dict(temperature=0.1),
    "fast_ap": dict(num_bins=10),
    "triplet_margin": dict(margin=0.05, swap=False, smooth_loss=False,
                           triplets_per_anchor="all"),
    "margin": dict(margin=0.2, nu=0.0, beta=1.2, triplets_per_anchor="all", learn_beta=False),
}

KINDS = {"triplet_margin": "triplet", "margin": "triplet", "fast_ap": "other", "hn": "other",
         "shn": "other", "sct": "other",
         **dict.fromkeys(["proxy_nca", "proxy_anchor", "normalized_softmax", "arcface", "cosface",
                          "soft_triple"], "proxy")}


def _batch(case: str, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N, D)).astype(np.float32)
  y = np.repeat(np.arange(3), 4)
  if case == "singleton":  # class 3 has one image
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3])
  elif case == "one_class":
    y = np.zeros(N, int)
  elif case == "ties":  # duplicate rows inside a class and across classes
    x[1] = x[0]
    x[6] = x[5]
    x[9] = x[2]
  elif case == "zeros":
    x[3] = 0.0
    x[10] = 0.0
  return x, y


@functools.cache
def _compiled(key: str):
  """One jitted value-and-gradient per loss configuration, reused by every case."""
  name = key.split("/")[0]
  module = losses.create(name, embedding_dim=D, num_classes=4, rngs=nnx.Rngs(0),
                         **CASES[key][0])

  @jax.jit
  def run(x, y):
    (value, aux), grad = jax.value_and_grad(lambda e: module(e, y), has_aux=True)(x)
    return value, grad, aux
  return run


def _run(key, x, y):
  """(loss, gradient) of the loss configuration `key` at (x, y)."""
  return _compiled(key)(jnp.asarray(x), jnp.asarray(y))[:2]


# The rows whose gradient is checked by finite differences (a sample of each class, the
# singleton class's only image): every row would cost 4x the time for little more.
ROWS = (0, 5, 10, 11)


def _reference(key, x, y):
  params = dict(CASES[key][0])
  if key == "circle":  # the weights are constants of the base point
    pairs = R.all_pairs(list(y))
    fn = lambda e: R.circle(e, e, *pairs, weight_sims=R.cos(x, x), **params)  # noqa: E731
  else:
    fn = lambda e: CASES[key][1](e, y, params)  # noqa: E731
  return fn


@pytest.mark.parametrize("key", sorted(CASES))
@pytest.mark.parametrize("case", ["random", "singleton"])
def test_value_and_gradient_match_reference(key, case):
  x, y = _batch(case, seed=zlib.crc32(f"{key}{case}".encode()) % 1000)
  value, grad = _run(key, x, y)
  fn = _reference(key, x, y)
  expected = fn(x)
  np.testing.assert_allclose(float(value), expected, rtol=2e-5, atol=2e-6)
  expected_grad = R.numeric_gradient(fn, x, rows=ROWS)[list(ROWS)]
  scale = max(1.0, np.abs(expected_grad).max())
  np.testing.assert_allclose(np.asarray(grad)[list(ROWS)], expected_grad, rtol=0,
                             atol=2e-4 * scale)


# The SNR distance divides by a zero row's variance (NaN, as in PML): no zeros case for it.
EDGE_CASES = [(key, case) for key in sorted(CASES) for case in ("ties", "zeros", "one_class")
              if (key, case) != ("snr_contrastive", "zeros")]


@pytest.mark.parametrize("key, case", EDGE_CASES)
def test_edge_case_values_match_reference(key, case):
  x, y = _batch(case, seed=3)
  value, grad = _run(key, x, y)
  np.testing.assert_allclose(float(value), _reference(key, x, y)(x), rtol=2e-5, atol=2e-6)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_one_class_batch_has_zero_loss_where_no_negatives():
  x, y = _batch("one_class")
  for key in ("contrastive", "multi_similarity", "ntxent", "supcon", "triplet_margin",
              "margin", "circle", "lifted_structure"):
    value, grad = _run(key, x, y)
    if key == "contrastive":  # its positive part stays
      assert float(value) > 0
    elif key != "multi_similarity":
      assert float(value) == 0.0, key
    assert np.all(np.isfinite(np.asarray(grad)))


def test_learned_margin_beta_value_and_gradients():
  x, y = _batch("random", seed=5)
  y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
  module = losses.create("margin", embedding_dim=D, num_classes=4, rngs=nnx.Rngs(0),
                         learn_beta=True, nu=0.3, beta=0.9)
  betas = np.array([0.8, 1.0, 1.1, 0.95])
  module.beta[...] = jnp.asarray(betas, jnp.float32)
  graph, params = nnx.split(module, nnx.Param)

  def f(e, p):
    return nnx.merge(graph, p)(e, jnp.asarray(y))[0]
  value, (gx, gp) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(jnp.asarray(x), params)
  triplets = R.pairs_to_triplets(*R.all_pairs(list(y)))
  ref = lambda e, b: R.margin(e, e, triplets, list(y), margin=0.2, nu=0.3, beta=b,  # noqa: E731
                              learn_beta=True)
  np.testing.assert_allclose(float(value), ref(x, betas), rtol=2e-5)
  np.testing.assert_allclose(np.asarray(gx), R.numeric_gradient(lambda e: ref(e, betas), x),
                             atol=2e-4)
  grad_beta = R.numeric_gradient(lambda b: ref(x, b[0]), betas[None])[0]
  np.testing.assert_allclose(np.asarray(gp["beta"][...]), grad_beta, atol=2e-4)


def test_registered_with_pml_names_defaults_and_kinds():
  for name, defaults in DEFAULTS.items():
    assert losses.hyperparameters(name) == defaults, name
  for name in losses.NAMES:
    if losses.registry.factory_of(name).__module__.startswith("hn_jax.losses"):  # built in
      assert losses.kind(name) == KINDS.get(name, "pair"), name


def test_aux_reports_collapse_and_hard_negatives():
  x, y = _batch("random")
  for name in ("contrastive", "triplet_margin"):
    module = lambda e, labels: _compiled(name)(e, labels)[::2]  # noqa: E731  (loss, aux)
    _, aux = module(jnp.asarray(x), jnp.asarray(y))
    s = R.cos(x, x)
    mean_sim = (s.sum() - np.trace(s)) / (N * (N - 1))
    np.testing.assert_allclose(float(aux["embedding_mean_sim"]), mean_sim, atol=1e-6)
    hard = [max(s[i, j] for j in range(N) if y[j] != y[i])
            > max(s[i, j] for j in range(N) if y[j] == y[i] and j != i) for i in range(N)]
    np.testing.assert_allclose(float(aux["hn_ratio"]), np.mean(hard), atol=1e-6)
    collapsed = np.tile(x[:1], (N, 1))
    _, aux = module(jnp.asarray(collapsed), jnp.asarray(y))
    assert float(aux["embedding_mean_sim"]) > 0.999
    assert all(v.dtype == jnp.float32 and v.shape == () for v in aux.values())


@pytest.mark.parametrize("args, words", [
    (("nope", None, "", None, 0), ["unknown loss 'nope'", "contrastive"]),
    (("contrastive", {"margin": 1}, "", None, 0), ["no hyperparameter margin", "pos_margin"]),
    (("contrastive", None, "hardest", None, 0), ["unknown miner 'hardest'", "batch_hard"]),
    (("contrastive", None, "triplet_margin", {"epsilon": 1}, 0),
     ["no parameter epsilon", "type_of_triplets"]),
    (("contrastive", None, "triplet_margin", {"type_of_triplets": "medium"}, 0),
     ["type_of_triplets 'medium'", "semihard"]),
    (("sct", None, "batch_hard", None, 0), ["does not take a miner", "triplet_margin"]),
    (("fast_ap", None, "", None, 64), ["does not take cross-batch memory"]),
    (("contrastive", None, "", None, -1), ["memory_size must be an integer >= 0"]),
    (("contrastive", None, "", {"epsilon": 0.1}, 0), ["without a miner"]),
    (("triplet_margin", {"swap": True}, "", None, 64), ["swap=True"]),
    (("margin", {"triplets_per_anchor": 5}, "", None, 0), ["triplets_per_anchor"]),
])
def test_check_names_the_problem_in_one_line(args, words):
  with pytest.raises(ValueError) as info:
    losses.check(*args)
  message = str(info.value)
  assert "\n" not in message
  for word in words:
    assert word in message, message


def test_check_accepts_valid_choices_and_build_composes():
  losses.check("triplet_margin", {"margin": 0.1}, "triplet_margin",
               {"type_of_triplets": "semihard"}, 128)
  losses.check("sct", {"lam": 0.5})
  assert "batch_hard" in losses.MINER_NAMES
  rngs = nnx.Rngs(0)
  plain = losses.build("contrastive", embedding_dim=D, num_classes=4, rngs=rngs)
  assert type(plain).__name__ == "ContrastiveLoss"
  mined = losses.build("contrastive", embedding_dim=D, num_classes=4, rngs=rngs,
                       miner="batch_hard")
  assert type(mined).__name__ == "Mined"
  remembered = losses.build("margin", embedding_dim=D, num_classes=4, rngs=rngs,
                            memory_size=32, miner="multi_similarity")
  assert type(remembered).__name__ == "CrossBatchMemory"


@pytest.mark.parametrize("key", ["contrastive", "multi_similarity", "circle", "ntxent",
                                 "supcon", "lifted_structure", "triplet_margin/swap",
                                 "margin", "fast_ap", "snr_contrastive"])
def test_matches_pytorch_metric_learning(key):
  """A cross-check against PML itself (the references above are the primary check)."""
  torch = pytest.importorskip("torch")
  pml = pytest.importorskip("pytorch_metric_learning.losses")
  classes = {"contrastive": "ContrastiveLoss", "multi_similarity": "MultiSimilarityLoss",
             "circle": "CircleLoss", "ntxent": "NTXentLoss", "supcon": "SupConLoss",
             "lifted_structure": "LiftedStructureLoss", "triplet_margin": "TripletMarginLoss",
             "margin": "MarginLoss", "fast_ap": "FastAPLoss",
             "snr_contrastive": "SignalToNoiseRatioContrastiveLoss"}
  x, y = _batch("random", seed=11)
  loss = getattr(pml, classes[key.split("/")[0]])(**CASES[key][0])
  xt = torch.tensor(x, requires_grad=True)
  expected = loss(xt, torch.tensor(y))
  expected.backward()
  value, grad = _run(key, x, y)
  np.testing.assert_allclose(float(value), expected.item(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), xt.grad.numpy(), rtol=1e-4, atol=1e-5)
