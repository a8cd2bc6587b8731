"""The evaluation benchmark script runs and agrees with itself (its faiss rows need faiss)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hn_jax import evaluation
from hn_jax.testing import benchmarks

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(name="bench")
def fixture_bench(monkeypatch):
  monkeypatch.setattr(evaluation, "_HOST_PATH_ON_CPU", evaluation._HOST_PATH_ON_CPU)
  return benchmarks.load("evaluation")


@pytest.mark.slow
def test_smoke_cases_agree_across_methods(bench):
  for case in bench.SMOKE_CASES:
    results = [bench.worker(case, method, bench.SMOKE_CASES, device_loop=False)
               for method in ("ours", "ours-jit", "numpy-gemm")]
    ours, jit, gemm = results
    assert ours["recall"] == jit["recall"]
    assert set(ours["recall"]) == set(bench.SMOKE_CASES[case]["ks"])
    assert 0.05 < ours["recall"][1] < 0.95  # the data is neither trivial nor hopeless
    assert gemm["steady_s"] > 0
    q, qy, g, gy = bench._data(bench.SMOKE_CASES[case])
    neighbours = evaluation.top_k_indices(q, q if g is None else g, k=101)
    assert bench._recall_from_neighbours(
        neighbours, qy, qy if g is None else gy, [1, 10], g is None) == {
            1: ours["recall"][1], 10: ours["recall"][10]}
    table = bench.table(results)
    assert table.count(f"| {case} |") == 3


def test_unknown_method_is_an_error(bench):
  with pytest.raises(ValueError, match="unknown method"):
    bench.worker("1000x8000x64", "nope", bench.SMOKE_CASES, device_loop=False)


@pytest.mark.slow
def test_runs_without_tensorflow_tfds_or_clu():
  """The GPU machine has none of them: the benchmark and hn_jax.evaluation must not need them."""
  script = textwrap.dedent("""
      import importlib.abc, importlib.util, sys
      class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "clu"):
            raise ImportError("blocked: " + name)
      sys.meta_path.insert(0, Block())
      spec = importlib.util.spec_from_file_location("bench", sys.argv[1])
      bench = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(bench)
      result = bench.worker("1000x8000x64", "ours", bench.SMOKE_CASES, device_loop=True)
      print(result["recall"][1] > 0, result["device_s"] > 0)
  """)
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  out = subprocess.run([sys.executable, "-c", script, str(REPO / "benchmarks/evaluation.py")],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**env, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-2:] == ["True", "True"]
