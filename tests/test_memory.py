"""Cross-batch memory against a reference concatenation of every batch seen: the ring
buffer's contents, and the loss and gradient of steps that wrap it, carried through a jitted
step as MemoryState."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hn_jax import losses
from hn_jax.testing import loss_references as R

B, D, M = 6, 5, 10
ROWS = (0, 3, 5)  # rows whose gradient is checked by finite differences

# loss, its hyperparameters, miner, its parameters
CONFIGS = {
    "contrastive": ("contrastive", dict(neg_margin=1.1), "", {}),
    "ntxent+multi_similarity": ("ntxent", dict(temperature=0.5), "multi_similarity",
                                dict(epsilon=0.3)),
    "triplet_margin+batch_hard": ("triplet_margin", dict(margin=0.3), "batch_hard", {}),
    "lifted_structure+triplet_margin": ("lifted_structure", {}, "triplet_margin",
                                        dict(margin=0.4)),
}


def _batches(steps=4, seed=0):
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=(B, D)).astype(np.float32), rng.integers(0, 3, size=B))
          for _ in range(steps)]


@functools.cache
def _step(key):
  """A jitted step (state, x, y) -> (loss, grad, aux, state), the memory carried in state."""
  name, params, miner, miner_params = CONFIGS[key]
  module = losses.build(name, embedding_dim=D, num_classes=3, rngs=nnx.Rngs(0),
                        loss_params=params, miner=miner, miner_params=miner_params,
                        memory_size=M)
  graph, state = nnx.split(module)

  @jax.jit
  def step(state, x, y):
    def f(e):
      model = nnx.merge(graph, state, copy=True)
      loss, aux = model(e, y)
      return loss, (aux, nnx.state(model, losses.MemoryState))
    (loss, (aux, memory)), grad = jax.value_and_grad(f, has_aux=True)(x)
    return loss, grad, aux, memory
  return step, state


def _reference_loss(key, x, y, r, ry, skip):
  name, params, miner, miner_params = CONFIGS[key]
  fn = getattr(R, name)
  if not miner:
    pos, neg = R.all_pairs(list(y), list(ry), skip_self=skip)
  elif miner == "multi_similarity":
    pos, neg = R.multi_similarity_miner(x, list(y), r, list(ry), skip_self=skip,
                                        **miner_params)
  else:
    mined = getattr(R, f"{miner}_miner")(x, list(y), r, list(ry), skip_self=skip,
                                         **miner_params)
    if name == "triplet_margin":
      return lambda e: fn(e, r, mined, **params)
    pos, neg = R.triplets_to_pairs(mined)
  if name == "triplet_margin":
    return lambda e: fn(e, r, R.pairs_to_triplets(pos, neg), **params)
  return lambda e: fn(e, r, pos, neg, **params)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_steps_that_wrap_the_memory_match_a_concatenation(key):
  step, state = _step(key)
  reference = R.MemoryReference(M)
  for t, (x, y) in enumerate(_batches(seed=len(key))):
    loss, grad, aux, memory = step(state, jnp.asarray(x), jnp.asarray(y))
    state = nnx.merge_state(state, memory)
    r, ry, skip = reference.enqueue(x, y)
    filled = min(M, B * (t + 1))
    assert int(memory["filled"][...]) == filled == len(r)
    assert int(memory["position"][...]) == (B * (t + 1)) % M
    np.testing.assert_array_equal(np.asarray(memory["embeddings"][...])[:filled], r)
    np.testing.assert_array_equal(np.asarray(memory["labels"][...])[:filled], ry)
    fn = _reference_loss(key, x, y, r, ry, skip)
    expected = fn(x)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5, atol=2e-6,
                               err_msg=f"step {t}")
    expected_grad = R.numeric_gradient(fn, x, rows=ROWS)[list(ROWS)]
    np.testing.assert_allclose(np.asarray(grad)[list(ROWS)], expected_grad,
                               atol=2e-4 * max(1.0, np.abs(expected_grad).max()),
                               err_msg=f"step {t}")
    assert float(aux["memory_filled"]) == filled
    s = R.cos(x, x)  # the collapse statistic is the batch's own, not the memory's
    np.testing.assert_allclose(float(aux["embedding_mean_sim"]),
                               (s.sum() - np.trace(s)) / (B * (B - 1)), atol=1e-6)


def test_memory_is_refused_a_batch_larger_than_itself():
  module = losses.build("contrastive", embedding_dim=D, num_classes=3, rngs=nnx.Rngs(0),
                        memory_size=4)
  with pytest.raises(ValueError, match=r"the batch \(6\) exceeds memory_size \(4\)"):
    module(jnp.zeros((6, D)), jnp.zeros((6,), jnp.int32))


def test_matches_pytorch_metric_learning_cross_batch_memory():
  """A cross-check against PML's CrossBatchMemory itself (the concatenation is the primary
  reference)."""
  torch = pytest.importorskip("torch")
  pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
  pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
  step, state = _step("ntxent+multi_similarity")
  wrapper = pml_losses.CrossBatchMemory(pml_losses.NTXentLoss(temperature=0.5), D,
                                        memory_size=M,
                                        miner=pml_miners.MultiSimilarityMiner(epsilon=0.3))
  for x, y in _batches(steps=3, seed=4):
    loss, grad, _, memory = step(state, jnp.asarray(x), jnp.asarray(y))
    state = nnx.merge_state(state, memory)
    xt = torch.tensor(x, requires_grad=True)
    expected = wrapper(xt, torch.tensor(y))
    expected.backward()
    np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), xt.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_create_takes_the_miner_and_the_memory_as_build_does():
  """`losses.create` (the registry's one entry point) composes a miner and a memory too."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(3)
  made = losses.create("contrastive", embedding_dim=4, num_classes=3, rngs=nnx.Rngs(0),
                       memory_size=12, miner="multi_similarity", pos_margin=0.1)
  built = losses.build("contrastive", embedding_dim=4, num_classes=3, rngs=nnx.Rngs(0),
                       loss_params={"pos_margin": 0.1}, memory_size=12,
                       miner="multi_similarity")
  for _ in range(3):  # wraps the memory (3 x 6 > 12)
    e = rng.normal(size=(6, 4)).astype(np.float32)
    y = rng.integers(0, 3, 6)
    assert float(made(e, y)[0]) == float(built(e, y)[0])
  with pytest.raises(ValueError, match="no hyperparameter margin"):
    losses.create("sct", embedding_dim=4, num_classes=3, rngs=nnx.Rngs(0), margin=1.0)
