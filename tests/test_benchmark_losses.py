"""benchmarks/losses.py: its smoke run times our losses (alone, with cross-batch memory, with a
miner) and PML's equivalents, and their values agree."""

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
  # The proxy losses: one per name of their trainable array (proxies, W, fc), copied to PML's.
  proxies = ["proxy_anchor", "arcface", "soft_triple"]
  proc = subprocess.run([sys.executable, "benchmarks/losses.py", "--smoke",
                         f"--losses=hn,contrastive,{','.join(proxies)}", f"--json={out}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(out.read_text())
  rows = {(r["loss"], r["miner"], r["batch"], r["memory"]): r for r in result["rows"]}
  mined = [tuple(combo.split("+")) for combo in benchmarks.load("losses").MINED]
  assert result["miners"] == ["+".join(combo) for combo in mined]  # the default miner rows
  assert len(rows) == len(result["rows"]) == 2 * (1 + 2 + len(proxies) + 2 * len(mined))
  for batch in (16, 32):  # no PML equivalent
    assert rows["hn", "", batch, 0]["jax_ms"] > 0 and "pml_ms" not in rows["hn", "", batch, 0]
  compared = [("contrastive", "", memory) for memory in (0, 64)]  # memory: timed with it too
  compared += [(name, "", 0) for name in proxies]
  compared += [(loss, miner, memory) for loss, miner in mined for memory in (0, 64)]
  for loss, miner, memory in compared:
    for batch in (16, 32):
      row = rows[loss, miner, batch, memory]
      assert row["pml_ms"] > 0 and row["speedup"] == pytest.approx(row["pml_ms"] / row["jax_ms"])
      # The same loss twice (float32 both): its values agree.
      assert row["jax_value"] == pytest.approx(row["pml_value"], rel=1e-5), row
      if miner:
        assert row["pml_miner"].lower() == miner.replace("_", "") + "miner", row
  assert "geometric mean speedup at batch >= 32" in proc.stdout
  assert "triplet_margin+batch_hard" in proc.stdout  # the miner rows' label in the table


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
  # PML's miners by our names, with our defaults.
  assert type(bench.pml_miner("batch_hard")).__name__ == "BatchHardMiner"
  assert bench.pml_miner("multi_similarity").epsilon == 0.1
  triplet = bench.pml_miner("triplet_margin")
  assert (triplet.margin, triplet.type_of_triplets) == (0.2, "all")
