"""docs/losses.md ("Your own loss")'s example end to end (a user's module registers a loss with
proxies; `python -m hn_jax.main` trains it), and the loss settings' mistakes on the real
command line: one line each, before anything compiles, nothing written."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hn_jax.testing.runs import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "losses.md"


def _blocks(language):
  section = DOC.read_text().split("## Your own loss", 1)[1]
  return re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)


def _main(args, pythonpath, timeout=600):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=os.pathsep.join([str(pythonpath), str(REPO)]))
  return subprocess.run([sys.executable, "-m", "hn_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _doc_command(folder, workdir):
  """The doc's command line, its placeholders filled in: the arguments after the module."""
  command = _blocks("bash")[0].replace("\\\n", " ")
  command = command.replace("/path/to/folder/of/myloss", str(folder))
  args = shlex.split(command)
  assert args[:3] == [f"PYTHONPATH={folder}", "python", "-m"] and args[3] == "hn_jax.main"
  return [a.replace("/tmp/hn_my_loss", str(workdir)) for a in args[4:]]


@pytest.fixture
def user_module(tmp_path):
  folder = tmp_path / "user"
  folder.mkdir()
  (folder / "myloss.py").write_text(_blocks("python")[0])
  return folder


@pytest.mark.slow
def test_the_docs_own_loss_trains_and_resumes(user_module, tmp_path):
  workdir = tmp_path / "run"
  tiny = [f"--config.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
          for k, v in dict(TINY_OVERRIDES, num_epochs=1).items()]
  result = _main([*_doc_command(user_module, workdir), *tiny], user_module)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Done: 1 epochs" in result.stdout
  config = json.loads((workdir / "config.json").read_text())
  assert config["loss"] == "normalized_softmax_demo" and config["loss_module"] == "myloss"
  assert config["loss_params"] == {"temperature": 0.1} and config["loss_lr_multiplier"] == 10
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
  progress = json.loads(
      (workdir / "checkpoints" / str(steps[-1]) / "progress" / "metadata").read_text())
  assert progress["num_classes"] == 5  # the digits 0-4 train
  from hn_jax.tools import report  # pylint: disable=import-outside-toplevel
  scalars = report.load_scalars(workdir)
  assert "train/proxy_sim" in scalars and "embedding_mean_sim" in scalars
  assert "train/embedding_mean_sim" in scalars and "hn_ratio" not in scalars
  assert all(np.isfinite(v) for _, _, v in scalars["step_loss"])
  assert not report.is_collapsed(scalars)  # the rule reads embedding_mean_sim, logged

  # A reader of the workdir rebuilds the loss from config.json (the module imported again).
  sys.path.insert(0, str(user_module))
  try:
    from hn_jax import checkpoints, run_config, train_step  # pylint: disable=import-outside-toplevel
    _, _, state, _ = checkpoints.restore_run(str(workdir))
    restored = np.asarray(state.loss_params["proxies"][...])
    fresh = train_step.init_loss(run_config.read(str(workdir)), 5)
    assert restored.shape == (5, 16) and np.abs(restored - np.asarray(fresh.proxies[...])).max() > 0
  finally:
    sys.path.remove(str(user_module))
    sys.modules.pop("myloss", None)

  # Other loss settings on the same workdir: refused in one line, nothing changed.
  before = (workdir / "config.json").read_text()
  refused = _main([*_doc_command(user_module, workdir), *tiny,
                   "--config.loss_lr_multiplier=100"], user_module)
  assert refused.returncode == 2
  assert "config.loss_lr_multiplier=100.0 but the run has 10.0" in refused.stderr
  assert (workdir / "config.json").read_text() == before


@pytest.mark.parametrize("extra,message", [
    (["--config.loss=nope"], "config.loss='nope' is not a loss; use one of hn, shn, sct, contrastive"),
    pytest.param(["--config.loss_params.margin=0.2"],
                 "config.loss='normalized_softmax_demo': loss 'normalized_softmax_demo' has no "
                 "hyperparameter margin; its hyperparameters: temperature",
                 marks=pytest.mark.slow),
    pytest.param(["--config.loss=sct", "--config.loss_params.temperature=0.2"],
                 "config.loss_params.temperature is set; the paper's losses take it as "
                 "--config.temperature", marks=pytest.mark.slow),
    pytest.param(["--config.loss_module=no_such_module_here"],
                 "config.loss_module='no_such_module_here' cannot be imported",
                 marks=pytest.mark.slow),
])
def test_loss_mistakes_on_the_command_line_are_one_line(user_module, tmp_path, extra, message):
  workdir = tmp_path / "wd"
  args = [a for a in _doc_command(user_module, workdir)
          if not a.startswith("--config.loss_module") or not any(
              e.startswith("--config.loss_module") for e in extra)]
  result = _main([*args, *extra], user_module, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("hn_jax: error: "), result.stderr[-2000:]
  assert message in lines[0], lines[0]
  assert not workdir.exists()
