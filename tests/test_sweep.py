"""A tiny sweep on the embedded default (2 methods x 2 seeds), made by the table command
(hn_jax.tools.reproduce), read back by the report and checked against the event files."""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hn_jax.tools import report, reproduce

pytestmark = pytest.mark.slow  # trains whole runs

REPO = Path(__file__).resolve().parents[1]
# hn_jax.testing.runs.tiny_config's settings (batch 64, the learning rate 0.05 and its drop
# after epoch 2), one epoch: in the whole suite, the sct runs' programs are those of
# tests/conftest.py's tiny_run (trained by earlier files), from the persistent compilation cache.
TINY = [f"--config={REPO}/configs/digits.py", "--methods=sct,hn", "--lrs=0.05", "--seeds=0,1",
        "--config.image_size=16", "--config.embedding_dim=16", "--config.lr_drop_epochs=(2,)",
        "--config.num_epochs=1", "--config.eval_every=1"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  """The table command's runs (one rate, searched on seeds 0 and 1, which are also the
  table's: 2 x 2 runs), its stdout, stderr and arguments."""
  top = tmp_path_factory.mktemp("sweep")
  argv = [f"--root={top}", f"--figures={top}/fig", f"--json={top}/result.json", *TINY]
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    assert reproduce.main(argv) == 0
  return top, out.getvalue(), err.getvalue(), argv


@pytest.fixture(scope="module")
def sweep(made):
  return made[0] / "DIGITS_R50"


def test_report_table_matches_the_event_files(sweep):
  result = subprocess.run([sys.executable, "-m", "hn_jax.tools.report", str(sweep), "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
  rows = json.loads(result.stdout)
  by_key = {(r["group"], r["metric"]): r for r in rows}
  assert len(rows) == 2 * 4  # 2 groups x R@1, 2, 4, 8
  for method in ("sct", "hn"):
    group = f"{method}_B64_R1_D16_lr0.05_lam1.0"
    for k in (1, 2, 4, 8):
      finals = []
      for seed in (0, 1):
        scalars = report.load_scalars(sweep / group / str(seed))
        steps = [p[0] for p in scalars[f"DIGITS_test_R_{k}"]]
        assert steps == [0, 1]
        finals.append(scalars[f"DIGITS_test_R_{k}"][-1][2])
      row = by_key[(group, f"DIGITS_test_R_{k}")]
      assert row["n"] == 2
      # float64 statistics of a few float32 logs, two formulas: ~1e-16 apart, no kernels.
      assert row["mean"] == pytest.approx(np.mean(finals), abs=1e-9)
      assert row["std"] == pytest.approx(np.std(finals, ddof=1), abs=1e-9)
  text = subprocess.run([sys.executable, "-m", "hn_jax.tools.report", str(sweep)], cwd=REPO,
                        capture_output=True, text=True, timeout=120, check=True).stdout
  assert "sct_B64_R1_D16_lr0.05_lam1.0" in text and "DIGITS_test_R_8" in text


def test_report_plot(sweep, tmp_path):
  out = tmp_path / "sweep.png"
  subprocess.run([sys.executable, "-m", "hn_jax.tools.report", str(sweep), "--plot", str(out)],
                 cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
  with Image.open(out) as image:
    assert image.format == "PNG" and image.width >= 600 and image.height >= 300


def test_table_command(made):
  top, out, _, _ = made
  result = json.loads((top / "result.json").read_text())
  base = top / "DIGITS_R50"
  group = "{}_B64_R1_D16_lr{}_lam1.0"
  assert {(r["method"], r["lr"]) for r in result["search"]} == {("sct", "0.05"), ("hn", "0.05")}
  for r in result["search"]:  # seeds 0 and 1, the default search seeds
    runs = [report.load_scalars(base / group.format(r["method"], r["lr"]) / s) for s in "01"]
    assert r["r1_per_seed"] == [x["DIGITS_test_R_1"][-1][2] for x in runs]
    # float64 mean of a few values by two routes: ~1e-16 apart, no CPU-dependent kernels.
    assert r["r1"] == pytest.approx(np.mean(r["r1_per_seed"]), abs=1e-12)
    assert r["collapsed"] == any(report.is_collapsed(x) for x in runs)
  assert result["chosen"] == {"sct": "0.05", "hn": "0.05"}
  for method, lr in result["chosen"].items():
    # The paper's table: mean +- std over the seeds at the chosen rate, in percent.
    runs = [report.load_scalars(base / group.format(method, lr) / s) for s in ("0", "1")]
    dead = [report.is_collapsed(r) for r in runs]
    line = next(x for x in out.splitlines() if x.startswith(f"| {method} | {lr} |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[-2:] == ["2", f"{sum(dead)}/2"]
    for k, cell in zip((1, 2, 4, 8), cells[2:6]):
      finals = [r[f"DIGITS_test_R_{k}"][-1][2] for r, d in zip(runs, dead) if all(dead) or not d]
      if all(dead):
        assert cell == "collapse"
      else:
        std = np.std(finals, ddof=1) if len(finals) > 1 else 0.0
        assert cell.startswith(f"{100 * np.mean(finals):.2f} +- {100 * std:.2f}")
  for name in ("fig_hn_ratio.png", "fig_recall.png"):
    with Image.open(top / name) as image:
      assert image.format == "PNG" and image.width >= 600


def test_table_command_again_reuses_runs_and_refuses_another_config(made, capsys):
  top, out, _, argv = made
  assert reproduce.main(argv) == 0  # every run is already done: nothing trains
  again = capsys.readouterr()
  assert again.err.count("already done") == 4 + 4 and " s\n" not in again.err
  assert again.out == out
  assert reproduce.main([*argv, "--config.temperature=0.2"]) == 2
  err = capsys.readouterr().err.strip()
  assert "another config" in err and "temperature" in err and "\n" not in err
  assert err.startswith("hn_jax.tools.reproduce: error:")


def test_a_run_whose_final_checkpoint_is_damaged_is_trained_again(made, capsys, caplog):
  top, _, _, argv = made
  runs = sorted({p.parent.parent.parent for p in top.rglob("checkpoints/*/state")})
  final = max((p for p in (runs[0] / "checkpoints").iterdir() if p.name.isdigit()),
              key=lambda p: int(p.name))
  (final / "state" / "_METADATA").write_bytes(b"not json")
  assert reproduce.main(argv) == 0
  err = capsys.readouterr().err
  assert err.count("already done") == 4 + 3, "the other runs are reused"
  warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert warnings and all(f"The checkpoint of step {final.name} is damaged" in w
                          for w in warnings), warnings
  assert (runs[0] / "checkpoints_damaged" / final.name).is_dir()


def test_ctrl_c_stops_the_study_and_the_same_command_resumes_it(tmp_path, monkeypatch, capsys):
  import signal
  from hn_jax.testing.runs import signal_at_step
  argv = [f"--root={tmp_path}", TINY[0], "--methods=sct", TINY[2], *TINY[4:], "--seeds=0",
          "--search_seeds=0"]  # one run
  signal_at_step(monkeypatch, 3, signal.SIGINT)
  assert reproduce.main(argv) == 130
  err = capsys.readouterr().err
  assert "hn_jax.tools.reproduce: Ctrl-C: saved the checkpoint of step 3" in err
  monkeypatch.undo()
  assert reproduce.main(argv) == 0
  captured = capsys.readouterr()
  # The interrupted run trains on (its search line), then the table reuses it.
  assert "| sct | 0.05 |" in captured.out and captured.err.count("already done") == 1
