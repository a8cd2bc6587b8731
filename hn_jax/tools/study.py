"""A study that chooses on validation classes: the protocol of "A Metric Learning Reality Check".

`python -m hn_jax.tools.reproduce --protocol=mlrc` runs it (Musgrave, Belongie, Lim, ECCV 2020):

1. The training classes are dealt into `folds` class-disjoint groups (`hn_jax.data.folds`,
   from `fold_seed`; the same for every trial).
2. Each loss gets the same budget of `trials` settings, drawn from the ranges it declares
   beside its definition (`hn_jax.losses.search_space`; the learning rate among them) by a
   scrambled Halton sequence seeded by `trial_seed` (scipy.stats.qmc): quasi-random, so a
   small budget still covers every range. Losses with as many ranges get the same points,
   each mapped to its own ranges.
3. A trial trains one run per fold (all classes of the training split but the fold's) and is
   scored by the mean over folds of its final validation MAP@R (retrieval within the
   held-out classes).
4. Each loss keeps its best trial (ties: the earlier trial). Only then is the test split read:
   every fold model of the chosen trial embeds it, and MAP@R, R-Precision and R@1 are
   reported for the fold models' embeddings concatenated (each L2-normalized first, so each
   model weighs the same) and for each model alone (mean and sample std over folds).

Every run is an ordinary run, `ROOT/mlrc/<DATA>/<loss>/trial<j>/fold<i>/`; the same command
again skips finished runs and resumes the others. Each trial's folder holds its row of
TensorBoard's HParams dashboard (its settings, mean validation MAP@R and, for the chosen trial,
the test figures) beside its fold runs' own rows. `--parallel=N` trains N runs at once in
subprocesses (each given its own GPU where the host has several; on a CPU they share the
cores); a run is the same whichever process trains it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from hn_jax.tools import report

# The learning rates searched for a loss that declares none (plain SGD, as the paper's configs).
DEFAULT_LEARNING_RATE = (0.03, 3.0, "log")
SCORE_KEY = "test_MAP_R"  # of the validation runs: `{DATA}_VAL_test_MAP_R`
TEST_METRICS = ("MAP_R", "RP", "R_1")


class StudyError(ValueError):
  """A user-facing problem with the study's arguments; the message says the fix."""


def space(loss: str) -> dict[str, tuple[float, float, str]]:
  """The ranges searched for `loss`: its declared ones and, if it declares none, the
  default learning rates."""
  from hn_jax import losses  # pylint: disable=g-import-not-at-top
  ranges = losses.search_space(loss)
  ranges.setdefault("learning_rate", DEFAULT_LEARNING_RATE)
  for name, (low, high, scale) in ranges.items():
    if scale not in ("log", "linear", "int") or not low <= high or (scale == "log" and low <= 0):
      raise StudyError(f"loss {loss!r} declares an invalid range for {name}: "
                       f"({low}, {high}, {scale!r})")
  return ranges


def _value(u: float, low: float, high: float, scale: str) -> float:
  if scale == "log":
    return float(f"{math.exp(math.log(low) + u * (math.log(high) - math.log(low))):.3g}")
  value = low + u * (high - low)
  return int(round(value)) if scale == "int" else float(f"{value:.3g}")


def trial_settings(loss: str, trials: int, seed: int) -> list[dict[str, float]]:
  """`trials` settings of `loss` (3 significant digits), deterministic from `seed`."""
  from scipy.stats import qmc  # pylint: disable=g-import-not-at-top
  ranges = space(loss)
  names = sorted(ranges)
  points = qmc.Halton(d=len(names), scramble=True, seed=seed).random(trials)
  return [{name: _value(float(u), *ranges[name]) for name, u in zip(names, point)}
          for point in points]


def trial_config(base: ml_collections.ConfigDict, loss: str, settings: Mapping[str, float], *,
                 folds: int, fold: int, fold_seed: int) -> ml_collections.ConfigDict:
  """The config of one fold run of a trial (`fold` < 0: the trial's settings on the full
  training split, as the test evaluation's dataset needs)."""
  from hn_jax import losses  # pylint: disable=g-import-not-at-top
  run = ml_collections.ConfigDict(base.to_dict())
  run.loss = loss
  for name, value in settings.items():
    # The learning rate, and the paper's losses' hyperparameters, are settings of their own.
    if name == "learning_rate" or (loss in losses.METHODS and name in run):
      run[name] = type(run[name])(value) if isinstance(run[name], (int, float)) else value
    elif "loss_params" in run:
      run.loss_params[name] = value
    else:
      raise StudyError(f"loss {loss!r}: its hyperparameter {name} is neither a setting nor "
                       "in config.loss_params")
  run.folds, run.fold, run.fold_seed = (folds, fold, fold_seed) if fold >= 0 else (0, 0, 0)
  return run


@dataclasses.dataclass
class Trial:
  """One setting of one loss and what its fold runs scored."""

  loss: str
  index: int
  settings: dict[str, float]
  workdirs: list[str]
  fold_map_r: list[float | None] = dataclasses.field(default_factory=list)
  fold_r1: list[float | None] = dataclasses.field(default_factory=list)
  collapsed: list[bool] = dataclasses.field(default_factory=list)
  stopped: list[bool] = dataclasses.field(default_factory=list)  # given up: loss not finite

  @property
  def score(self) -> float:
    """Mean validation MAP@R over the folds; -inf when a fold has none."""
    if not self.fold_map_r or any(v is None or not math.isfinite(v) for v in self.fold_map_r):
      return -math.inf
    return float(np.mean(self.fold_map_r))


def choose(trials: Sequence[Trial]) -> Trial:
  """The trial with the best score; ties go to the earlier trial."""
  return max(trials, key=lambda t: (t.score, -t.index))


def _visible_devices() -> list[str]:
  """Ids to pin one subprocess each to (GPUs), or [] where processes share the host."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "gpu":
    return []
  return [str(d.id) for d in jax.local_devices()]


def run_in_subprocess(config: ml_collections.ConfigDict, workdir: str,
                      device: str | None = None) -> None:
  """Trains (or resumes, or finds finished) one run in a fresh process."""
  env = dict(os.environ)
  if device is not None:
    env["CUDA_VISIBLE_DEVICES"] = device
  import jax  # pylint: disable=g-import-not-at-top
  cache = jax.config.jax_compilation_cache_dir or "off"  # this process's, shared
  command = [sys.executable, "-m", "hn_jax.tools.study", f"--workdir={workdir}",
             f"--config_json={config.to_json()}", f"--xla_cache={cache}"]
  proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise StudyError(f"the run in {workdir} failed (exit {proc.returncode}): {last}")


def train_all(jobs: Sequence[tuple[ml_collections.ConfigDict, Path]], key: str, *,
              parallel: int, log: Callable[[str], None]) -> None:
  """Trains every (config, workdir) not finished yet, `parallel` at a time."""
  from hn_jax import run_config  # pylint: disable=g-import-not-at-top
  from hn_jax.tools import reproduce  # pylint: disable=g-import-not-at-top
  changes = {}
  for config, workdir in jobs:  # a root of another config is refused before anything runs
    changes[workdir] = run_config.check(config, str(workdir))
  if parallel <= 1:
    for config, workdir in jobs:
      reproduce.train_run(config, workdir, key, log, changes[workdir])
    return
  pending = []
  for config, workdir in jobs:
    if reproduce.is_done(config, workdir, key):
      log(f"  {workdir}: already done")
    else:
      pending.append((config, workdir))
  devices = _visible_devices()
  slots = list(range(parallel))

  def one(i: int) -> None:
    config, workdir = pending[i]
    device = devices[slots[i % parallel] % len(devices)] if devices else None
    workdir.mkdir(parents=True, exist_ok=True)
    run_in_subprocess(config, str(workdir), device)
    if reproduce.stopped(workdir):
      log(f"  {workdir}: stopped, its loss not finite")
      return
    scalars = report.load_scalars(workdir)
    figures = ", ".join(f"{name} {report.last_value(scalars.get(f'{key}_{name}')):.4f}"
                        for name in ("test_MAP_R", "test_R_1") if scalars.get(f"{key}_{name}"))
    log(f"  {workdir}: {figures}")

  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    for future in [pool.submit(one, i) for i in range(len(pending))]:
      future.result()


def test_figures(workdirs: Sequence[str], test_config: ml_collections.ConfigDict
                 ) -> dict[str, Any]:
  """MAP@R, R-Precision and R@1 on the test split of the fold models of one trial:
  concatenated, and each alone with their mean and sample std."""
  from hn_jax import checkpoints, evaluators, sharding  # pylint: disable=g-import-not-at-top
  from hn_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from hn_jax.tools import embed  # pylint: disable=g-import-not-at-top
  data = dataclasses.replace(datasets.load(test_config), train_recall=False,
                             test_ks=(1,), chain_ks=())
  mesh = sharding.create_mesh()
  models = [checkpoints.restore_run(w, mesh) for w in workdirs]
  cache: dict[tuple[int, int], np.ndarray] = {}

  def embedder(i: int) -> Callable:
    def run(split):
      if (i, id(split)) not in cache:
        config, graphdef, state, _ = models[i]
        cache[i, id(split)] = embed.embed_split(config, graphdef, state, mesh, split,
                                                progress=False)
      return cache[i, id(split)]
    return run

  def concatenated(split):
    return np.concatenate([embedder(i)(split) for i in range(len(models))], axis=1)

  evaluator = evaluators.RetrievalEvaluator.from_config(test_config, data, mesh=mesh)

  def figures(metrics: Mapping[str, float]) -> dict[str, float]:
    return {name: float(metrics[f"{data.key}_test_{name}"]) for name in TEST_METRICS}

  each = [figures(evaluator.run(embedder(i))) for i in range(len(models))]
  return {"concatenated": figures(evaluator.run(concatenated)),
          "separate": {name: report.finite_mean_std([e[name] for e in each])
                       for name in TEST_METRICS},
          "per_fold": each}


def mlrc(config: ml_collections.ConfigDict, root: str | os.PathLike, *,
         methods: Sequence[str], trials: int = 10, folds: int = 4, fold_seed: int = 0,
         trial_seed: int = 0, parallel: int = 1,
         log: Callable[[str], None] = print) -> dict[str, Any]:
  """The whole study (module docstring); returns it as data (`--json`)."""
  import time  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  from hn_jax import losses, run_config  # pylint: disable=g-import-not-at-top
  from hn_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from hn_jax.data.folds import class_folds  # pylint: disable=g-import-not-at-top
  from hn_jax.tools import reproduce  # pylint: disable=g-import-not-at-top
  unknown = [m for m in methods if m not in losses.NAMES]
  if unknown or not methods:
    raise StudyError(f"--methods: {','.join(unknown) or 'none given'}; use some of "
                     f"{','.join(losses.NAMES)}")
  if trials < 1 or folds < 2 or parallel < 1:
    raise StudyError(f"--trials={trials}, --folds={folds}, --parallel={parallel}: use at "
                     "least 1 trial, 2 folds and 1 process")
  started = time.perf_counter()
  key = datasets.KEYS[config.dataset] + datasets.VALIDATION_SUFFIX
  base = Path(root) / "mlrc" / datasets.KEYS[config.dataset]
  plan: list[Trial] = []
  jobs = []
  for loss in methods:
    for index, settings in enumerate(trial_settings(loss, trials, trial_seed)):
      trial = Trial(loss, index, settings, [])
      for fold in range(folds):
        run = trial_config(config, loss, settings, folds=folds, fold=fold, fold_seed=fold_seed)
        run_config.validate(run, num_devices=jax.device_count(),
                            num_processes=jax.process_count())
        workdir = base / loss / f"trial{index}" / f"fold{fold}"
        trial.workdirs.append(str(workdir))
        jobs.append((run, workdir))
      plan.append(trial)
  # Too many folds: one line, before anything trains.
  sizes = [len(g) for g in class_folds(datasets.load(config).train.labels, folds, fold_seed)]
  if min(sizes) < 2:
    log(f"warning: --folds={folds} leaves {sizes.count(1)} of the folds one class each, and "
        f"retrieval within one class is always right (validation MAP@R 1 whatever the "
        f"settings); the training split has {sum(sizes)} classes: use --folds="
        f"{max(2, sum(sizes) // 2)} or fewer")
  log(f"mlrc: {', '.join(methods)}, {trials} trials each, {folds} folds "
      f"({len(jobs)} runs in all, {parallel} at a time)")
  train_all(jobs, key, parallel=parallel, log=log)
  for trial in plan:
    for workdir in trial.workdirs:
      gave_up = reproduce.stopped(workdir) is not None  # no figures: the trial fails
      scalars = {} if gave_up else report.load_scalars(workdir)
      trial.fold_map_r.append(report.last_value(scalars.get(f"{key}_{SCORE_KEY}")))
      trial.fold_r1.append(report.last_value(scalars.get(f"{key}_test_R_1")))
      trial.collapsed.append(gave_up or report.is_collapsed(scalars))
      trial.stopped.append(gave_up)
  chosen = {loss: choose([t for t in plan if t.loss == loss]) for loss in methods}
  log("chosen on validation MAP@R: " + ", ".join(
      f"{loss} trial {t.index} ({t.score:.4f})" for loss, t in chosen.items()))
  test = {}
  for loss, trial in chosen.items():  # the first and only reading of the test split
    if not math.isfinite(trial.score):  # every trial failed: no model to test
      test[loss] = None
      continue
    test[loss] = test_figures(trial.workdirs,
                              trial_config(config, loss, trial.settings, folds=0, fold=-1,
                                           fold_seed=0))
  for trial in plan:
    write_trial_summary(trial, test.get(trial.loss) if chosen[trial.loss] is trial else None)
  trial_rows = [dict(loss=t.loss, trial=t.index, settings=t.settings, workdirs=t.workdirs,
                     fold_map_r=t.fold_map_r, fold_r1=t.fold_r1, collapsed=t.collapsed,
                     stopped=t.stopped,
                     score=t.score if math.isfinite(t.score) else None) for t in plan]
  return {
      "protocol": "mlrc", "dataset": datasets.KEYS[config.dataset], "root": str(root),
      "methods": list(methods), "trials": trials, "folds": folds, "fold_seed": fold_seed,
      "trial_seed": trial_seed, "spaces": {m: space(m) for m in methods},
      "trial_results": trial_rows,
      "chosen": {loss: {"trial": t.index, "settings": t.settings,
                        "score": t.score if math.isfinite(t.score) else None}
                 for loss, t in chosen.items()},
      "test": test, "table": table(chosen, test), "seconds": time.perf_counter() - started,
  }


TRIAL_EVENTS = "study.tfevents"  # TensorBoard reads it; `report` counts only events.out.*


def write_trial_summary(trial: Trial, test: Mapping[str, Any] | None) -> Path:
  """The trial's row of TensorBoard's HParams dashboard, in its folder (above its fold runs):
  the loss and its settings, and as metrics the mean validation MAP@R and, for the chosen
  trial, the test figures (concatenated and separate means). Replaced whole when written
  again."""
  from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.summary.writer import record_writer  # pylint: disable=g-import-not-at-top

  from hn_jax import summaries  # pylint: disable=g-import-not-at-top
  folder = Path(trial.workdirs[0]).parent
  hparams = {"loss": trial.loss, "trial": trial.index, "chosen": test is not None,
             **{f"loss_params.{k}" if k != "learning_rate" else k: v
                for k, v in trial.settings.items()}}
  metrics = {"val_MAP_R": trial.score if math.isfinite(trial.score) else math.nan}
  if test is not None:
    for name in TEST_METRICS:
      metrics[f"test_{name}_concatenated"] = test["concatenated"][name]
      mean = test["separate"][name]["mean"]
      metrics[f"test_{name}_separate"] = math.nan if mean is None else mean
  events = [event_pb2.Event(wall_time=0.0, file_version="brain.Event:2")]
  events += [event_pb2.Event(wall_time=0.0, step=0, summary=s)
             for s in summaries.hparams_summaries(hparams, finished=True, start_time=1.0)]
  events += [event_pb2.Event(wall_time=0.0, step=0, summary=summary_pb2.Summary(
      value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))]))
             for tag, value in metrics.items()]
  for old in folder.glob(f"{TRIAL_EVENTS}*"):
    old.unlink()
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / f"{TRIAL_EVENTS}.trial{trial.index}"
  with path.open("wb") as f:
    writer = record_writer.RecordWriter(f)
    for event in events:
      writer.write(event.SerializeToString())
  return path


def table(chosen: Mapping[str, Trial], test: Mapping[str, Mapping[str, Any]]) -> str:
  """Markdown: per loss, validation MAP@R and the test figures (percent), concatenated and
  separate (mean +- std over the fold models)."""
  rows = ["| loss | val MAP@R | MAP@R concat | MAP@R separate | RP concat | RP separate "
          "| R@1 concat | R@1 separate |", "|---|---|---|---|---|---|---|---|"]

  def sep(s):
    return "-" if s["mean"] is None else f"{100 * s['mean']:.2f} +- {100 * s['std']:.2f}"

  for loss, trial in chosen.items():
    t = test[loss]
    if t is None:
      rows.append(f"| {loss} | every trial failed |" + " - |" * 6)
      continue
    rows.append(f"| {loss} | {100 * trial.score:.2f} | "
                + " | ".join(f"{100 * t['concatenated'][m]:.2f} | {sep(t['separate'][m])}"
                             for m in TEST_METRICS) + " |")
  return "\n".join(rows)


def _worker(argv: Sequence[str]) -> int:
  """`python -m hn_jax.tools.study --workdir=W --config_json=J`: one run (train_all's)."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m hn_jax.tools.study",
                                   description="Trains one run of a study (internal).")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--config_json", required=True)
  parser.add_argument("--xla_cache", default="off", help="the study's cache of compiled programs")
  args = parser.parse_args(argv)
  from absl import logging  # pylint: disable=g-import-not-at-top

  from hn_jax import cli, compile_cache, run_config  # pylint: disable=g-import-not-at-top
  from hn_jax.tools import reproduce  # pylint: disable=g-import-not-at-top
  del cli  # imported for its side effects on library logging
  logging.set_verbosity(logging.WARNING)
  compile_cache.enable(args.xla_cache)
  config = run_config.from_plain(json.loads(args.config_json))
  reproduce.train_or_mark(config, args.workdir)
  return 0


if __name__ == "__main__":
  sys.exit(_worker(sys.argv[1:]))
