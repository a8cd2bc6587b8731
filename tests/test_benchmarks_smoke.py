"""Every script in benchmarks/ runs end to end at its `--smoke` sizes, so none rots unseen.

The smoke runs test the scripts, not the speed: their figures are not checked against
targets (that is benchmarks/RESULTS.md's job), only that each run finishes, writes its JSON and
that the results it holds are the ones the script computed (counts, agreement, parity).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hn_jax.testing import benchmarks

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py"))

# Scripts whose --smoke run another test already makes (it compiles a training step: running
# it twice would double minutes of the suite), with that test.
SMOKE_ELSEWHERE = {
    "train_step.py": "tests/test_benchmark_train_step.py",
    "train_loop.py": "tests/test_benchmark_train_loop.py",
    "gradient_reduction.py": "tests/test_gradient_reduction.py",
    # These two compile for a TPU target: in-process beside the preflight's own tests.
    "preflight_table.py": "tests/test_preflight.py",
    "mining_precision.py": "tests/test_preflight.py",
    "tensorboard_views.py": "tests/test_tensorboard.py",  # quick: no compile
    # Every kind of row (alone, with memory, with a miner: --miners), values equal to PML's.
    "losses.py": "tests/test_benchmark_losses.py",
}
# The rest: the arguments of their smoke run here (JSON path appended).
SMOKE_HERE = {
    "device_summary.py": ["--smoke"],  # alone: env and table on a temporary OUT
    "evaluation.py": ["--smoke", "--methods=ours,numpy-gemm"],
    "event_reader.py": ["--smoke"],
    "input_pipeline.py": ["--smoke"],
    "pretrained_check.py": ["--smoke"],
}


def test_every_benchmark_has_a_smoke_run():
  assert sorted([*SMOKE_ELSEWHERE, *SMOKE_HERE]) == BENCHMARKS
  for script, test in SMOKE_ELSEWHERE.items():
    text = (REPO / test).read_text()
    assert "--smoke" in text and script in text, f"{test} no longer runs {script} --smoke"
  for script in BENCHMARKS:
    assert "--smoke" in (REPO / "benchmarks" / script).read_text(), script


def _run(script: str, args: list[str], tmp_path: Path) -> tuple[dict, str]:
  """Runs the script with `args` in a subprocess: (its JSON, its stdout)."""
  out = tmp_path / "result.json"
  args = [*args, f"--json={out}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  if script == "pretrained_check.py":
    # Compiling ResNet18 and ViT-S is most of this run: XLA's backend optimization level 0
    # and one OpenMP thread for torch halve it on 2 loaded cores (37 -> 20 s measured). The
    # errors it checks stay ~1e-6 either way (measured 5.1e-7 and 7.5e-7 at the default
    # level, 6.7e-7 and 8.0e-7 at level 0), 100x under the script's 1e-4.
    env.update(OMP_NUM_THREADS="1", XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                                               + " --xla_backend_optimization_level=0").strip())
  proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE_HERE))
def test_smoke_run(script, tmp_path):
  if script == "pretrained_check.py":
    pytest.importorskip("torch")
  result, stdout = _run(script, SMOKE_HERE[script], tmp_path)
  if script == "device_summary.py":  # nothing measured in an empty OUT: every figure missing
    assert result["smoke"] and result["figures"]
    verdicts = {f["verdict"] for f in result["figures"] if f["target"]}
    assert verdicts == {"missing"}, result["figures"]
  elif script == "evaluation.py":
    rows = {(r["case"], r["method"]): r for r in result["results"]}
    assert result["complete"] and len(rows) == 4 and not any("error" in r for r in rows.values())
    # Every recall@k of each case (tests/test_benchmark_evaluation.py checks their values).
    assert set(rows["self-3000x128", "ours"]["recall"]) == {"1", "10", "100"}
    assert set(rows["1000x8000x64", "ours"]["recall"]) == {"1", "10"}
  elif script == "event_reader.py":
    stub, loader, report = result["rows"]
    assert stub["files"] == loader["files"] == report["files"] == 3
    assert stub["items"] == loader["items"]  # the same records, read two ways
    assert report["items"] == 3 * 50 * 2  # every scalar of every run
    assert not stub["tensorflow_imported"] and not report["tensorflow_imported"]
  elif script == "input_pipeline.py":
    assert result["smoke"] and result["batch"] == 8 and result["image_size"] == 32
    counts = {name: r["images"] for name, r in result["results"].items()}
    assert len(counts) == 6 and len(set(counts.values())) == 1, counts  # one epoch each
    assert next(iter(counts.values())) % 8 == 0
  elif script == "pretrained_check.py":
    assert result["complete"] and result["passed"], result
    assert [m["name"] for m in result["models"]] == ["resnet18", "vit_small_patch16"]
    assert all(m["image_size"] == 32 and m["rel_err_highest"] <= 1e-4 for m in result["models"])
  assert stdout.strip(), "the script printed no table"


@pytest.mark.slow
def test_pretrained_check_has_a_googlenet_reference():
  """The smoke run leaves GoogLeNet out (its JAX compile is the slowest): its reference here."""
  torch = pytest.importorskip("torch")
  bench = benchmarks.load("pretrained_check")
  model, features, what = bench._reference("googlenet", 64)  # pylint: disable=protected-access
  model.eval()
  with torch.no_grad():
    out = features(model, torch.zeros(1, 3, 64, 64))
  assert out.shape == (1, 1024) and "googlenet" in what
