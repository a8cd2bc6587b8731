"""Every registered loss trains: its parameters and memory in the train state, their optimizer,
the config and command line that choose it, checkpoints, and the multi-device step.

Two losses registered here, as a user would register their own: `test_proxy` (a proxy per
class, an nnx.Param) and `test_memory` (a ring buffer of past embeddings, losses.MemoryState).
The steps run a linear embedding of 4x4 images (no ResNet compile).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hn_jax import checkpoints, cli, losses, run_config, sharding, train_step
from hn_jax.losses import registry

DIM, CLASSES, BATCH, SIDE = 8, 10, 16, 4
EPS32 = float(np.finfo(np.float32).eps)


def _unit(x):
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


class ToyLoss(nnx.Module):
  """loss = mean_i [logsumexp_c(s cos(f_i, p_c)) - s cos(f_i, p_{y_i})] (proxies: normalized
  softmax, Zhai & Wu, BMVC 2019) + mean cos(f_i, m_j) over remembered embeddings m_j of other
  classes (memory: a ring buffer of the last `memory` embeddings, Wang et al., CVPR 2020)."""

  def __init__(self, *, embedding_dim, num_classes, rngs, scale=8.0, proxies=True, memory=0):
    self.scale = scale
    self.proxies = (nnx.Param(jax.random.normal(rngs.params(), (num_classes, embedding_dim)))
                    if proxies else None)
    self.memory = memory
    if memory:
      self.bank = losses.MemoryState(jnp.zeros((memory, embedding_dim)))
      self.bank_labels = losses.MemoryState(-jnp.ones((memory,), jnp.int32))
      self.pointer = losses.MemoryState(jnp.zeros((), jnp.int32))

  def __call__(self, embeddings, labels):
    u = _unit(embeddings.astype(jnp.float32))
    loss = jnp.zeros(())
    aux = {}
    if self.proxies is not None:
      logits = self.scale * u @ _unit(self.proxies[...]).T
      picked = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
      loss += jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)
    if self.memory:
      negative = (self.bank_labels[...][None, :] >= 0) & (
          self.bank_labels[...][None, :] != labels[:, None])
      sims = u @ self.bank[...].T
      loss += jnp.sum(jnp.where(negative, sims, 0.0)) / jnp.maximum(1, jnp.sum(negative))
      index = (self.pointer[...] + jnp.arange(u.shape[0])) % self.memory
      self.bank[...] = self.bank[...].at[index].set(jax.lax.stop_gradient(u))
      self.bank_labels[...] = self.bank_labels[...].at[index].set(labels)
      self.pointer[...] = (self.pointer[...] + u.shape[0]) % self.memory
      aux["memory_filled"] = jnp.mean(self.bank_labels[...] >= 0).astype(jnp.float32)
    return loss, aux  # no embedding_mean_sim: the train step adds it


def proxy_loss(*, embedding_dim, num_classes, rngs, scale=8.0, memory=0):
  return ToyLoss(embedding_dim=embedding_dim, num_classes=num_classes, rngs=rngs, scale=scale,
                 memory=memory)


def memory_loss(*, embedding_dim, num_classes, rngs, memory=24):
  return ToyLoss(embedding_dim=embedding_dim, num_classes=num_classes, rngs=rngs,
                 proxies=False, memory=memory)


TEST_LOSSES = {"test_proxy": proxy_loss, "test_memory": memory_loss}


@pytest.fixture(scope="module", autouse=True)
def test_losses():
  """Registers the test losses for this module only (other tests see the real registry)."""
  for name, factory in TEST_LOSSES.items():
    losses.register(name, factory)
  yield
  for name in TEST_LOSSES:
    del registry._FACTORIES[name]  # pylint: disable=protected-access
    registry.NAMES.remove(name)


class LinearEmbedding(nnx.Module):
  """A linear embedding of flattened images: the cheapest model a train step can run."""

  def __init__(self, rngs):
    self.dense = nnx.Linear(SIDE * SIDE * 3, DIM, rngs=rngs)

  def __call__(self, images):
    return self.dense(images.reshape(images.shape[0], -1))


def _config(**overrides):
  config = run_config.defaults()
  config.embedding_dim = DIM
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.update(overrides)
  return config


def _state(config, num_classes=CLASSES):
  tx = train_step.create_optimizer(config, 10)
  loss_tx = train_step.create_optimizer(config, 10, config.loss_lr_multiplier)
  return train_step.create_train_state(LinearEmbedding(nnx.Rngs(0)), tx,
                                       train_step.init_loss(config, num_classes), loss_tx), tx


def _batch(seed, n=BATCH):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, SIDE, SIDE, 3)).astype(np.float32)
  labels = np.repeat(rng.permutation(CLASSES)[: n // 2], 2).astype(np.int32)  # 2 per class
  return images, labels


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _variants():
  """(loss, miner, memory_size) of every registered loss, and of each pair or triplet loss
  with a miner and with cross-batch memory where the registry says which losses those are."""
  out = [(name, "", 0) for name in [*losses.NAMES, *TEST_LOSSES]]
  kind_of = getattr(losses, "kind", None)
  miners = list(getattr(losses, "MINER_NAMES", ()) or getattr(losses, "MINERS", ()))
  if callable(kind_of):
    for name in losses.NAMES:
      if kind_of(name) in ("pair", "triplet"):
        out += [(name, "", 64)] + ([(name, miners[0], 0)] if miners else [])
  return out


@pytest.mark.slow  # two compiles per loss
@pytest.mark.parametrize("loss,miner,memory_size", _variants())
def test_first_step_on_4_devices_is_the_one_device_step(loss, miner, memory_size):
  """The step of every registered loss on the global batch, sharded over 4 devices, equals
  the one-device step up to the order of float32 sums.

  Tolerance: each value is a sum of at most BATCH per-image terms (the data-parallel gradient
  reduction, and the loss's own reductions over the batch), which another summation order
  changes by at most BATCH * eps32 of the sum of their magnitudes, bounded here by
  BATCH * max|term|. The weights' change is compared relative to its largest entry.
  """
  config = _config(loss=loss, miner=miner, memory_size=memory_size,
                   loss_lr_multiplier=10.0 if loss == "test_proxy" else 1.0)
  images, labels = _batch(0)
  results = []
  for devices in (1, 4):
    mesh = sharding.create_mesh(jax.devices()[:devices])
    (graphdef, state), tx = _state(config)
    before = _host(state)
    step = train_step.make_train_step(graphdef, tx, config, mesh)
    state, metrics = step(sharding.replicate(state, mesh), images, labels)
    results.append((before, _host(state), _host(metrics)))
  (before, one, m1), (_, four, m4) = results
  tol = 4 * BATCH * EPS32
  assert m4["loss"] == pytest.approx(m1["loss"], rel=tol, abs=tol)
  assert m4["embedding_mean_sim"] == pytest.approx(m1["embedding_mean_sim"], rel=tol, abs=tol)
  for field in ("params", "loss_params", "loss_state"):
    if getattr(before, field) is None:
      assert getattr(one, field) is None and getattr(four, field) is None
      continue
    for b, a1, a4 in zip(jax.tree.leaves(getattr(before, field)),
                         jax.tree.leaves(getattr(one, field)),
                         jax.tree.leaves(getattr(four, field))):
      change = np.abs(a1.astype(np.float64) - b).max()
      np.testing.assert_allclose(a4, a1, rtol=0, atol=tol * max(change, EPS32), err_msg=field)
  if before.loss_params is not None:
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(one.loss_params),
                                              jax.tree.leaves(before.loss_params)))


@pytest.mark.slow
def test_the_paper_losses_step_as_before():
  """hn/shn/sct through the loss module: bitwise the step of losses.triplet_loss with the
  config's keys (what the train step computed before losses were modules), and the state
  gains no arrays."""
  mesh = sharding.create_mesh(jax.devices()[:1])
  images, labels = _batch(1)
  for method in losses.METHODS:
    config = _config(loss=method, temperature=0.2, lam=0.5, hard_threshold=0.7, momentum=0.0)
    (graphdef, state), tx = _state(config)
    assert (state.loss_params, state.loss_opt_state, state.loss_state) == (None, None, None)
    params = _host(state.params)

    def reference(p):
      model = nnx.merge(graphdef, p, state.batch_stats)
      return losses.triplet_loss(model(jnp.asarray(images)), jnp.asarray(labels),
                                 **train_step.loss_kwargs(config))

    (loss, aux), grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(state.params)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, _host(grads))
    state, metrics = train_step.make_train_step(graphdef, tx, config, mesh)(
        sharding.replicate(state, mesh), images, labels)
    assert float(metrics["loss"]) == float(loss)
    assert float(metrics["embedding_mean_sim"]) == float(aux["embedding_mean_sim"])
    for a, b, p in zip(jax.tree.leaves(_host(state.params)), jax.tree.leaves(expected),
                       jax.tree.leaves(params)):
      # p - lr * g: two float32 roundings, which XLA may fuse differently from NumPy's.
      np.testing.assert_allclose(a, b, rtol=0, atol=2 * EPS32 * np.abs(p).max())


@pytest.mark.slow
def test_loss_parameters_train_at_the_multiplier_and_a_bad_step_changes_nothing():
  config = _config(loss="test_proxy", loss_params={"memory": 24}, momentum=0.0)
  mesh = sharding.create_mesh(jax.devices()[:1])
  images, labels = _batch(2)
  after = {}
  for multiplier in (1.0, 100.0):
    config.loss_lr_multiplier = multiplier
    (graphdef, state), tx = _state(config)
    before = _host(state)
    step = train_step.make_train_step(graphdef, tx, config, mesh)
    state, metrics = step(sharding.replicate(state, mesh), images, labels)
    after[multiplier] = _host(state)
    assert metrics["skipped_steps"] == 0
    # A step with a non-finite image: nothing moves, not the proxies, their moments or memory.
    bad = images.copy()
    bad[3, 0, 0, 0] = np.nan
    kept = _host(state)
    state, metrics = step(state, bad, labels)
    assert int(metrics["skipped_steps"]) == 1 and not np.isfinite(metrics["loss"])
    for name in ("params", "loss_params", "loss_state", "batch_stats"):
      for a, b in zip(jax.tree.leaves(_host(getattr(state, name))),
                      jax.tree.leaves(getattr(kept, name))):
        np.testing.assert_array_equal(a, b, err_msg=name)
  # Plain SGD: the proxies move by lr * multiplier * gradient; the model's weights alike.
  grad = jax.grad(lambda p: _loss_of(graphdef, before, images, labels, p))(before.loss_params)
  for multiplier in (1.0, 100.0):
    for a, b, g in zip(jax.tree.leaves(after[multiplier].loss_params),
                       jax.tree.leaves(before.loss_params), jax.tree.leaves(_host(grad))):
      np.testing.assert_allclose(a - b, -0.1 * multiplier * g, rtol=1e-4,
                                 atol=16 * EPS32 * np.abs(b).max())
  for a, b in zip(jax.tree.leaves(after[1.0].params), jax.tree.leaves(after[100.0].params)):
    np.testing.assert_array_equal(a, b)
  # The memory holds the batch's unit embeddings, in order, from slot 0.
  bank = after[1.0].loss_state["bank"][...]
  assert np.all(after[1.0].loss_state["bank_labels"][...][:BATCH] == labels)
  np.testing.assert_allclose(np.linalg.norm(bank[:BATCH], axis=1), 1.0, rtol=1e-6)


def _loss_of(graphdef, state, images, labels, loss_params):
  """The loss of `state`'s model and memory with `loss_params`, outside the train step."""
  model = nnx.merge(graphdef, state.params, state.batch_stats)
  module = nnx.merge(state.loss.graphdef, loss_params, jax.tree.map(jnp.asarray, state.loss_state))
  return module(model(jnp.asarray(images)), jnp.asarray(labels))[0]


@pytest.mark.slow
def test_a_resumed_run_with_proxies_and_memory_continues_exactly(tmp_path):
  """k steps, a checkpoint, a restore into a fresh state, more steps: bitwise the run that
  never stopped (proxies, their momentum, memory, the model)."""
  config = _config(loss="test_proxy", loss_params={"memory": 40}, loss_lr_multiplier=10.0)
  mesh = sharding.create_mesh(jax.devices()[:2])
  (graphdef, state), tx = _state(config)
  fresh = _host(state)
  step = train_step.make_train_step(graphdef, tx, config, mesh)
  batches = [_batch(10 + i) for i in range(5)]
  state = sharding.replicate(state, mesh)
  for i, batch in enumerate(batches):
    state, _ = step(state, *batch)
    if i == 2:
      manager = checkpoints.manager(tmp_path, max_to_keep=2)
      saver = checkpoints.Saver(manager, num_classes=CLASSES)
      saver.save(3, state, {"sums": {}, "count": 0})
      saver.wait()
  uninterrupted = _host(state)
  progress = json.loads((tmp_path / "checkpoints" / "3" / "progress" / "metadata").read_text())
  assert progress["num_classes"] == CLASSES
  assert any(k.startswith(".loss_params") for k in progress["digest"])
  assert any(k.startswith(".loss_opt_state") for k in progress["digest"])
  assert any(k.startswith(".loss_state") for k in progress["digest"])
  like = sharding.replicate(jax.tree.map(jnp.asarray, fresh), mesh)
  found = checkpoints.restore_newest_good(checkpoints.manager(tmp_path), like)
  assert found is not None and found[0] == 3
  state = found[1]
  assert state.loss is like.loss
  # The digest covers the proxies: one changed entry is caught.
  proxies = np.array(_host(state.loss_params)["proxies"][...])
  proxies[0, 0] += 1.0
  tampered = state.replace(loss_params=jax.tree.map(
      lambda _: proxies, _host(state.loss_params)))
  assert "differ from the digest" in checkpoints.verify(tampered, progress)
  assert checkpoints.verify(state, progress) is None
  for batch in batches[3:]:
    state, _ = step(state, *batch)
  for a, b in zip(jax.tree.leaves(_host(state)), jax.tree.leaves(uninterrupted)):
    np.testing.assert_array_equal(a, b)
  manager.close()


def test_the_paper_losses_add_nothing_to_a_checkpoint(tmp_path):
  config = _config(loss="sct")
  (_, state), _ = _state(config)
  manager = checkpoints.manager(tmp_path)
  saver = checkpoints.Saver(manager, num_classes=CLASSES)
  saver.save(0, state, {"sums": {}, "count": 0})
  saver.wait()
  progress = json.loads((tmp_path / "checkpoints" / "0" / "progress" / "metadata").read_text())
  assert "num_classes" not in progress
  assert sorted({k.split("[")[0].split(".")[1] for k in progress["digest"]}) == [
      "opt_state", "params", "step"]
  manager.close()


def test_a_loss_with_other_variables_is_refused():
  class Stray(nnx.Module):
    def __init__(self):
      self.count = nnx.BatchStat(jnp.zeros(()))

  with pytest.raises(ValueError, match="must be nnx.Param .* or losses.MemoryState .*"
                     "BatchStat"):
    train_step.split_loss(Stray())


def test_config_of_losses_is_checked_in_one_line():
  def problem(**overrides):
    config = _config(**overrides)
    with pytest.raises(run_config.ConfigError) as e:
      run_config.validate(config, num_devices=1, num_processes=1)
    assert "\n" not in str(e.value)
    return str(e.value)

  assert problem(loss="nope").startswith(
      f"config.loss='nope' is not a loss; use one of {', '.join(losses.NAMES)}")
  unknown = problem(loss="test_proxy", loss_params={"margin": 0.2})
  assert unknown.startswith("config.loss='test_proxy': ") and "margin" in unknown
  assert "scale, memory" in unknown
  assert "--config.temperature" in problem(loss="hn", loss_params={"temperature": 0.2})
  assert "'random'" in problem(loss="sct", miner="random")
  assert problem(loss="sct", loss_lr_multiplier=0.0).startswith(
      "config.loss_lr_multiplier=0.0 must be positive")
  assert problem(loss_module="not a module").startswith(
      "config.loss_module='not a module' is not a module name")
  assert "cannot be imported" in problem(loss_module="hn_jax_no_such_module")
  run_config.validate(_config(loss="test_proxy", loss_params={"scale": 4.0}), num_devices=1,
                      num_processes=1)


def test_loss_settings_shape_the_run(tmp_path):
  config = _config(loss="test_proxy", loss_params={"scale": 4.0})
  run_config.record(config, str(tmp_path))
  recorded = run_config.read(str(tmp_path))
  assert recorded.loss_params.scale == 4.0
  assert run_config.check(recorded, str(tmp_path)) == {}
  for key, value in (("loss_params", {"scale": 2.0}), ("loss_lr_multiplier", 100.0),
                     ("memory_size", 64), ("miner", "x")):
    changed = _config(loss="test_proxy", loss_params={"scale": 4.0})
    changed[key] = value
    with pytest.raises(run_config.ConfigMismatch, match=f"config.{key}="):
      run_config.check(changed, str(tmp_path))
  # A run recorded before these settings existed reads them as their defaults.
  old = run_config.as_plain(_config())
  for key in ("loss_params", "miner", "miner_params", "memory_size", "loss_lr_multiplier",
              "loss_module"):
    del old[key]
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert run_config.check(_config(), str(tmp_path)) == {}


def test_loss_and_miner_params_on_the_command_line():
  flag_values = cli.command_flags()
  cli.define_config(flag_values)
  cli.parse(flag_values, ["--config=configs/digits.py", "--config.loss=test_proxy",
                          "--config.loss_params.scale=0.5", "--config.loss_params.memory=3",
                          "--config.miner_params.kind=semihard",
                          "--config.miner_params.flag=true", "--config.memory_size=8",
                          "--config.loss_lr_multiplier=100"], prog="t")
  config = flag_values["config"].value
  assert config.loss == "test_proxy" and config.memory_size == 8
  assert config.loss_lr_multiplier == 100.0
  assert dict(config.loss_params) == {"scale": 0.5, "memory": 3}
  assert dict(config.miner_params) == {"kind": "semihard", "flag": True}
  with pytest.raises(AttributeError):  # the rest of the config stays locked
    config.no_such_setting = 1
  with pytest.raises(cli.UsageProblem, match="give a value"):
    cli.parse(flag_values, ["--config=configs/digits.py", "--config.loss_params.scale"],
              prog="t")
  with pytest.raises(cli.UsageProblem, match="--config.los: no such setting"):
    cli.parse(flag_values, ["--config=configs/digits.py", "--config.los=hn"], prog="t")
  # A second parse starts from the file again.
  cli.parse(flag_values, ["--config=configs/digits.py"], prog="t")
  assert dict(flag_values["config"].value.loss_params) == {}


def test_reproduce_takes_every_registered_loss(tmp_path):
  from hn_jax.tools import reproduce  # pylint: disable=import-outside-toplevel
  with pytest.raises(reproduce.ReproduceError, match=f"use some of {','.join(losses.NAMES)}$"):
    reproduce.reproduce(_config(), tmp_path, methods=["nope"])
  assert "test_proxy" in losses.NAMES
  # A registered loss passes the check of --methods: the next check (--lrs) speaks.
  with pytest.raises(reproduce.ReproduceError, match="--lrs: 'x' is not a positive"):
    reproduce.reproduce(_config(), tmp_path, methods=["test_proxy", "sct"], lrs=["x"])
  assert not any(tmp_path.iterdir())
