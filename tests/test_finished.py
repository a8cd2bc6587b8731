"""A finished run asked again answers from final.json: no TensorFlow, no JAX, no compile."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hn_jax import finished, run_config
from hn_jax.testing.runs import TINY_OVERRIDES, tiny_config

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"DIGITS_test_R_1": 0.90134, "DIGITS_test_R_2": 0.95, "DIGITS_train_R_1": 0.875}
# tiny_config() as the command line gives it.
TINY_ARGS = ["--config=configs/digits.py"] + [
    f"--config.{k}={v}" for k, v in TINY_OVERRIDES.items()]


def _finished_workdir(folder: Path, steps=(14, 28)) -> Path:
  """A workdir as tiny_config's run leaves it, as far as the answer reads it (the checkpoints'
  folders are empty: the answer does not open them)."""
  run_config.record(tiny_config(), str(folder))
  for step in steps:
    (folder / "checkpoints" / str(step)).mkdir(parents=True)
  finished.record(str(folder), step=28, num_epochs=2, metrics=METRICS, checkpoint_steps=steps)
  return folder


def test_a_finished_run_asked_again_answers_without_tensorflow_or_jax(tmp_path):
  workdir = _finished_workdir(tmp_path / "run")
  check = ("import sys; from hn_jax import main; status = main.main(sys.argv[1:]); "
           "print(status, [m for m in ('jax', 'tensorflow') if m in sys.modules])")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(ROOT)}
  done = subprocess.run([sys.executable, "-c", check, *TINY_ARGS, f"--workdir={workdir}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  lines = done.stdout.splitlines()
  assert lines[-1] == "0 []", done.stderr[-2000:]
  assert lines[:-1] == [
      f"Done already: 2 epochs, step 28. Final evaluation: R_1 0.9013, R_2 0.9500, "
      f"train_R_1 0.8750. Checkpoints (steps 14, 28) in {workdir / 'checkpoints'}; "
      f"TensorBoard event files in {workdir} (tensorboard --logdir={workdir}). Nothing to "
      "train: raise --config.num_epochs to train further"]


def test_the_answer_needs_the_run_finished_as_configured(tmp_path):
  workdir = str(_finished_workdir(tmp_path / "run"))
  assert finished.answer(tiny_config(), workdir).startswith("Done already: 2 epochs, step 28.")
  assert finished.answer(tiny_config(eval_every=2), workdir) is not None, "changeable"
  assert finished.answer(tiny_config(num_epochs=3), workdir) is None, "to be lengthened"


def test_a_run_lengthened_since_is_not_taken_for_finished(tmp_path):
  workdir = _finished_workdir(tmp_path / "run")
  # Lengthened to 3 epochs and stopped in the third: config.json says 3, a newer checkpoint.
  run_config.record(tiny_config(num_epochs=3), str(workdir))
  assert finished.answer(tiny_config(), str(workdir)) is None
  run_config.record(tiny_config(), str(workdir))
  (workdir / "checkpoints" / "35").mkdir()
  assert finished.answer(tiny_config(), str(workdir)) is None
  (workdir / "checkpoints" / "35").rmdir()
  shutil.rmtree(workdir / "checkpoints" / "28")  # the final checkpoint is gone
  assert finished.answer(tiny_config(), str(workdir)) is None


@pytest.mark.parametrize("text", ["", "{", "[]", '{"step": 28}', '{"step": "28", '
                                  '"num_epochs": 2, "metrics": {}}',
                                  '{"step": 28, "num_epochs": 2, "metrics": {"R": "x"}}'])
def test_an_unreadable_final_json_means_the_ordinary_path(tmp_path, text):
  workdir = _finished_workdir(tmp_path / "run")
  (workdir / finished.FILE).write_text(text)
  assert finished.load(str(workdir)) is None
  assert finished.answer(tiny_config(), str(workdir)) is None


def test_no_final_json_means_the_ordinary_path(tmp_path):
  workdir = _finished_workdir(tmp_path / "run")
  (workdir / finished.FILE).unlink()
  assert finished.answer(tiny_config(), str(workdir)) is None
  assert finished.answer(tiny_config(), str(tmp_path / "nothing")) is None


@pytest.mark.slow
def test_a_trained_run_records_its_final_metrics_and_answers_with_them(tiny_run, tmp_path,
                                                                      capsys):
  from hn_jax import main  # pylint: disable=import-outside-toplevel
  run, metrics = tiny_run
  final = json.loads((run / finished.FILE).read_text())
  assert final == {"step": 28, "num_epochs": 2, "metrics": metrics,
                   "checkpoint_steps": [14, 28]}
  workdir = tmp_path / "run"
  shutil.copytree(run, workdir)
  assert main.main([*TINY_ARGS, f"--workdir={workdir}"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("Done already: 2 epochs, step 28. Final evaluation: R_1 "
                        f"{metrics['DIGITS_test_R_1']:.4f}, "), out
