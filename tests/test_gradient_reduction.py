"""benchmarks/gradient_reduction.py: its emulation of data-parallel partial gradients, its bf16
reductions, and its --smoke run.

The emulated partials are checked against float64 NumPy on tiny models whose gradients are
written out by hand (a linear map; a linear map, a batch centering that couples the rows as a
BatchNorm does, and a second linear map), and on the project's model against the plain
full-batch gradient and train step.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import hn_jax  # noqa: F401  (before JAX starts: it keeps JAX on the CPU where no accelerator is)
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from hn_jax.testing import benchmarks

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gradient_reduction.py"


bench = benchmarks.load("gradient_reduction")

B, DIN, DH, DOUT = 8, 5, 6, 4


def _data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, DIN)).astype(np.float32)
  w1 = rng.normal(size=(DIN, DH)).astype(np.float32)
  w2 = rng.normal(size=(DH, DOUT)).astype(np.float32)
  c = rng.normal(size=(B, DOUT)).astype(np.float32)  # the embeddings' cotangent
  return x, w1, w2, c


def _linear_loss(c):
  return lambda e: (jnp.sum(jnp.asarray(c) * e), {})


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["local", "masked"])
def test_linear_model_partials_against_float64(n, kind):
  """E = X W, loss = sum(C * E): device d's partial is X_d^T C_d, in float64 by hand."""
  x, w, _, _ = _data()
  c = np.random.default_rng(5).normal(size=(B, DH)).astype(np.float32)
  partials = bench.local_partials if kind == "local" else bench.masked_partials
  _, _, _, parts = partials(lambda p, xb: (xb @ p["w"], None), {"w": jnp.asarray(w)},
                            jnp.asarray(x), _linear_loss(c), n)
  x64, c64 = x.astype(np.float64), c.astype(np.float64)
  rows = B // n
  for d in range(n):
    block = slice(d * rows, (d + 1) * rows)
    assert _rel(parts["w"][d], x64[block].T @ c64[block]) < 1e-6
  total = bench.reduce_partials(parts, "f32", bf16_partials=False)["w"]
  assert _rel(total, x64.T @ c64) < 1e-6


@pytest.mark.slow
def test_linear_model_with_the_triplet_loss():
  """The project's loss: the partials sum to the full gradient, X^T dE in float64."""
  from hn_jax import losses
  x, w, _, _ = _data(1)
  labels = jnp.asarray(np.repeat(np.arange(B // 2), 2))
  loss_of = lambda e: losses.triplet_loss(e, labels, method="sct")  # noqa: E731
  de = np.asarray(jax.grad(lambda e: loss_of(e)[0])(jnp.asarray(x @ w)), np.float64)
  full = jax.grad(lambda p: loss_of(jnp.asarray(x) @ p)[0])(jnp.asarray(w))
  assert _rel(full, x.astype(np.float64).T @ de) < 1e-6
  for n in (1, 2, 4):
    for partials in (bench.local_partials, bench.masked_partials):
      _, _, _, parts = partials(lambda p, xb: (xb @ p, None), jnp.asarray(w), jnp.asarray(x),
                                loss_of, n)
      assert _rel(bench.reduce_partials(parts, "f32", bf16_partials=False), full) < 1e-6


def _centering_forward(vmapped):
  """E = center(X W1) W2, the centering over the global batch (pmean under the vmap)."""
  def forward(p, xb):
    y = xb @ p["w1"]
    mean = y.mean(0)
    if vmapped:
      mean = jax.lax.pmean(mean, bench.AXIS)
    return (y - mean) @ p["w2"], None
  return forward


@pytest.mark.slow
def test_batch_coupled_model_local_partials_are_the_devices():
  """With rows coupled through batch statistics (as by BatchNorm), the local partials are each
  device's own rows' weight gradient (float64 by hand); the masked-cotangent partials differ
  from them but sum to the same gradient."""
  x, w1, w2, c = _data(2)
  params = {"w1": jnp.asarray(w1), "w2": jnp.asarray(w2)}
  x64, w2_64, c64 = (a.astype(np.float64) for a in (x, w2, c))
  y = x64 @ w1.astype(np.float64)
  z = y - y.mean(0)
  dz = c64 @ w2_64.T
  dy = dz - dz.mean(0)
  n, rows = 4, B // 4
  _, _, _, local = bench.local_partials(_centering_forward(True), params, jnp.asarray(x),
                                        _linear_loss(c), n)
  _, _, _, masked = bench.masked_partials(_centering_forward(False), params, jnp.asarray(x),
                                          _linear_loss(c), n)
  for d in range(n):
    block = slice(d * rows, (d + 1) * rows)
    mask = np.zeros((B, 1))
    mask[block] = 1.0
    assert _rel(local["w1"][d], x64[block].T @ dy[block]) < 1e-5
    assert _rel(local["w2"][d], z[block].T @ c64[block]) < 1e-5
    dzm = mask * dz
    assert _rel(masked["w1"][d], x64.T @ (dzm - dzm.mean(0))) < 1e-5
    assert _rel(masked["w2"][d], z.T @ (mask * c64)) < 1e-5  # the head: the same partial
    assert _rel(masked["w1"][d], local["w1"][d]) > 1e-2  # the coupling makes them differ
  for parts in (local, masked):
    total = bench.reduce_partials(parts, "f32", bf16_partials=False)
    assert _rel(total["w1"], x64.T @ dy) < 1e-5 and _rel(total["w2"], z.T @ c64) < 1e-5


def test_uneven_or_no_devices_is_an_error():
  x, w, _, c = _data()
  for partials in (bench.local_partials, bench.masked_partials):
    with pytest.raises(ValueError, match="does not split evenly over 3"):
      partials(lambda p, xb: (xb @ p, None), jnp.asarray(w), jnp.asarray(x), _linear_loss(c), 3)
    with pytest.raises(ValueError, match="at least 1"):
      partials(lambda p, xb: (xb @ p, None), jnp.asarray(w), jnp.asarray(x), _linear_loss(c), 0)
  with pytest.raises(ValueError, match="unknown reduction"):
    bench.reduce_partials(jnp.ones((2, 3)), "mean")


def test_round_bf16_is_round_to_nearest_even():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(size=10000).astype(np.float32) * 10.0 ** rng.integers(
      -20, 20, size=10000), np.float32([0.0, -0.0, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)])])
  want = x.astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(jax.jit(bench.round_bf16)(jnp.asarray(x))), want)


@pytest.mark.slow
def test_bf16_reduction_orders():
  """[1, 2^-8, 2^-8, 2^-8]: each 1 + 2^-8 in a ring is a tie rounded back to 1; a tree adds
  the small ones first (2^-7: one bf16 ulp at 1); float32 keeps them all."""
  parts = jnp.asarray([1.0, 2**-8, 2**-8, 2**-8], jnp.float32)
  assert float(bench.reduce_partials(parts, "ring")) == 1.0
  assert float(bench.reduce_partials(parts, "tree")) == 1.0 + 2**-7
  assert float(bench.reduce_partials(parts, "f32")) == 1.0 + 3 * 2**-8
  odd = jnp.asarray([1.0, 2.0, 3.0], jnp.float32)  # an odd count in the tree
  assert float(bench.reduce_partials(odd, "tree")) == 6.0
  # Partials are rounded to bf16 first, even for the float32 reduction (bf16 convs made them).
  assert float(bench.reduce_partials(jnp.asarray([1 + 2**-10, 0.0]), "f32")) == 1.0
  assert float(bench.reduce_partials(jnp.asarray([1 + 2**-10, 0.0]), "f32",
                                     bf16_partials=False)) == np.float32(1 + 2**-10)


def _tiny_config():
  from configs import synthetic
  config = synthetic.get_config()
  config.half_precision = False
  config.batch_size = 8
  config.image_size = 16
  return config


def _tiny_batch():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, size=(8, 16, 16, 3), dtype=np.uint8))
  labels = jnp.asarray(np.repeat(np.arange(4), 2).astype(np.int32))
  return images, labels, jnp.asarray(rng.random(8) < 0.5)


@pytest.mark.slow
def test_emulated_step_on_one_device_is_the_train_step():
  """Everything but the gradients' reduction is `make_train_step`'s: with 1 device and the
  float32 reduction the emulated step gives its loss, parameters and BatchNorm statistics."""
  from hn_jax import sharding, train_step
  config = _tiny_config()
  images, labels, flips = _tiny_batch()
  graphdef, state, tx = train_step.init_state(config, 10)
  mesh = sharding.create_mesh(jax.devices()[:1])
  plain = train_step.make_train_step(graphdef, tx, config, mesh)
  emulated = bench.make_emulated_step(graphdef, tx, config, 1, "f32")
  copy = lambda s: jax.tree.map(jnp.array, s)  # noqa: E731  (both steps donate the state)
  s1, m1 = plain(sharding.replicate(copy(state), mesh), images, labels, flips)
  s2, m2 = emulated(copy(state), images, labels, flips)
  assert abs(float(m1["loss"]) - float(m2["loss"])) < 1e-6
  assert bench.compare(s2.params, s1.params)["rel"] < 1e-6
  assert bench.compare(s2.batch_stats, s1.batch_stats)["rel"] < 1e-6


@pytest.mark.slow
def test_smoke_run_prints_its_tables(tmp_path):
  out = tmp_path / "gradient_reduction.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                        + " --xla_backend_optimization_level=0").strip())
  proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", f"--json={out}"], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "| comparison | rel mean | rel max | cos min |" in proc.stdout
  assert "| ring/4 vs f32/4 |" in proc.stdout and "### Per tensor" in proc.stdout
  result = json.loads(out.read_text())
  assert result["smoke"] and result["ns"] == [4] and result["steps"] == 4
  assert sorted(result["points"]) == ["step 0"]
  for point in result["points"].values():
    s = point["summary"]
    # A bf16 reduction changes the sum by about bf16's precision, not by nothing or a lot.
    assert 1e-4 < s["ring/4 vs f32/4"]["rel_mean"] < 2e-2
    assert 1e-4 < s["tree/4 vs f32/4"]["rel_mean"] < 2e-2
