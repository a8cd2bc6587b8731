"""The command lines: a mistake is one line before anything heavy runs; --help exits 0."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(module, *args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["--config=configs/cars.py", "--workdir=W"],
     "--config=configs/cars.py: no such file; did you mean configs/car.py?"),
    (["--config=configs/digits.py", "--config.los=hn", "--workdir=W"],
     "--config.los: no such setting; did you mean --config.loss?"),
    (["--config=configs/digits.py"], "--workdir is required"),
    (["--workdir=W"], "--config is required"),
    (["--config=configs/digits.py", "--workdir=W", "extra"], "unexpected arguments: extra"),
])
def test_main_mistakes_are_one_line(tmp_path, args, message):
  args = [a.replace("=W", f"={tmp_path / 'wd'}") for a in args]
  result = _run("hn_jax.main", *args)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("hn_jax: error: "), result.stderr[-2000:]
  assert message in lines[0]
  assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("module", [
    "hn_jax.main", "hn_jax.tools.prepare",
    *[pytest.param(m, marks=pytest.mark.slow) for m in  # a process each, importing more
      ("hn_jax.tools.search", "hn_jax.tools.report", "hn_jax.tools.convert_weights")]])
def test_help_exits_zero(module):
  result = _run(module, "--help")
  assert result.returncode == 0, result.stderr[-2000:]
  # The usage line runs: it names the module that was run.
  assert result.stdout.splitlines()[0] == f"usage: python -m {module} [flags]"
  if module == "hn_jax.main":
    assert "docs/settings.md" in result.stdout and "docs/protocol.md" in result.stdout
  if module == "hn_jax.tools.prepare":
    assert "docs/datasets.md" in result.stdout


def test_prepare_flag_mistake_is_one_line():
  result = _run("hn_jax.tools.prepare", "--datset=cub")
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [
      "hn_jax.tools.prepare: error: Unknown command line flag 'datset'. Did you mean: dataset ?"]


def test_library_info_is_hidden_ours_and_warnings_are_not():
  from hn_jax import cli

  def record(path, level):
    return logging.LogRecord("absl", level, path, 1, "message", None, None)

  only_ours = cli._OnlyOurs()
  orbax = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert not only_ours.filter(record(orbax, logging.INFO))
  assert only_ours.filter(record(orbax, logging.WARNING))
  assert only_ours.filter(record(os.path.join(REPO, "hn_jax", "train.py"), logging.INFO))
  # A checkout named hn_jax with its virtual environment inside: the libraries' paths hold
  # "hn_jax" too, and are still not ours.
  inside = os.path.join(REPO, ".venv", "lib", "python3", "site-packages", "orbax", "x.py")
  beside = os.path.join(REPO, "hn_jax_extra", "x.py")
  for path in (inside, beside, "/tmp/x/hn_jax/.venv/lib/site-packages/orbax/checkpoint/x.py"):
    assert not cli.logged_by_hn_jax(record(path, logging.INFO)), path
    assert not only_ours.filter(record(path, logging.INFO)), path
  assert cli.logged_by_hn_jax(record(os.path.join(REPO, "hn_jax", "data", "x.py"), logging.INFO))


def test_a_workdir_of_another_config_is_refused_at_once(tmp_path):
  from configs import digits
  from hn_jax import run_config
  run_config.record(digits.get_config(), str(tmp_path))
  before = sorted(p.name for p in tmp_path.iterdir())
  result = _run("hn_jax.main", "--config=configs/digits.py", f"--workdir={tmp_path}",
                "--config.seed=1")
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [
      f"hn_jax: error: {tmp_path} holds a run of another config: config.seed=1 but the run has "
      "0. These settings cannot change mid-run: use a new --workdir, or drop the overrides to "
      f"resume the run as it was (its settings: {tmp_path}/config.json)"]
  assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_error_in_the_config_file_is_one_line_naming_it(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config():\n  return undefined_name\n")
  result = _run("hn_jax.main", f"--config={bad}", f"--workdir={tmp_path / 'wd'}")
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [
      f"hn_jax: error: --config={bad}: line 2: NameError: name 'undefined_name' is not defined"]


@pytest.mark.slow
def test_the_checkouts_configs_work_from_any_folder(tmp_path):
  """The README's `--config=configs/X.py` from another folder: the checkout's file."""
  # hn_jax importable from anywhere, as the README's editable install makes it.
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  result = subprocess.run([sys.executable, "-m", "hn_jax.main", "--config=configs/vit_s16.py:sop",
                           f"--workdir={tmp_path / 'wd'}", "--config.batch_size=-3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip() == "hn_jax: error: config.batch_size=-3 must be a positive integer"
  result = subprocess.run([sys.executable, "-m", "hn_jax.main", "--config=configs/digitz.py",
                           f"--workdir={tmp_path / 'wd'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
  assert "no such file; did you mean configs/digits.py?" in result.stderr


def test_a_closed_stdout_stops_a_command_quietly():
  """`| head`: no BrokenPipeError traceback, exit status 141 (as Unix tools)."""
  reader = subprocess.Popen([sys.executable, "-m", "hn_jax.tools.report", "--help"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  reader.stdout.close()  # nobody reads: the first write fails
  _, err = reader.communicate(timeout=120)
  assert reader.returncode in (0, 141) and b"Traceback" not in err, err.decode()[-2000:]
