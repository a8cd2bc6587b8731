"""benchmarks/losses.py: its smoke run times every registered loss and, through a loss that
PML also has (registered from a user's module, as `--loss_module` allows), PML's."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hn_jax.testing import benchmarks

REPO = Path(__file__).resolve().parents[1]

# PML's ContrastiveLoss at its defaults (pos_margin 0, neg_margin 1, Euclidean distance of
# unit embeddings, each of the positive and negative terms averaged over its nonzero pairs).
CONTRASTIVE = '''
import jax.numpy as jnp
from flax import nnx

from hn_jax import losses


class Contrastive(nnx.Module):
  def __init__(self, pos_margin, neg_margin):
    self.pos_margin, self.neg_margin = pos_margin, neg_margin

  def __call__(self, embeddings, labels):
    u = embeddings / jnp.linalg.norm(embeddings, axis=1, keepdims=True)
    d = jnp.sqrt(jnp.maximum(2.0 - 2.0 * u @ u.T, 1e-12))
    same = labels[:, None] == labels[None, :]
    eye = jnp.eye(len(labels), dtype=bool)
    pos = jnp.where(same & ~eye, jnp.maximum(d - self.pos_margin, 0.0), 0.0)
    neg = jnp.where(~same, jnp.maximum(self.neg_margin - d, 0.0), 0.0)
    mean = lambda x: jnp.sum(x) / jnp.maximum(1, jnp.sum(x > 0))
    return mean(pos) + mean(neg), {}


@losses.register("contrastive")
def contrastive(*, embedding_dim, num_classes, rngs, pos_margin=0.0, neg_margin=1.0):
  return Contrastive(pos_margin, neg_margin)
'''


@pytest.mark.slow
def test_smoke_run_times_ours_and_pml(tmp_path):
  pytest.importorskip("pytorch_metric_learning")
  (tmp_path / "user_contrastive.py").write_text(CONTRASTIVE)
  out = tmp_path / "result.json"
  env = benchmarks.quick_compile_env(PYTHONPATH=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "benchmarks/losses.py", "--smoke",
                         "--loss_module=user_contrastive", f"--json={out}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(out.read_text())
  rows = {(r["loss"], r["batch"], r["memory"]): r for r in result["rows"]}
  for name in ("hn", "shn", "sct"):  # no PML equivalent
    for batch in (16, 32):
      assert rows[name, batch, 0]["jax_ms"] > 0 and "pml_ms" not in rows[name, batch, 0]
  for batch in (16, 32):
    row = rows["contrastive", batch, 0]
    assert row["pml_class"] == "ContrastiveLoss" and row["pml_ms"] > 0
    # The same loss twice (float32 both): its values agree.
    assert row["jax_value"] == pytest.approx(row["pml_value"], rel=1e-5)
    assert row["speedup"] == pytest.approx(row["pml_ms"] / row["jax_ms"])
  assert result["geometric_mean_speedup"] == pytest.approx(rows["contrastive", 32, 0]["speedup"])
  assert "geometric mean speedup at batch >= 32" in proc.stdout


@pytest.mark.slow  # imports torch (15 s on the loaded 2 cores)
def test_pml_names_and_hyperparameters():
  pytest.importorskip("pytorch_metric_learning")
  bench = benchmarks.load("losses")
  assert bench.pml_class("hn") is None
  assert bench.pml_class("proxy_anchor").__name__ == "ProxyAnchorLoss"
  assert bench.pml_class("multi_similarity").__name__ == "MultiSimilarityLoss"
  assert bench.pml_class("ntxent").__name__ == "NTXentLoss"
  assert bench.geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
