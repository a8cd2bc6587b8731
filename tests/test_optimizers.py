"""The optimizers and learning-rate schedules (hn_jax.train_step.create_optimizer): the
release's SGD unchanged, AdamW as torch's, warm-up + cosine against a float64 NumPy formula,
the non-finite-step guard and the resume rule with each."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import digits
from hn_jax import run_config, train_step


def _config(**overrides):
  config = digits.get_config()
  config.update(overrides)
  return config


def _steps(tx, grads, params):
  """The updates of `tx` for each gradient in turn (params held fixed), and the last state."""
  state = tx.init(params)
  out = []
  for g in grads:
    updates, state = tx.update(g, state, params)
    out.append(jax.device_get(updates))
  return out, state


@pytest.mark.slow
def test_default_sgd_is_the_release_chain_bit_for_bit():
  config = _config(momentum=0.5)
  assert (config.optimizer, config.weight_decay, config.warmup_epochs, config.lr_schedule) == (
      "sgd", 0.0, 0.0, "step")
  release = optax.chain(  # create_optimizer as it was before AdamW and the schedules
      optax.apply_if_finite(optax.trace(decay=0.5), max_consecutive_errors=2**31 - 1),
      optax.scale_by_schedule(lambda c: -optax.piecewise_constant_schedule(
          config.learning_rate, {15 * 3: 0.1})(c)))
  params = {"w": jnp.linspace(-1.0, 1.0, 7)}
  grads = [{"w": jnp.sin(jnp.arange(7.0) + i)} for i in range(50)]
  got, _ = _steps(train_step.create_optimizer(config, steps_per_epoch=3), grads, params)
  want, _ = _steps(release, grads, params)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a["w"], b["w"])


def test_warmup_cosine_matches_float64_formula():
  config = _config(learning_rate=3e-4, warmup_epochs=2, lr_schedule="cosine", cosine_epochs=5)
  spe = 7
  schedule = train_step.learning_rate_schedule(config, spe)
  t = np.arange(0, 9 * spe)
  warm, decay = 2 * spe, 5 * spe
  want = np.where(t < warm, 3e-4 * t / warm,
                  np.where(t < warm + decay,
                           3e-4 * 0.5 * (1 + np.cos(np.pi * (t - warm) / decay)), 0.0))
  got = np.array([float(schedule(int(i))) for i in t])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
  # A fractional warm-up rounds to whole steps.
  half = train_step.learning_rate_schedule(_config(warmup_epochs=0.5), 10)
  assert float(half(0)) == 0.0 and float(half(5)) == pytest.approx(0.05)


def test_warmup_then_step_drops_at_the_same_epochs():
  config = _config(learning_rate=0.1, warmup_epochs=1, lr_drop_epochs=(3, 5))
  schedule = train_step.learning_rate_schedule(config, 4)
  got = [float(schedule(i)) for i in range(24)]
  want = [0.1 * i / 4 for i in range(4)] + [0.1] * 8 + [0.01] * 8 + [0.001] * 4
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.slow
def test_adamw_matches_torch_adamw():
  torch = pytest.importorskip("torch")
  config = _config(optimizer="adamw", learning_rate=1e-2, weight_decay=0.05)
  rng = np.random.default_rng(0)
  p0 = rng.standard_normal(5)
  grads = [rng.standard_normal(5) for _ in range(6)]
  tx = train_step.create_optimizer(config, steps_per_epoch=100)
  params = {"w": jnp.asarray(p0, jnp.float32)}
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)
  w = torch.nn.Parameter(torch.tensor(p0))
  opt = torch.optim.AdamW([w], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
  for g in grads:
    w.grad = torch.tensor(g)
    opt.step()
  np.testing.assert_allclose(np.asarray(params["w"]), w.detach().numpy(), rtol=2e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    dict(optimizer="adamw", learning_rate=1e-3, weight_decay=0.1, warmup_epochs=1,
         lr_schedule="cosine", cosine_epochs=2),
    dict(weight_decay=1e-4, momentum=0.9, warmup_epochs=1),
])
def test_a_non_finite_step_changes_nothing_and_the_schedule_still_counts_it(overrides):
  config = _config(**overrides)
  tx = train_step.create_optimizer(config, steps_per_epoch=2)
  schedule = train_step.learning_rate_schedule(config, 2)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  finite = {"w": jnp.full(3, 0.5)}
  _, state = tx.update(finite, state, params)
  moments = jax.device_get(state[0].inner_state)
  updates, state = tx.update({"w": jnp.array([1.0, jnp.nan, 1.0])}, state, params)
  np.testing.assert_array_equal(updates["w"], 0.0)
  for a, b in zip(jax.tree.leaves(jax.device_get(state[0].inner_state)),
                  jax.tree.leaves(moments)):
    np.testing.assert_array_equal(a, b)
  skipped, in_a_row, total = train_step.skipped_steps(state)
  assert bool(skipped) and int(in_a_row) == 1 and int(total) == 1
  # The next finite step is global step 2: the schedule's count includes the skipped one.
  assert int(state[1].count) == 2 and float(schedule(2)) > 0


@pytest.mark.parametrize("overrides, message", [
    ({"optimizer": "adam"}, "config.optimizer='adam' is not an optimizer; use one of sgd, adamw"),
    ({"optimizer": "adamw", "momentum": 0.9}, "config.momentum=0.9 is SGD's"),
    ({"weight_decay": -0.1}, "config.weight_decay=-0.1 must be a number >= 0"),
    ({"warmup_epochs": -1.0}, "config.warmup_epochs=-1.0 must be a number of epochs >= 0"),
    ({"lr_schedule": "linear"}, "config.lr_schedule='linear' is not a schedule"),
    ({"lr_schedule": "cosine"}, "config.lr_schedule='cosine' needs config.cosine_epochs >= 1"),
    ({"cosine_epochs": 5}, "config.cosine_epochs=5 is set but config.lr_schedule='step'"),
])
def test_bad_optimizer_settings_are_one_line_errors(overrides, message):
  with pytest.raises(run_config.ConfigError) as error:
    run_config.validate(_config(**overrides), num_devices=1, num_processes=1)
  assert message in str(error.value) and "\n" not in str(error.value)


def test_the_optimizer_belongs_to_the_run(tmp_path):
  config = _config(optimizer="adamw", learning_rate=1e-4, weight_decay=0.05, warmup_epochs=1,
                   lr_schedule="cosine", cosine_epochs=20, momentum=0.0)
  run_config.validate(config, num_devices=1, num_processes=1)
  run_config.record(config, str(tmp_path))
  for key, value in [("optimizer", "sgd"), ("weight_decay", 0.0), ("warmup_epochs", 2.0),
                     ("lr_schedule", "step"), ("cosine_epochs", 30)]:
    changed = _config(**{**config.to_dict(), key: value})
    with pytest.raises(run_config.ConfigMismatch, match=f"config.{key}="):
      run_config.check(changed, str(tmp_path))
  longer = _config(**{**config.to_dict(), "num_epochs": 40})  # the cosine keeps its length
  assert run_config.check(longer, str(tmp_path)) == {"num_epochs": (20, 40)}
