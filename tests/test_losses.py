"""triplet_loss against an independent float64 NumPy reference, written anchor by anchor."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hn_jax.losses import triplet_loss

METHODS = ("hn", "shn", "sct")


def reference_loss(f, y, method, lam=1.0, t=0.1, thr=0.8):
  """docs/protocol.md section 1, literally: one anchor at a time, float64."""
  f = np.asarray(f, np.float64)
  n = len(f)
  u = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
  s = u @ u.T
  easy_terms, hard_terms, valid_terms = [], [], []
  n_valid = n_hn = 0
  others = np.arange(n)
  for i in range(n):
    pos_cands = (others != i) & (y == y[i]) & (s[i] <= 0.9999)
    vpos = max(-1.0, s[i][pos_cands].max(initial=-np.inf))
    p = np.flatnonzero(pos_cands & (s[i] == vpos))
    neg_cands = (y != y[i]) & ((s[i] <= vpos) if method == "shn" else True)
    vneg = max(-1.0, s[i][neg_cands].max(initial=-np.inf))
    q = np.flatnonzero(neg_cands & (s[i] == vneg))
    if not (-1 < vpos < 1 and -1 < vneg < 1):
      continue
    p, q = p[0], q[0]
    pos, neg = s[i, p], s[i, q]
    n_valid += 1
    n_hn += neg > pos
    term = np.logaddexp(0.0, (neg - pos) / t)
    valid_terms.append(term)
    if neg > pos or neg > thr:
      hard_terms.append(neg)
    elif neg < pos and neg < thr:
      easy_terms.append(term)
  if method == "sct":
    loss = (sum(easy_terms) + lam * sum(hard_terms)) / max(1, len(easy_terms) + len(hard_terms))
  else:
    loss = sum(valid_terms) / max(1, len(valid_terms))
  aux = dict(num_valid=n_valid, num_hard=len(hard_terms), num_easy=len(easy_terms),
             hn_ratio=n_hn / max(1, n_valid))
  return float(loss), aux


def reference_grad(f, y, method, h=1e-6):
  """Central finite differences of the float64 reference."""
  f = np.asarray(f, np.float64)
  g = np.zeros_like(f)
  for idx in np.ndindex(*f.shape):
    fp, fm = f.copy(), f.copy()
    fp[idx] += h
    fm[idx] -= h
    g[idx] = (reference_loss(fp, y, method)[0] - reference_loss(fm, y, method)[0]) / (2 * h)
  return g


def paired_batch(rng, n, d, num_classes=None):
  num_classes = num_classes or n // 2
  y = np.repeat(rng.permutation(1000)[:num_classes], n // num_classes)
  f = rng.normal(size=(n, d))
  f += 0.8 * rng.normal(size=(1000, d))[y]  # some class structure
  return f.astype(np.float32), y.astype(np.int32)


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@functools.cache
def _compiled_loss_and_grad(method, **kw):
  return jax.jit(jax.value_and_grad(
      lambda e, y: triplet_loss(e, y, method=method, **kw), has_aux=True))


def jax_loss_and_grad(f, y, method, **kw):
  fn = _compiled_loss_and_grad(method, **kw)
  (loss, aux), grad = fn(jnp.asarray(f), jnp.asarray(y))
  return float(loss), jax.device_get(aux), np.asarray(grad)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,d", [(8, 4), pytest.param(32, 16, marks=pytest.mark.slow),
                                 pytest.param(64, 8, marks=pytest.mark.slow)])
def test_value_and_gradient_match_reference(method, n, d):
  rng = np.random.default_rng(n * 100 + d)
  f, y = paired_batch(rng, n, d)
  loss, aux, grad = jax_loss_and_grad(f, y, method)
  ref_loss, ref_aux = reference_loss(f, y, method)
  # Class (a): a float32 mean of n softplus((neg - pos) / 0.1) terms, rounding of the sims
  # amplified by 1 / t = 10: ~10 sqrt(n) 2^-24 ~ 5e-6 worst here; measured <= 1.5e-7 relative.
  assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss) + 1e-7
  for key in ("num_valid", "num_hard", "num_easy", "hn_ratio"):
    # Counts are exact integers (measured error 0); hn_ratio is one float32 division (6e-8).
    assert aux[key] == pytest.approx(ref_aux[key], abs=1e-6), key
  if n <= 32:
    ref_grad = reference_grad(f, y, method)
    # Class (a): float32 gradient vs float64 central differences (h = 1e-6: truncation and
    # cancellation ~1e-10); measured <= 8.6e-7 (SSE4_2, AVX), 5.7e-7 default: 11x margin.
    assert _rel_err(grad, ref_grad) <= 1e-5


def test_methods_differ_and_sct_has_both_kinds():
  rng = np.random.default_rng(0)
  f, y = paired_batch(rng, 64, 8)
  losses = {m: jax_loss_and_grad(f, y, m)[0] for m in METHODS}
  assert len(set(np.round(list(losses.values()), 6))) == 3
  _, aux, _ = jax_loss_and_grad(f, y, "sct")
  assert aux["num_hard"] > 0 and aux["num_easy"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_lam_and_temperature_are_used(method):
  rng = np.random.default_rng(1)
  f, y = paired_batch(rng, 16, 4)
  for kw in ({"lam": 0.5}, {"temperature": 0.3}, {"hard_threshold": 0.5}):
    loss = jax_loss_and_grad(f, y, method, **kw)[0]
    ref = reference_loss(f, y, method, **{
        "lam": kw.get("lam", 1.0), "t": kw.get("temperature", 0.1),
        "thr": kw.get("hard_threshold", 0.8)})[0]
    # Class (a), as in test_value_and_gradient_match_reference; measured 2.3e-7 (ratio 0.007).
    assert loss == pytest.approx(ref, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_permuting_the_batch_changes_nothing(method):
  rng = np.random.default_rng(2)
  f, y = paired_batch(rng, 32, 8)
  perm = rng.permutation(32)
  loss, aux, grad = jax_loss_and_grad(f, y, method)
  loss_p, aux_p, grad_p = jax_loss_and_grad(f[perm], y[perm], method)
  # Class (a), float32 vs float32 in another summation order (a mean of 32 terms): measured
  # 6e-8 absolute, 1/10 of the tolerance, alike under --xla_cpu_max_isa=SSE4_2 and AVX.
  assert loss_p == pytest.approx(loss, rel=1e-6)
  assert aux_p["num_hard"] == aux["num_hard"]
  # Class (a), reordered float32 sums: measured 3e-8 at most, 1/12 of the tolerance.
  np.testing.assert_allclose(grad_p, grad[perm], rtol=1e-5, atol=1e-7)


def _edge_cases():
  rng = np.random.default_rng(3)
  f, y = paired_batch(rng, 16, 8)
  singleton = (f, np.concatenate([y[:-1], [999]]).astype(np.int32))
  # Class 0 holds two near-identical images (similarity > 0.9999, skipped as each other's
  # positive) and a third; every other class lies in the opposite half-space, so neither copy
  # is anyone's hardest negative (which would be a tie between the copies).
  dup = np.concatenate([np.full((16, 1), -0.5, np.float32), f[:, :7] / 3], axis=1)
  dup[0] = np.eye(8, dtype=np.float32)[0] + 0.01 * rng.normal(size=8).astype(np.float32)
  dup[1] = dup[0] * 1.00001 + 1e-7
  dup[2] = np.eye(8, dtype=np.float32)[0] + 0.3 * rng.normal(size=8).astype(np.float32)
  dup_labels = y.copy()
  dup_labels[:3] = dup_labels[0]
  dup_labels[3] = dup_labels[4]  # image 3 lost its partner (image 2) to class 0
  same_label = (f, np.zeros(16, np.int32))
  # Every triplet hard: each image sits on top of another class's image.
  base = rng.normal(size=(8, 8)).astype(np.float32)
  all_hard = (np.repeat(base, 2, axis=0) + 0.01 * rng.normal(size=(16, 8)).astype(np.float32),
              np.tile(np.arange(8), 2).astype(np.int32))
  # Every triplet easy: classes on orthogonal axes.
  eye = np.eye(8, dtype=np.float32)
  all_easy = (np.repeat(eye, 2, axis=0) + 0.05 * rng.normal(size=(16, 8)).astype(np.float32),
              np.repeat(np.arange(8), 2).astype(np.int32))
  zero_row = f.copy()
  zero_row[5] = 0.0
  return {
      "singleton_class": singleton,
      "near_identical": (dup, dup_labels),
      "all_same_label": same_label,
      "all_hard": all_hard,
      "all_easy": all_easy,
      "zero_row": (zero_row, y),
      "bfloat16": (f.astype(jnp.bfloat16), y),
  }


EDGE_CASES = _edge_cases()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_edge_cases_are_finite_and_match(method, case):
  f, y = EDGE_CASES[case]
  loss, aux, grad = jax_loss_and_grad(f, y, method)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  assert all(np.isfinite(v) for v in aux.values())
  ref_loss, ref_aux = reference_loss(np.asarray(f, np.float32), y, method)
  # Class (a) (bfloat16 inputs are compared against their exact float32 values): measured
  # 1.1e-6 absolute on a loss near 4 (ratio 0.026), alike under SSE4_2 and AVX.
  assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
  assert aux["num_valid"] == ref_aux["num_valid"]
  if case == "all_same_label":
    assert loss == 0.0 and aux["num_valid"] == 0
  if case == "all_hard" and method != "shn":
    assert aux["num_easy"] == 0 and aux["num_hard"] == aux["num_valid"] > 0
  if case == "all_easy":
    assert aux["num_hard"] == 0 and aux["num_easy"] == aux["num_valid"] == 16
  if case == "near_identical":
    u = np.asarray(f, np.float64) / np.linalg.norm(np.asarray(f, np.float64), axis=1)[:, None]
    assert u[0] @ u[1] > 0.9999
    assert aux["num_valid"] == 16  # images 0 and 1 still find image 2 as their positive


def _min_compared_distance(f, y):
  """Smallest |u_i - u_j| over the pairs the loss may compare: other labels, or the same label
  below the 0.9999 cut (the near-identical copies are never compared)."""
  u = np.asarray(f, np.float64)
  u = u / np.linalg.norm(u, axis=1, keepdims=True)
  s = u @ u.T
  compared = (y[:, None] != y[None, :]) | (s <= 0.9999)
  return float(np.sqrt(np.maximum(2 - 2 * s[compared], 0)).min())


@pytest.mark.slow
def test_edge_case_gradients_match_reference():
  for case in ("singleton_class", "near_identical", "all_hard", "all_easy"):
    f, y = EDGE_CASES[case]
    # Class (a), conditioned: d(u_i . u_j)/df_i = (u_j - s u_i) / |f_i| has norm ~|u_i - u_j|,
    # computed from O(1) float32 terms, so rounding grows like 2^-24 / min |u_i - u_j|:
    # 4x that, at least 1e-5. Measured: all_hard/sct <= 6.2e-6 (pairs 0.0055 apart: 4.4e-5
    # allowed), the others <= 7e-7 (pairs >= 0.16 apart), under SSE4_2, AVX and SandyBridge.
    rtol = max(1e-5, 4 * 2.0**-24 / _min_compared_distance(f, y))
    for method in METHODS:
      _, _, grad = jax_loss_and_grad(f, y, method)
      ref = reference_grad(f, y, method)
      if case == "near_identical":
        # Image 2's positive is a tie between the two copies: float32 and float64 may pick
        # different ones, so compare the copies' gradients summed.
        grad, ref = (np.concatenate([g[:1] + g[1:2], g[2:]]) for g in (grad, ref))
      if np.linalg.norm(ref) == 0:
        assert np.linalg.norm(grad) == 0, (case, method)
      else:
        assert _rel_err(grad, ref) <= rtol, (case, method, rtol)


def test_unknown_method_is_refused():
  with pytest.raises(ValueError, match="unknown loss method 'nope'"):
    triplet_loss(jnp.ones((4, 2)), jnp.arange(4), method="nope")


def test_embedding_mean_sim_detects_collapse():
  rng = np.random.default_rng(4)
  f = np.ones((16, 8), np.float32) + 1e-3 * rng.normal(size=(16, 8)).astype(np.float32)
  _, aux, _ = jax_loss_and_grad(f, np.repeat(np.arange(8), 2), "hn")
  assert aux["embedding_mean_sim"] > 0.999  # (d): rows 1e-3 apart: sims ~1 - 1e-6, far above
  f, y = paired_batch(rng, 16, 8)
  _, aux, _ = jax_loss_and_grad(f, y, "hn")
  u = f / np.linalg.norm(f, axis=1, keepdims=True)
  s = u @ u.T
  # Class (a): a float32 mean of 240 sims in [-1, 1]: <= 240 2^-24 = 1.4e-5 worst case, ~1e-7
  # typical; measured 1.5e-8 (AVX), 3.7e-9 default.
  assert aux["embedding_mean_sim"] == pytest.approx((s.sum() - np.trace(s)) / (16 * 15), abs=1e-5)
