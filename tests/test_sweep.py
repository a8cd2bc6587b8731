"""A tiny sweep on the embedded default (2 methods x 2 seeds) read back by the report."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import digits
from hn_jax import report, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  root = tmp_path_factory.mktemp("sweep") / "DIGITS_R50"
  for method in ("sct", "hn"):
    for seed in (0, 1):
      config = digits.get_config()
      config.update(dict(loss=method, seed=seed, image_size=16, embedding_dim=16,
                         batch_size=128, num_epochs=1, eval_every=1))
      workdir = root / f"{method}_B128_R1_D16_lr0.05_lam1.0" / str(seed)
      workdir.mkdir(parents=True)
      train.train_and_evaluate(config, str(workdir))
  return root


def test_report_table_matches_the_event_files(sweep):
  result = subprocess.run([sys.executable, "-m", "hn_jax.report", str(sweep), "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
  rows = json.loads(result.stdout)
  by_key = {(r["group"], r["metric"]): r for r in rows}
  assert len(rows) == 2 * 4  # 2 groups x R@1, 2, 4, 8
  for method in ("sct", "hn"):
    group = f"{method}_B128_R1_D16_lr0.05_lam1.0"
    for k in (1, 2, 4, 8):
      finals = []
      for seed in (0, 1):
        scalars = report.load_scalars(sweep / group / str(seed))
        steps = [p[0] for p in scalars[f"DIGITS_test_R_{k}"]]
        assert steps == [0, 1]
        finals.append(scalars[f"DIGITS_test_R_{k}"][-1][2])
      row = by_key[(group, f"DIGITS_test_R_{k}")]
      assert row["n"] == 2
      assert row["mean"] == pytest.approx(np.mean(finals), abs=1e-9)
      assert row["std"] == pytest.approx(np.std(finals, ddof=1), abs=1e-9)
  text = subprocess.run([sys.executable, "-m", "hn_jax.report", str(sweep)], cwd=REPO,
                        capture_output=True, text=True, timeout=120, check=True).stdout
  assert "sct_B128_R1_D16_lr0.05_lam1.0" in text and "DIGITS_test_R_8" in text


def test_report_plot(sweep, tmp_path):
  out = tmp_path / "sweep.png"
  subprocess.run([sys.executable, "-m", "hn_jax.report", str(sweep), "--plot", str(out)],
                 cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
  with Image.open(out) as image:
    assert image.format == "PNG" and image.width >= 600 and image.height >= 300
