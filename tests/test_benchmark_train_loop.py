"""benchmarks/train_loop.py: its --smoke run without TensorFlow, TFDS or CLU (issue 13).

The run exercises the whole cached path (synthetic split, decoded-image cache, uint8 crops,
prefetch to the device, the jitted step with its flip and normalization), so it also shows
that training from a cache needs NumPy and JAX only.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_run_without_tensorflow(tmp_path, tiny_run):  # pylint: disable=unused-argument
  out = tmp_path / "loop.json"
  # The 8 CPU devices and the compilation cache of conftest.py, which `tiny_run` (trained
  # anyway for tests/test_train.py and tests/test_faults.py) has filled with this step.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "benchmarks/train_loop.py", "--smoke", "--check_no_tf",
                         f"--json={out}"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "| model | dtype | batch |" in proc.stdout
  result = json.loads(out.read_text())
  assert result["forbidden_loaded"] == []
  (row,) = result["rows"]
  assert row["batch"] == 64 and row["image_size"] == 16 and row["model"] == "small"
  assert row["devices"] == 8
  for key in ("input_images_per_s", "step_images_per_s", "loop_images_per_s"):
    assert row[key] > 0, key
  assert row["final_loss"] == row["final_loss"]  # not NaN
