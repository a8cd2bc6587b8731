"""Proxy and classification losses against float64 NumPy references (hn_jax/testing/
proxy_references.py): loss, gradients w.r.t. embeddings and the trainable arrays, edge cases,
initialization; PML itself as an extra cross-check where it is installed."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hn_jax import losses
from hn_jax.testing import proxy_references as ref

N, D, C = 8, 6, 5
NAMES = ("proxy_nca", "proxy_anchor", "normalized_softmax", "arcface", "cosface", "soft_triple")
# The trainable array of each loss, in PML's layout.
WEIGHT = {"proxy_nca": "proxies", "proxy_anchor": "proxies", "normalized_softmax": "W",
          "arcface": "W", "cosface": "W", "soft_triple": "fc"}
PML_DEFAULTS = {
    "proxy_nca": {"softmax_scale": 1},
    "proxy_anchor": {"margin": 0.1, "alpha": 32},
    "normalized_softmax": {"temperature": 0.05},
    "arcface": {"margin": 28.6, "scale": 64},
    "cosface": {"margin": 0.35, "scale": 64},
    "soft_triple": {"centers_per_class": 10, "la": 20, "gamma": 0.1, "margin": 0.01},
}
# Hyperparameters away from the defaults (one more compile per loss): a wrongly wired or
# inverted hyperparameter shows here even where the defaults happen to agree.
OTHER = {
    "proxy_nca": {"softmax_scale": 3.0},
    "proxy_anchor": {"margin": 0.25, "alpha": 8.0},
    "normalized_softmax": {"temperature": 0.3},
    "arcface": {"margin": 100.0, "scale": 4.0},
    "cosface": {"margin": 0.6, "scale": 7.0},
    "soft_triple": {"centers_per_class": 2, "la": 5.0, "gamma": 0.5, "margin": 0.3},
}


@functools.cache
def compiled(name, hyperparameters=()):
  """(module, jitted (weight, x, y) -> ((loss, aux), (d weight, d x))): one compile each."""
  module = losses.create(name, embedding_dim=D, num_classes=C, rngs=nnx.Rngs(0),
                         **dict(hyperparameters))
  graphdef, state = nnx.split(module)

  def loss_fn(weight, x, y):
    replaced = jax.tree.map(lambda a: a, state)
    replaced[WEIGHT[name]] = replaced[WEIGHT[name]].replace(weight)
    return nnx.merge(graphdef, replaced)(x, y)

  return module, jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))


def run(name, x, y, weight=None, hyperparameters=None):
  hp = PML_DEFAULTS[name] if hyperparameters is None else hyperparameters
  module, fn = compiled(name, tuple(sorted(hp.items())))
  if weight is None:
    weight = np.asarray(getattr(module, WEIGHT[name])[...])
  (loss, aux), (g_weight, g_x) = fn(jnp.asarray(weight, jnp.float32),
                                    jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32))
  return weight, float(loss), {k: float(v) for k, v in aux.items()}, np.asarray(g_weight), \
      np.asarray(g_x)


def assert_close(actual, expected, rtol=2e-4):
  """Float32 against float64: rounding (~1e-7), amplified by logit scales up to 64, stays well
  under `rtol` of the largest entry."""
  expected = np.asarray(expected)
  np.testing.assert_allclose(actual, expected, rtol=1e-3,
                             atol=rtol * max(np.abs(expected).max(), 1e-6))


def check_against_reference(name, x, y, weight=None, hyperparameters=None):
  hp = PML_DEFAULTS[name] if hyperparameters is None else hyperparameters
  weight, loss, aux, g_weight, g_x = run(name, x, y, weight, hp)
  reference = ref.REFERENCES[name]
  x64, w64 = np.asarray(x, np.float64), np.asarray(weight, np.float64)
  expected = reference(x64, y, w64, **hp)
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
  assert_close(g_weight, ref.numerical_gradient(lambda w: reference(x64, y, w, **hp), w64))
  g_x_ref = ref.numerical_gradient(lambda a: reference(a, y, w64, **hp), x64)
  zero = ~np.any(x64 != 0, axis=1)
  assert_close(g_x[~zero], g_x_ref[~zero])
  if zero.any():  # x / 1e-12 there: gradients 1e12 times the unit vector's
    assert_close(g_x[zero], g_x_ref[zero])
  return loss, aux


def random_batch(seed, labels=None):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N, D))
  y = rng.integers(0, C, N) if labels is None else np.asarray(labels)
  return x, y


EDGE_CASES = {
    # class 3 has one image, class 4 none
    "one_image_class": lambda: random_batch(1, [0, 0, 0, 1, 1, 2, 2, 3]),
    "one_class_batch": lambda: random_batch(2, [2] * N),
    # classes 3 and 4 absent: proxy_anchor averages its positive part over 3 proxies
    "absent_classes": lambda: random_batch(3, [0, 1, 2, 0, 1, 2, 0, 1]),
}


@pytest.mark.parametrize("name", NAMES)
def test_random_batches(name):
  for seed in (10, 11):
    check_against_reference(name, *random_batch(seed))
  check_against_reference(name, *random_batch(12), hyperparameters=OTHER[name])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_edge_cases(name, case):
  check_against_reference(name, *EDGE_CASES[case]())


@pytest.mark.parametrize("name", NAMES)
def test_ties_and_zero_embeddings(name):
  x, y = random_batch(4, [0, 0, 1, 1, 2, 3, 3, 4])
  x[1] = x[0]        # identical embeddings
  x[3] = 3.0 * x[2]  # same direction, another norm
  x[4] = 0.0         # zero embeddings: normalized to 0, gradient 1e12 times the unit one's
  x[7] = 0.0
  weight = np.asarray(getattr(compiled(name, tuple(sorted(PML_DEFAULTS[name].items())))[0],
                              WEIGHT[name])[...]).copy()
  if name in ("proxy_nca", "proxy_anchor"):
    weight[3] = weight[1]     # two identical proxies
  else:
    weight[:, 3] = weight[:, 1]
  check_against_reference(name, x, y, weight)


@pytest.mark.parametrize("name", NAMES)
def test_embedding_on_its_own_class_weight(name):
  """Cosine exactly 1 to the label's proxy: finite gradients (PML's arcface gives NaN here)."""
  module, _ = compiled(name, tuple(sorted(PML_DEFAULTS[name].items())))
  weight = np.asarray(getattr(module, WEIGHT[name])[...])
  x, y = random_batch(5, [0, 1, 2, 3, 4, 0, 1, 2])
  vectors = weight if name.startswith("proxy") else weight.T
  x[0] = 2.0 * vectors[0]  # soft_triple: its first center of class 0
  _, loss, _, g_weight, g_x = run(name, x, y, weight)
  hp = PML_DEFAULTS[name]
  np.testing.assert_allclose(loss, ref.REFERENCES[name](x, y, weight, **hp), rtol=1e-5)
  assert np.isfinite(g_weight).all() and np.isfinite(g_x).all()


def test_proxy_nca_leaves_out_underflowed_samples():
  """A probability that underflows to exactly 0 drops its sample from the mean (as PML)."""
  hp = {"softmax_scale": 1000.0}
  module, _ = compiled("proxy_nca", tuple(hp.items()))
  proxies = np.asarray(module.proxies[...])
  p = proxies / np.linalg.norm(proxies, axis=1, keepdims=True)
  y = np.array([0, 1, 2, 3, 4, 0, 1, 2])
  x = p[y]                 # on their proxies: probability ~1 in float32 and float64
  x[0] = -p[0]             # distance 4 to its own proxy, < 3.25 to another: e^{-750} = 0
  assert (2 + 2 * p[1:] @ p[0]).min() < 3.25
  _, loss, _, _, _ = run("proxy_nca", x, y, proxies, hp)
  np.testing.assert_allclose(loss, ref.proxy_nca(x, y, proxies, **hp), atol=1e-6)
  assert loss < 1e-3       # with sample 0 it would be over 0.745 * 1000 / 8


@pytest.mark.parametrize("name", NAMES)
def test_aux(name):
  x, y = random_batch(7)
  weight, _, aux, _, _ = run(name, x, y)
  assert {"embedding_mean_sim", "proxy_pos_sim", "proxy_neg_sim",
          "proxy_accuracy"} <= set(aux)
  u = x / np.linalg.norm(x, axis=1, keepdims=True)
  # triplet_loss's embedding_mean_sim: the mean over the off-diagonal of the cosine matrix
  np.testing.assert_allclose(aux["embedding_mean_sim"], (u @ u.T)[~np.eye(N, dtype=bool)].mean(),
                             atol=1e-6)
  if name == "soft_triple":
    k = PML_DEFAULTS[name]["centers_per_class"]
    w = weight / np.linalg.norm(weight, axis=0)
    s = (u @ w).reshape(N, C, k)
    p = np.exp(s / 0.1) / np.exp(s / 0.1).sum(axis=2, keepdims=True)
    sims = (p * s).sum(axis=2)
  elif name.startswith("proxy"):
    sims = u @ (weight / np.linalg.norm(weight, axis=1, keepdims=True)).T
  else:
    sims = u @ (weight / np.linalg.norm(weight, axis=0))
  pos = sims[np.arange(N), y]
  np.testing.assert_allclose(aux["proxy_pos_sim"], pos.mean(), atol=1e-5)
  np.testing.assert_allclose(aux["proxy_neg_sim"], (sims.sum(1) - pos).mean() / (C - 1),
                             atol=1e-5)
  assert aux["proxy_accuracy"] == np.mean(sims.argmax(1) == y)


def test_aux_has_no_gradient():
  module = losses.create("proxy_anchor", embedding_dim=D, num_classes=C, rngs=nnx.Rngs(0))
  x, y = random_batch(8)
  grad = jax.jit(jax.grad(lambda x: sum(module(x, jnp.asarray(y))[1].values())))(
      jnp.asarray(x, jnp.float32))
  assert not np.asarray(grad).any()


# ---------------------------------------------------------------------------------------------
# Registry, hyperparameters, initialization.


def test_registered_with_pml_names_and_defaults():
  assert set(NAMES) <= set(losses.NAMES)
  for name in NAMES:
    assert losses.hyperparameters(name) == PML_DEFAULTS[name]
    module = losses.create(name, embedding_dim=D, num_classes=C, rngs=nnx.Rngs(0))
    assert type(module).kind == "proxy"
    assert isinstance(getattr(module, WEIGHT[name]), nnx.Param)


@pytest.mark.parametrize("name,bad", [
    ("proxy_nca", {"softmax_scale": 0}), ("proxy_anchor", {"alpha": -1}),
    ("normalized_softmax", {"temperature": 0.0}), ("arcface", {"margin": 180}),
    ("cosface", {"scale": 0}), ("soft_triple", {"centers_per_class": 2.5}),
    ("soft_triple", {"gamma": 0})])
def test_bad_hyperparameters_are_one_line(name, bad):
  with pytest.raises(ValueError) as error:
    losses.create(name, embedding_dim=D, num_classes=C, rngs=nnx.Rngs(0), **bad)
  message = str(error.value)
  assert "\n" not in message and name in message and next(iter(bad)) in message


def test_unknown_hyperparameter_names_the_valid_ones():
  with pytest.raises(ValueError, match="softmax_scale"):
    losses.create("proxy_nca", embedding_dim=D, num_classes=C, rngs=nnx.Rngs(0), scale=1.0)


# name -> (shape for embedding_dim 64, num_classes 100, 'normal' or 'uniform', std or bound)
INIT = {
    "proxy_nca": ((100, 64), "normal", 1.0),
    "proxy_anchor": ((100, 64), "normal", np.sqrt(2 / 100)),  # kaiming_normal, fan_out = 100
    "normalized_softmax": ((64, 100), "normal", 1.0),
    "arcface": ((64, 100), "normal", 1.0),
    "cosface": ((64, 100), "normal", 1.0),
    "soft_triple": ((64, 1000), "uniform", 1 / np.sqrt(1000)),  # kaiming_uniform(a=sqrt(5))
}


@pytest.mark.parametrize("name", NAMES)
def test_initialization(name):
  shape, distribution, spread = INIT[name]
  module = losses.create(name, embedding_dim=64, num_classes=100, rngs=nnx.Rngs(3))
  w = np.asarray(getattr(module, WEIGHT[name])[...])
  assert w.shape == shape and w.dtype == np.float32
  n = w.size
  if distribution == "normal":
    assert abs(w.mean()) < 5 * spread / np.sqrt(n)
    assert abs(w.std() / spread - 1) < 5 / np.sqrt(2 * n)
    # untruncated: N(0, 1) puts 4.55% beyond 2 sigma (a 2-sigma truncated normal none)
    assert abs(np.mean(np.abs(w) > 2 * spread) - 0.0455) < 5 * np.sqrt(0.0455 / n)
  else:
    assert w.min() >= -spread and w.max() <= spread
    assert w.min() < -0.99 * spread and w.max() > 0.99 * spread
    assert abs(w.std() / (spread / np.sqrt(3)) - 1) < 0.02
  again = losses.create(name, embedding_dim=64, num_classes=100, rngs=nnx.Rngs(3))
  np.testing.assert_array_equal(np.asarray(getattr(again, WEIGHT[name])[...]), w)


# ---------------------------------------------------------------------------------------------
# PML itself, where installed: an extra check, never the only one.


@pytest.mark.parametrize("name", NAMES)
def test_matches_pytorch_metric_learning(name):
  pml = pytest.importorskip("pytorch_metric_learning.losses")
  torch = pytest.importorskip("torch")
  cls = {"proxy_nca": pml.ProxyNCALoss, "proxy_anchor": pml.ProxyAnchorLoss,
         "normalized_softmax": pml.NormalizedSoftmaxLoss, "arcface": pml.ArcFaceLoss,
         "cosface": pml.CosFaceLoss, "soft_triple": pml.SoftTripleLoss}[name]
  defaults = {}  # ProxyNCALoss takes softmax_scale from NCALoss, its parent
  for base in reversed(cls.__mro__):
    if "__init__" in vars(base):
      defaults.update({k: p.default for k, p in inspect.signature(base.__init__).parameters.items()
                       if p.default is not inspect.Parameter.empty})
  assert {k: defaults[k] for k in PML_DEFAULTS[name]} == PML_DEFAULTS[name]
  x, y = random_batch(9)
  weight, loss, _, g_weight, g_x = run(name, x, y)
  theirs = cls(num_classes=C, embedding_size=D).double()
  getattr(theirs, WEIGHT[name]).data = torch.tensor(weight, dtype=torch.float64)
  x_t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  loss_t = theirs(x_t, torch.tensor(y))
  loss_t.backward()
  np.testing.assert_allclose(loss, loss_t.item(), rtol=1e-5)
  assert_close(g_x, x_t.grad.numpy())
  assert_close(g_weight, getattr(theirs, WEIGHT[name]).grad.numpy())


def test_sharded_batch_replicated_proxies_give_the_global_loss():
  """The global batch split over the devices, the proxies replicated: the one-device loss."""
  devices = np.array(jax.devices())
  if N % len(devices):
    pytest.skip(f"{len(devices)} devices do not divide the batch of {N}")
  mesh = jax.sharding.Mesh(devices, ("data",))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  x, y = random_batch(13)
  weight, loss, _, g_weight, g_x = run("proxy_anchor", x, y)
  _, fn = compiled("proxy_anchor", tuple(sorted(PML_DEFAULTS["proxy_anchor"].items())))
  (sharded_loss, _), (sharded_g_weight, sharded_g_x) = fn(
      jax.device_put(jnp.asarray(weight), replicated),
      jax.device_put(jnp.asarray(x, jnp.float32), rows),
      jax.device_put(jnp.asarray(y, jnp.int32), rows))
  np.testing.assert_allclose(float(sharded_loss), loss, rtol=1e-6)
  assert_close(np.asarray(sharded_g_x), g_x, rtol=1e-5)
  assert_close(np.asarray(sharded_g_weight), g_weight, rtol=1e-5)
