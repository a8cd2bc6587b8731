"""benchmarks/losses.py: its smoke run times our losses and PML's equivalents, and their
values agree."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hn_jax import losses
from hn_jax.testing import benchmarks

REPO = Path(__file__).resolve().parents[1]

@pytest.mark.slow
def test_smoke_run_times_ours_and_pml(tmp_path):
  pytest.importorskip("pytorch_metric_learning")
  out = tmp_path / "result.json"
  env = benchmarks.quick_compile_env(TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "benchmarks/losses.py", "--smoke",
                         "--losses=hn,contrastive", f"--json={out}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(out.read_text())
  rows = {(r["loss"], r["batch"], r["memory"]): r for r in result["rows"]}
  for batch in (16, 32):  # no PML equivalent
    assert rows["hn", batch, 0]["jax_ms"] > 0 and "pml_ms" not in rows["hn", batch, 0]
  for batch in (16, 32):
    for memory in (0, 64):  # contrastive takes cross-batch memory: timed with it too
      row = rows["contrastive", batch, memory]
      assert row["pml_ms"] > 0 and row["speedup"] == pytest.approx(row["pml_ms"] / row["jax_ms"])
      # The same loss twice (float32 both): its values agree.
      assert row["jax_value"] == pytest.approx(row["pml_value"], rel=1e-5), row
  assert "geometric mean speedup at batch >= 32" in proc.stdout


@pytest.mark.slow  # imports torch (15 s on the loaded 2 cores)
def test_pml_names_and_hyperparameters():
  pytest.importorskip("pytorch_metric_learning")
  bench = benchmarks.load("losses")
  assert bench.pml_class("hn") is None
  assert bench.pml_class("proxy_anchor").__name__ == "ProxyAnchorLoss"
  assert bench.pml_class("multi_similarity").__name__ == "MultiSimilarityLoss"
  assert bench.pml_class("ntxent").__name__ == "NTXentLoss"
  assert bench.pml_class("fast_ap").__name__ == "FastAPLoss"
  assert bench.pml_class("proxy_nca").__name__ == "ProxyNCALoss"
  # Every built-in loss but the paper's has its PML class (other tests register their own).
  built_in = [name for name in losses.NAMES
              if losses.registry.factory_of(name).__module__.startswith("hn_jax.losses")]
  assert len(built_in) == 20
  assert all(bench.pml_class(name) is not None for name in built_in
             if name not in losses.METHODS)
  assert bench.geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
