"""Tests for hn_jax.evaluation: exact recall, MAP@R / R-Precision, top-k and chain recall.

Every metric is checked against a NumPy float64 brute force written here (full similarity
matrix, explicit tie rule). Two kinds of data:
- "continuous": Gaussian embeddings, checked to have no near-ties (so float32 and float64 agree);
- "lattice": unit vectors with entries in {k/16}, whose dot products are multiples of 1/256 and
  exact in float32: thousands of exact ties, so the tie rule is exercised everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hn_jax import evaluation
from hn_jax import sharding

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- data


def _labels(rng, n, with_singletons=True):
  """Classes of 1 to 9 members, shuffled (some singletons)."""
  sizes = rng.integers(1 if with_singletons else 2, 10, size=n)
  labels = np.repeat(np.arange(n), sizes)[:n]
  return rng.permutation(labels) * 7 + 3  # arbitrary, non-dense label values


def _continuous(seed, n, dim=32):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, dim)).astype(np.float32)
  return x, _labels(rng, n)


def _lattice(seed, n, dim=5):
  """Integer vectors with squared norm 256, scaled by 1/16: exactly unit norm in float32.

  Labels follow the vector's direction 60% of the time (12 classes), so items of the query's
  label crowd the top of its ranking, tied with items of other labels.
  """
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < n:
    v = rng.integers(-16, 17, size=(20000, dim))
    out.extend(v[np.sum(v * v, axis=1) == 256])
  v = np.asarray(out[:n])
  direction = np.abs(v[:, 0]) // 3 + 6 * (v[:, 1] > 0)
  labels = np.where(rng.random(n) < 0.6, direction, rng.integers(0, 12, n))
  return (v / 16.0).astype(np.float32), labels


# ----------------------------------------------------------------------------- references


def _sims(q, g):
  qn = q.astype(np.float64) / np.linalg.norm(q.astype(np.float64), axis=1, keepdims=True)
  gn = g.astype(np.float64) / np.linalg.norm(g.astype(np.float64), axis=1, keepdims=True)
  return qn @ gn.T


def _ranked(q, qy, g=None, gy=None):
  """Per query: (correctness of the gallery in ranked order, R). Ties: wrong items first."""
  self_retrieval = g is None
  if self_retrieval:
    g, gy = q, qy
  sims = _sims(q, g)
  out = []
  for i in range(len(q)):
    keep = np.ones(len(g), bool)
    if self_retrieval:
      keep[i] = False
    s, correct = sims[i][keep], (gy == qy[i])[keep]
    order = np.lexsort((correct, -s))  # by similarity descending, then wrong (False) first
    out.append((correct[order], int(correct.sum())))
  return out


def _ref_ranks(q, qy, g=None, gy=None):
  gallery_size = len(q) if g is None else len(g)
  return np.array([np.argmax(c) if c.any() else gallery_size for c, _ in _ranked(q, qy, g, gy)])


def _ref_recall(q, qy, ks, g=None, gy=None):
  ranks = _ref_ranks(q, qy, g, gy)
  return {k: float(np.mean(ranks < k)) for k in ks}


def _ref_map_at_r(q, qy, g=None, gy=None):
  aps, rps = [], []
  for correct, r in _ranked(q, qy, g, gy):
    if r == 0:
      continue
    top = correct[:r]
    precision_at = np.cumsum(top) / np.arange(1, r + 1)
    aps.append(np.sum(precision_at * top) / r)
    rps.append(np.mean(top))
  return {"MAP_R": float(np.mean(aps)), "RP": float(np.mean(rps))}


def _gaps_to_best(q, qy, g=None, gy=None):
  """Per query with a correct item: (|s - best correct| of every other item, whether each is
  correct), float64."""
  self_retrieval = g is None
  if self_retrieval:
    g, gy = q, qy
  sims = _sims(q, g)
  for i in range(len(q)):
    keep = np.ones(len(g), bool)
    if self_retrieval:
      keep[i] = False
    s, correct = sims[i][keep], (gy == qy[i])[keep]
    if correct.any():
      yield i, np.abs(s - s[correct].max()), correct


def _min_gap_to_best(q, qy, g=None, gy=None):
  """Smallest |s - best correct| over the other items: a margin for float32 vs float64."""
  return min(np.sort(d)[1] if len(d) > 1 else 1.0  # [0] is the best item itself
             for _, d, _ in _gaps_to_best(q, qy, g, gy))


def _near_ties(q, qy, g=None, gy=None, eps=1e-6):
  """Per query: (some item within (0, eps] of its best correct similarity, some wrong item
  exactly tied with it), in float64. Near ties may rank either way in float32."""
  near, exact = np.zeros(len(q), bool), np.zeros(len(q), bool)
  for i, d, correct in _gaps_to_best(q, qy, g, gy):
    near[i] = np.any((d > 0) & (d <= eps))
    exact[i] = np.any((d == 0) & ~correct)
  return near, exact


# ----------------------------------------------------------------------------- recall


KS = (1, 2, 3, 5, 10, 100, 1000)


@pytest.fixture(params=["host", "device"])
def rank_path(request, monkeypatch):
  """First-hit ranks on CPU through NumPy on the host (the default), or the jitted kernels."""
  monkeypatch.setattr(evaluation, "_HOST_PATH_ON_CPU", request.param == "host")
  return request.param


@pytest.mark.parametrize("max_bytes", [evaluation.DEFAULT_MAX_BYTES, 10_000])
def test_recall_self_matches_bruteforce(max_bytes, rank_path):
  x, y = _continuous(0, 301)
  assert _min_gap_to_best(x, y) > 1e-6  # no near-ties: float32 must agree with float64
  np.testing.assert_array_equal(
      evaluation.first_hit_ranks(x, y, max_bytes=max_bytes), _ref_ranks(x, y))
  assert evaluation.recall_at_k(x, y, KS, max_bytes=max_bytes) == _ref_recall(x, y, KS)


def test_tiny_budget_makes_many_blocks_with_a_padded_last_one():
  x, y = _continuous(0, 301)
  plan = evaluation._Plan(x, y, None, None, mesh=None)
  bytes_per_row = 4 * 301
  block = plan.block_rows(10_000, bytes_per_row, 10**6, 301)
  assert block < 301 // 10 and 301 % block != 0
  assert block % len(jax.devices()) == 0
  # Blocks are as equal as the budget allows: here 301 rows in 2 blocks of 152 (or 8 x 151).
  assert plan.block_rows(10**9, bytes_per_row, 160, 301) * len(jax.devices()) >= 301 / 2
  assert plan.block_rows(10**9, bytes_per_row, 160, 301) < 160 * len(jax.devices())


def test_recall_query_gallery_matches_bruteforce(rank_path):
  x, y = _continuous(1, 420)
  q, qy, g, gy = x[:120], y[:120], x[120:], y[120:]
  qy = qy.copy()
  qy[:10] = -5  # labels absent from the gallery: always a miss
  assert not np.isin(-5, gy)
  assert _min_gap_to_best(q, qy, g, gy) > 1e-6
  for max_bytes in (evaluation.DEFAULT_MAX_BYTES, 12_345):
    np.testing.assert_array_equal(
        evaluation.first_hit_ranks(q, qy, g, gy, max_bytes=max_bytes), _ref_ranks(q, qy, g, gy))
    assert (evaluation.recall_at_k(q, qy, KS, g, gy, max_bytes=max_bytes)
            == _ref_recall(q, qy, KS, g, gy))
  assert np.all(evaluation.first_hit_ranks(q, qy, g, gy)[:10] == len(g))


@pytest.mark.slow
@pytest.mark.parametrize("member_table,dim", [(True, 5), (False, 5), (True, 4)])
def test_exact_ties_everywhere_match_the_tie_rule(monkeypatch, member_table, dim, rank_path):
  if not member_table:  # the masked pass used for very large classes
    monkeypatch.setattr(evaluation, "_MEMBER_TABLE_MIN", 0)
    monkeypatch.setattr(evaluation, "_MEMBER_TABLE_MAX_FRACTION", 0.0)
  # dim 5: 240 distinct points; dim 4: only 24, so most items have exact duplicates (of other
  # labels too), and a query is often not among its own nearest (duplicates of lower index).
  x, y = _lattice(2, 240, dim)
  # The tie rule decides many first hits here (with ties for the query, ranks would differ).
  sims = _sims(x, x)
  np.fill_diagonal(sims, -np.inf)
  best = np.array([sims[i][y == y[i]].max() for i in range(len(y))])
  tied_wrong = np.sum((sims == best[:, None]) & (y[None, :] != y[:, None]), axis=1)
  assert np.sum(tied_wrong > 0) > 40
  np.testing.assert_array_equal(evaluation.first_hit_ranks(x, y, max_bytes=20_000),
                                _ref_ranks(x, y))
  q, qy, g, gy = x[:60], y[:60], x[60:], y[60:]
  np.testing.assert_array_equal(evaluation.first_hit_ranks(q, qy, g, gy), _ref_ranks(q, qy, g, gy))
  got = evaluation.map_at_r(x, y, max_bytes=30_000)
  want = _ref_map_at_r(x, y)
  # Class (c) in effect: lattice sims are exact in float32, so the rankings are identical and
  # only the averaging of the APs may round (float64 vs float32 mean: measured error 0).
  assert got == pytest.approx(want, abs=1e-6)
  assert evaluation.map_at_r(q, qy, g, gy) == pytest.approx(_ref_map_at_r(q, qy, g, gy), abs=1e-6)


def test_tie_rule_on_duplicates(rank_path):
  e = np.eye(4, dtype=np.float32)
  # Query 0 (label 0): its own-label item 1 and a wrong-label item 2 are both exact copies of
  # it, so they tie at similarity 1; the wrong one is ranked ahead (ties count against it).
  embeddings = np.stack([e[0], e[0], e[0], e[1], e[2]])
  labels = np.array([0, 0, 1, 2, 3])
  ranks = evaluation.first_hit_ranks(embeddings, labels)
  assert ranks[0] == 1 and ranks[1] == 1  # each has the other as correct, item 2 ahead
  assert ranks[2] == 5  # label 1 has no other item: a miss (the gallery size)
  recall = evaluation.recall_at_k(embeddings, labels, [1, 2])
  assert recall == {1: 0.0, 2: 0.4}
  # MAP@R: R = 1 for queries 0 and 1, whose first place goes to the tied wrong item.
  assert evaluation.map_at_r(embeddings, labels) == {"MAP_R": 0.0, "RP": 0.0}
  # Against a gallery: the same rule.
  ranks = evaluation.first_hit_ranks(e[:1], [0], np.stack([e[0], e[0]]), [0, 1])
  assert ranks.tolist() == [1]
  # The R-th place ties with the query's own similarity (1): three copies of label 0 and one
  # of label 1. For each label-0 query (R = 2) the ranking is: the label-1 copy, then the two
  # other label-0 copies -> AP@R = (1/2) / 2, RP = 1/2; labels 1 and 3 have R = 0 (left out).
  embeddings = np.stack([e[0], e[0], e[0], e[0], e[1]])
  labels = np.array([0, 0, 0, 1, 3])
  assert evaluation.map_at_r(embeddings, labels) == {"MAP_R": 0.25, "RP": 0.5}
  assert evaluation.first_hit_ranks(embeddings, labels).tolist() == [1, 1, 1, 5, 5]


@pytest.mark.slow
def test_exact_duplicates_of_continuous_embeddings(rank_path):
  """Copies of Gaussian embeddings under another label tie exactly with their originals.

  Unlike lattice data, these similarities are rounded, so the tie rule holds only if every
  comparison uses the same float32 values (a best similarity computed apart from the block's
  matmul would differ from it in the last bits for ~10% of these queries).
  """
  rng = np.random.default_rng(11)
  x, y = _continuous(12, 400, dim=48)
  copies = rng.choice(400, 60, replace=False)
  x = np.concatenate([x, x[copies]])
  y = np.concatenate([y, y[copies] + 1000])
  order = rng.permutation(len(x))
  x, y = x[order], y[order]
  q, qy, g, gy = x[:100], y[:100], x[100:], y[100:]
  for args in ((x, y), (q, qy, g, gy)):
    # Items within 1e-6 of the best correct one (not copies) may rank either way in float32,
    # depending on the BLAS kernel; every other query must rank as in float64, copies tied.
    near, exact = _near_ties(*args)
    assert near.mean() < 0.02 and exact[~near].sum() >= 5
    np.testing.assert_array_equal(evaluation.first_hit_ranks(*args)[~near],
                                  _ref_ranks(*args)[~near])


def test_collapsed_embedding_scores_zero(rank_path):
  x = np.ones((40, 16), np.float32)  # everything ties (exactly: entries 1/4 after normalizing)
  y = np.repeat(np.arange(8), 5)
  assert evaluation.recall_at_k(x, y, [1, 10, 35]) == {1: 0.0, 10: 0.0, 35: 0.0}
  assert evaluation.recall_at_k(x, y, [36]) == {36: 1.0}  # 35 wrong items ahead, then a hit
  assert evaluation.map_at_r(x, y) == {"MAP_R": 0.0, "RP": 0.0}
  assert evaluation.recall_at_k(x[:5], y[:5], [1], x[5:], y[5:]) == {1: 0.0}


# ----------------------------------------------------------------------------- MAP@R


@pytest.mark.slow
def test_map_at_r_matches_reference():
  x, y = _continuous(3, 260)
  for max_bytes in (evaluation.DEFAULT_MAX_BYTES, 40_000):
    got = evaluation.map_at_r(x, y, max_bytes=max_bytes)
    # Continuous data without near-ties (module docstring): the same rankings as float64, so
    # only the mean of the APs rounds; measured error 0 under SSE4_2, AVX and default.
    assert got == pytest.approx(_ref_map_at_r(x, y), abs=1e-6)
  q, qy, g, gy = x[:80], y[:80].copy(), x[80:], y[80:]
  qy[:5] = -1  # absent from the gallery: R = 0, left out
  assert evaluation.map_at_r(q, qy, g, gy) == pytest.approx(_ref_map_at_r(q, qy, g, gy),
                                                             abs=1e-6)


def test_map_at_r_hand_made():
  e = np.eye(6, dtype=np.float32)
  # Query 0 (label 0) against a gallery ranked by construction: sims 1, .8, .6, .4 (dim 0).
  def v(s):
    return np.array([s, np.sqrt(1 - s * s), 0, 0, 0, 0], np.float32)
  gallery = np.stack([v(1.0), v(0.8), v(0.6), v(0.4), e[2]])
  gallery_labels = np.array([0, 1, 0, 0, 5])  # R = 3: ranked correct, wrong, correct, correct
  got = evaluation.map_at_r(e[:1], [0], gallery, gallery_labels)
  # top R = 3: correct, wrong, correct -> AP = (1/1 + 2/3) / 3, RP = 2/3.
  # Rankings fixed by construction; the values are exact fractions (measured error 0).
  assert got == pytest.approx({"MAP_R": (1 + 2 / 3) / 3, "RP": 2 / 3}, abs=1e-6)
  nan = evaluation.map_at_r(e[:2], [0, 1], e[2:4], [2, 3])
  assert np.isnan(nan["MAP_R"]) and np.isnan(nan["RP"])


# ----------------------------------------------------------------------------- top k, chains


def test_top_k_indices_match_argsort():
  x, _ = _continuous(4, 500, dim=24)
  q, g = x[:70], x[70:]
  want = np.argsort(-_sims(q, g), axis=1, kind="stable")[:, :25]
  for max_bytes in (evaluation.DEFAULT_MAX_BYTES, 9_000):
    got = evaluation.top_k_indices(q, g, k=25, max_bytes=max_bytes)
    assert got.shape == (70, 25) and got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
  # Exact ties: the lower gallery index first.
  xl, _ = _lattice(5, 200)
  want = np.argsort(-_sims(xl[:30], xl[30:]), axis=1, kind="stable")[:, :40]
  np.testing.assert_array_equal(evaluation.top_k_indices(xl[:30], xl[30:], k=40), want)


def test_chain_recall_hand_made():
  top = np.array([[3, 1, 2],   # chain 7: gallery 3 is chain 9, 1 is chain 7 -> hit at 2
                  [0, 2, 4],   # chain 9: hit at 1
                  [4, 4, 4],   # unknown chain (-1): left out
                  [2, 0, 1]])  # chain 5: never
  gallery_chains = np.array([9, 7, -1, 9, 2])
  query_chains = np.array([7, 9, -1, 5])
  got = evaluation.chain_recall(top, query_chains, gallery_chains, ks=(1, 2, 3))
  assert got == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 2 / 3})  # integer counts: error 0
  got = evaluation.chain_recall(top, [-1, -1, -1, -1], gallery_chains, ks=(1,))
  assert np.isnan(got[1])


def test_chain_recall_matches_numpy():
  rng = np.random.default_rng(6)
  top = rng.integers(0, 1000, size=(300, 10))
  gallery_chains = rng.integers(-1, 20, size=1000)
  query_chains = rng.integers(-1, 20, size=300)
  got = evaluation.chain_recall(top, query_chains, gallery_chains, ks=(1, 3, 5, 10))
  known = query_chains >= 0
  for k in (1, 3, 5, 10):
    hits = [np.any(gallery_chains[top[i, :k]] == query_chains[i]) for i in np.flatnonzero(known)]
    assert got[k] == pytest.approx(np.mean(hits))  # integer counts, float64 means: error 0


def test_hotels_style_pipeline():
  x, y = _continuous(7, 400, dim=16)
  q, g = x[:60], x[60:]
  top = evaluation.top_k_indices(q, g, k=10)
  gallery_chains = (y[60:] // 5) % 4 - 1
  query_chains = (y[:60] // 5) % 4 - 1
  got = evaluation.chain_recall(top, query_chains, gallery_chains)
  assert set(got) == {1, 3, 5}
  ranked = np.argsort(-_sims(q, g), axis=1, kind="stable")
  known = query_chains >= 0
  hits = gallery_chains[ranked[known, :5]] == query_chains[known, None]
  assert got[5] == pytest.approx(np.mean(hits.any(axis=1)))  # counts; measured error 0


# ----------------------------------------------------------------------------- devices


def _all_metrics(mesh, x, y):
  q, qy, g, gy = x[:90], y[:90], x[90:], y[90:]
  return {
      "self_ranks": evaluation.first_hit_ranks(x, y, max_bytes=30_000, mesh=mesh).tolist(),
      "ranks": evaluation.first_hit_ranks(q, qy, g, gy, max_bytes=20_000, mesh=mesh).tolist(),
      "map": evaluation.map_at_r(x, y, max_bytes=50_000, mesh=mesh),
      "top": evaluation.top_k_indices(q, g, k=7, max_bytes=20_000, mesh=mesh).tolist(),
  }


@pytest.mark.slow
def test_one_device_and_all_devices_agree(rank_path):
  x, y = _lattice(8, 250)
  one = _all_metrics(sharding.create_mesh(jax.devices()[:1]), x, y)
  every = _all_metrics(None, x, y)  # default: a mesh over all devices
  assert one == every
  assert one["self_ranks"] == _ref_ranks(x, y).tolist()


@pytest.mark.slow
def test_eight_simulated_devices_in_a_subprocess():
  script = textwrap.dedent("""
      import json, sys
      import jax, numpy as np
      sys.path.insert(0, sys.argv[1])
      from tests.test_evaluation import _all_metrics, _lattice
      from hn_jax import evaluation, sharding
      assert len(jax.devices()) == 8, jax.devices()
      evaluation._HOST_PATH_ON_CPU = False  # the jitted kernels, sharded over the mesh
      x, y = _lattice(8, 250)
      one = _all_metrics(sharding.create_mesh(jax.devices()[:1]), x, y)
      eight = _all_metrics(sharding.create_mesh(), x, y)
      print(json.dumps({"equal": one == eight, "ranks": eight["self_ranks"]}))
  """)
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "")
                      + " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", script, str(REPO)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["equal"]
  x, y = _lattice(8, 250)
  assert result["ranks"] == _ref_ranks(x, y).tolist()


def test_duplicates_are_found_exactly():
  rng = np.random.default_rng(5)
  x = rng.standard_normal((500, 12)).astype(np.float32)
  x[rng.choice(500, 150)] = x[rng.choice(500, 150)]  # copies, some of copies
  x[10] = -0.0 * x[10]  # signed zeros differ bitwise from +0.0: not duplicates of each other
  x[11] = 0.0
  x[12] = x[13] + np.float32(1e-7) * x[13]  # one ulp-ish apart: not a duplicate
  duplicates, originals = evaluation._duplicates(x)
  _, first, inverse = np.unique(x.view(np.uint32), axis=0, return_index=True,
                                return_inverse=True)
  want_duplicates = np.setdiff1d(np.arange(500), first)
  np.testing.assert_array_equal(np.sort(duplicates), want_duplicates)
  np.testing.assert_array_equal(originals[np.argsort(duplicates)],
                                first[inverse.reshape(-1)][want_duplicates])
  assert np.all(originals < duplicates)
  assert evaluation._duplicates(np.zeros((0, 3), np.float32))[0].shape == (0,)
  # Rows that agree on their first columns (the hashed ones) but not after: not duplicates,
  # except the exact copies among them.
  y = np.ones((300, 40), np.float32)
  y[:, -1] = np.arange(300) % 100
  duplicates, originals = evaluation._duplicates(y)
  np.testing.assert_array_equal(np.sort(duplicates), np.arange(100, 300))
  np.testing.assert_array_equal(originals[np.argsort(duplicates)], np.arange(100, 300) % 100)


def test_duplicate_columns_tie_whatever_the_matmul(monkeypatch, rank_path):
  """Copies keep the tie rule even where the matmul rounds one dot product two ways."""
  real_matmul = jnp.matmul if rank_path == "device" else np.matmul
  module = jnp if rank_path == "device" else np

  def skewed_matmul(a, b, **kwargs):  # a kernel whose rounding depends on the column
    out = real_matmul(a, b, **{k: v for k, v in kwargs.items() if k != "out"})
    out = out * (1 + module.arange(out.shape[1]) * 1e-7).astype(out.dtype)
    if "out" in kwargs:
      kwargs["out"][...] = out
      return kwargs["out"]
    return out

  monkeypatch.setattr(module, "matmul", skewed_matmul)
  x, y = _continuous(3, 200, dim=24)
  x = np.concatenate([x, x[:50]])
  y = np.concatenate([y, y[:50] + 1000])  # each copy under another label: always ahead
  ranks = evaluation.first_hit_ranks(x, y)
  want = _ref_ranks(x, y)
  # The skew moves similarities by up to 2e-5 (relative): items that close to the best
  # correct one (not copies) may rank either way; every other query must rank as in float64.
  near, exact = _near_ties(x, y, eps=5e-5)
  assert near.mean() < 0.05 and exact[~near].sum() >= 20
  np.testing.assert_array_equal(ranks[~near], want[~near])


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors():
  x = np.zeros((5, 4), np.float32)
  y = np.arange(5)
  with pytest.raises(ValueError, match="5 embeddings but 4 labels"):
    evaluation.recall_at_k(x, y[:4], [1])
  with pytest.raises(ValueError, match="dimension 4 but the gallery 3"):
    evaluation.recall_at_k(x, y, [1], np.zeros((6, 3)), np.arange(6))
  with pytest.raises(ValueError, match="6 gallery embeddings but 5 gallery_labels"):
    evaluation.recall_at_k(x, y, [1], np.zeros((6, 4)), np.arange(5))
  with pytest.raises(ValueError, match="both gallery and gallery_labels"):
    evaluation.recall_at_k(x, y, [1], np.zeros((6, 4)))
  with pytest.raises(ValueError, match="2-D"):
    evaluation.recall_at_k(np.zeros(5), y, [1])
  with pytest.raises(ValueError, match="at least 1"):
    evaluation.recall_at_k(x, y, [0])
  with pytest.raises(ValueError, match="5 embeddings but 4 labels"):
    evaluation.map_at_r(x, y[:4])
  with pytest.raises(ValueError, match="dimension 4 but the gallery 3"):
    evaluation.map_at_r(x, y, np.zeros((6, 3)), np.arange(6))
  with pytest.raises(ValueError, match="dimension 4 but the gallery 3"):
    evaluation.top_k_indices(x, np.zeros((6, 3)))
  with pytest.raises(ValueError, match="k must be between 1 and the gallery size 6"):
    evaluation.top_k_indices(x, np.zeros((6, 4)), k=7)
  with pytest.raises(ValueError, match="max_bytes"):
    evaluation.recall_at_k(x, y, [1], max_bytes=0)
  with pytest.raises(ValueError, match="query_chains"):
    evaluation.chain_recall(np.zeros((3, 5), int), [1, 2], np.zeros(10))
  with pytest.raises(ValueError, match="between 1 and 5"):
    evaluation.chain_recall(np.zeros((3, 5), int), [1, 2, 3], np.zeros(10), ks=(6,))


def test_train_call_and_empty_input_still_work():
  x, y = _continuous(9, 50)
  assert evaluation.recall_at_k(x, y, [1, 2]) == _ref_recall(x, y, [1, 2])  # as train.py calls it
  assert evaluation.recall_at_k(np.zeros((0, 4)), np.zeros(0, int), [1]) == {1: 0.0}
  assert evaluation.first_hit_ranks(np.zeros((0, 4)), np.zeros(0, int)).shape == (0,)
