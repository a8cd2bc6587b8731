"""The gradient field against a float64 NumPy finite-difference step of the same triplet term."""

import json

import numpy as np
import pytest
from PIL import Image

from hn_jax import losses
from hn_jax.tools import analysis


def reference_term(x, method, lam=1.0, t=0.1, thr=0.8):
  """One triplet's term, docs/protocol.md section 1 written directly, float64."""
  u = x / np.linalg.norm(x, axis=1, keepdims=True)
  pos, neg = u[0] @ u[1], u[0] @ u[2]
  contrastive = np.logaddexp(0.0, (neg - pos) / t)
  if method != "sct":
    return contrastive
  if neg > pos or neg > thr:
    return lam * neg
  return contrastive if (neg < pos and neg < thr) else 0.0


def reference_step(s_ap, s_an, c, method, lr, h=1e-6):
  """(change of S_ap, change of S_an) after one finite-difference gradient step, float64."""
  a = np.array([1.0, 0.0, 0.0])
  p = np.array([s_ap, np.sqrt(1 - s_ap**2), 0.0])
  r = np.sqrt(1 - s_an**2)
  n = np.array([s_an, r * c, r * np.sqrt(1 - c * c)])
  x = np.stack([a, p, n])
  g = np.zeros_like(x)
  for idx in np.ndindex(*x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += h
    xm[idx] -= h
    g[idx] = (reference_term(xp, method) - reference_term(xm, method)) / (2 * h)
  y = x - lr * g
  u = y / np.linalg.norm(y, axis=1, keepdims=True)
  return u[0] @ u[1] - s_ap, u[0] @ u[2] - s_an


# (s_ap, s_an) on the grid of 21 points: easy, hard (neg > pos), hard by the threshold only.
POINTS = [(0.7, 0.2), (0.3, 0.6), (0.95, 0.85), (0.1, 0.05), (0.5, 0.95)]


@pytest.mark.parametrize("method,projection", [("hn", 0.0), ("sct", 0.6), ("shn", -0.4)])
def test_field_matches_finite_differences(method, projection):
  lr = 0.1
  field = analysis.gradient_field(method, lr=lr, projection=projection, grid=21)
  axis = np.asarray(field["s_ap"])
  assert field["s_an"] == field["s_ap"] and np.all(np.diff(axis) > 0)
  assert axis[0] == 0.0 and axis[-1] == 1.0
  for s_ap, s_an in POINTS:
    i, j = int(np.argmin(abs(axis - s_an))), int(np.argmin(abs(axis - s_ap)))
    want_ap, want_an = reference_step(axis[j], axis[i], projection, method, lr)
    # Class (a): float32 field vs float64 finite differences (truncation ~1e-10): measured
    # <= 2e-7 (AVX, SSE4_2), 1.1e-7 default: 500x margin, kept as the check's resolution.
    assert field["d_ap"][i][j] == pytest.approx(want_ap, abs=1e-4), (s_ap, s_an)
    assert field["d_an"][i][j] == pytest.approx(want_an, abs=1e-4), (s_ap, s_an)


def test_invalid_triplets_are_null_and_json_layout(tmp_path):
  out, js = tmp_path / "f.png", tmp_path / "f.json"
  assert analysis.main(["gradient_field", "--loss=sct", "--grid=6", "--lr=0.05",
                        f"--out={out}", f"--json={js}"]) == 0
  field = json.loads(js.read_text())
  assert (field["loss"], field["lr"], field["projection"], field["grid"]) == ("sct", 0.05, 0.0, 6)
  assert len(field["d_ap"]) == len(field["d_an"]) == 6
  for d in (field["d_ap"], field["d_an"]):
    assert all(len(row) == 6 for row in d)
    assert all(v is None for v in d[-1]) and all(row[-1] is None for row in d)  # S = 1
    assert all(v is not None for row in d[:-1] for v in row[:-1])
  with Image.open(out) as image:
    assert image.format == "PNG" and image.width > 800


@pytest.mark.parametrize("args,words", [
    (["--loss=hx"], "--loss=hx"), (["--loss=hn", "--lr=0"], "--lr=0"),
    (["--loss=hn", "--projection=1.5"], "--projection=1.5"),
    (["--loss=hn", "--grid=1"], "--grid=1")])
def test_bad_arguments(tmp_path, capsys, args, words):
  out = tmp_path / "f.png"
  assert analysis.main(["gradient_field", *args, f"--out={out}"]) == 2
  err = capsys.readouterr().err.strip()
  assert words in err and "\n" not in err and not out.exists()
  assert analysis.main(["gradient_field", "--loss=hn", f"--out={tmp_path}/no/f.png"]) == 2


@pytest.mark.parametrize("projection", [0.0, 0.7, -0.5])
def test_sct_hard_term_never_moves_the_positive(projection):
  lr, lam = 0.1, 1.0
  axis = np.linspace(0, 0.95, 20)
  s_ap, s_an = np.meshgrid(axis, axis)
  hard = (s_an > s_ap + 1e-3) | (s_an > 0.8 + 1e-3)
  d_ap, d_an, grad = analysis.similarity_step(
      analysis.triplet_vectors(s_ap, s_an, projection), loss="sct", lr=lr, lam=lam)
  assert np.all(grad[..., 1, :][hard] == 0)  # the positive gets no gradient at all
  assert np.all(d_an[hard] < 0)  # the negative is pushed away
  if projection == 0.0:
    # S_ap changes only as the anchor, moved along n's direction, is renormalized:
    # |a'|^2 = 1 + (lr lam)^2 (1 - S_an^2), a'.p = S_ap.
    want = s_ap * (1 / np.sqrt(1 + (lr * lam) ** 2 * (1 - s_an**2)) - 1)
    # Class (a): float32 vs float64 closed form of a change ~1e-3: measured 8.2e-8 on every
    # setting (ratio 0.04); 2e-6 is ~30 ulps of the similarities (|S| <= 1).
    np.testing.assert_allclose(d_ap[hard], want[hard], atol=2e-6)
  easy = (s_an < s_ap - 1e-3) & (s_an < 0.8 - 1e-3)
  assert np.all(np.abs(grad[..., 1, :][easy]).sum(-1) > 0)  # the easy term does pull p


def test_triplet_terms_are_the_loss_terms():
  """triplet_loss sums triplet_terms over its mined triplets (one anchor here)."""
  rng = np.random.default_rng(0)
  for method in losses.METHODS:
    pos, neg = rng.uniform(-1, 1, 64).astype(np.float32), rng.uniform(-1, 1, 64)
    neg = neg.astype(np.float32)
    term, hard, easy = (np.asarray(v) for v in losses.triplet_terms(pos, neg, method=method))
    for k in range(64):
      want = reference_term_from_sims(pos[k], neg[k], method)
      # Class (a): softplus((neg - pos) / 0.1) in float32, rounding x 10: measured 1.6e-6
      # absolute on terms near 10 (ratio 0.017), the same under SSE4_2 and AVX.
      assert term[k] == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert not np.any(hard & easy)


def reference_term_from_sims(pos, neg, method, lam=1.0, t=0.1, thr=0.8):
  contrastive = np.logaddexp(0.0, (float(neg) - float(pos)) / t)
  if method != "sct":
    return contrastive
  if neg > pos or neg > thr:
    return lam * neg
  return contrastive if (neg < pos and neg < thr) else 0.0
