"""A finished run's answer, read back without the training machinery.

When a run trains its last step, `record` writes `final.json` in its workdir: the step, the
epochs, the last evaluation's metrics and the checkpoints kept. The same command run again
then answers from that file and the checkpoint folder (`answer`) with the run's closing line,
in a fraction of a second: no dataset, model, TensorFlow or compilation. Where the file is
missing (a run of an older version), stale (the run was lengthened since, or its newest
checkpoint is not the final one) or unreadable, `answer` says nothing and the command takes
the ordinary path, which restores the checkpoint to find out. No JAX is imported here.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import ml_collections

from hn_jax import run_config

FILE = "final.json"
CHECKPOINTS = "checkpoints"  # hn_jax.checkpoints.FOLDER (which imports JAX)


def short(metrics: Mapping[str, float]) -> str:
  """`R_1 0.9018, R_2 0.9509, ..., train_R_1 0.9489`: the keys without `DATA_test_`."""
  return ", ".join(f"{key.split('_', 1)[-1].removeprefix('test_')} {value:.4f}"
                   for key, value in metrics.items())


def record(workdir: str, *, step: int, num_epochs: int, metrics: Mapping[str, float],
           checkpoint_steps: Sequence[int]) -> None:
  """Writes the finished run's `final.json` (replacing it at once)."""
  text = json.dumps({"step": int(step), "num_epochs": int(num_epochs),
                     "metrics": {k: float(v) for k, v in metrics.items()},
                     "checkpoint_steps": sorted(int(s) for s in checkpoint_steps)}, indent=2)
  path = run_config.workdir_path(workdir) / FILE
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text + "\n")
  tmp.replace(path)


def _checkpoint_steps(workdir: str) -> list[int]:
  """The finished checkpoints' steps (an unfinished save is never a bare number)."""
  try:
    folder = run_config.workdir_path(workdir) / CHECKPOINTS
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
  except OSError:
    return []


def load(workdir: str) -> dict[str, Any] | None:
  """The workdir's `final.json`, or None when absent or not what `record` writes."""
  path = run_config.workdir_path(workdir) / FILE
  try:
    final = json.loads(path.read_text())
    ok = (isinstance(final.get("step"), int) and isinstance(final.get("num_epochs"), int)
          and isinstance(final.get("metrics"), dict)
          and all(isinstance(v, (int, float)) for v in final["metrics"].values()))
  except (OSError, ValueError, AttributeError):
    return None
  return final if ok else None


def answer(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """The closing line of the finished run of `config` in `workdir`, or None when the workdir
  holds no such run (not finished, lengthened since, or not known to be finished).

  The caller has checked `config` against the workdir's (`run_config.check`).
  """
  recorded = run_config.load(workdir)
  final = load(workdir)
  if recorded is None or final is None or final["num_epochs"] != config.num_epochs:
    return None
  if recorded.get("num_epochs") != config.num_epochs:
    return None  # a lengthened (or shortened) run went on after final.json
  steps = _checkpoint_steps(workdir)
  if not steps or steps[-1] != final["step"]:
    return None
  where = os.fspath(run_config.workdir_path(workdir))
  return (f"Done already: {final['num_epochs']} epochs, step {final['step']}. Final "
          f"evaluation: {short(final['metrics']) or 'none'}. Checkpoints (steps "
          f"{', '.join(map(str, steps))}) in {os.path.join(where, CHECKPOINTS)}; TensorBoard "
          f"event files in {where} (tensorboard --logdir={where}). Nothing to train: raise "
          "--config.num_epochs to train further")
