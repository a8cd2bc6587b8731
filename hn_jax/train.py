"""The training loop: epochs of sampled batches, evaluation, metrics and checkpoints.

It composes the pieces: `hn_jax.data` (datasets, samplers and batches, host side),
`train_step` (the jitted step), `evaluators` (the dataset's protocol on embeddings), CLU's
metric writer, and `checkpoints` (Orbax) saving at every evaluation; a run started again on
the same workdir resumes from its latest checkpoint and continues exactly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import ml_collections
from absl import logging
from clu import metric_writers
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from hn_jax import checkpoints as checkpoints_lib
from hn_jax import evaluators, finished, run_config, sharding, summaries, train_step
from hn_jax.errors import (DiskFull, Interrupted, Preempted, RunStopped, TrainingStopped,
                           is_out_of_memory, out_of_memory)
from hn_jax.run_lock import WorkdirLock
from hn_jax.data import datasets, input_pipeline, samplers


class Preemption:
  """Notices a SIGTERM (preemption notice) or a Ctrl-C so that the loop can checkpoint at the
  next step and stop cleanly. A second Ctrl-C stops at once (KeyboardInterrupt).

  One process: signal handlers. Several: JAX's preemption service, through which every
  process agrees on the same step to stop at (a Ctrl-C reaches one process only).
  """

  def __init__(self):
    self.received = False
    self.interrupted = False
    self._previous = {}
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_sigterm),
                        signal.SIGINT: signal.signal(signal.SIGINT, self._on_sigint)}

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: checkpointing at the next step")
    self.received = True

  def _on_sigint(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("Ctrl-C: checkpointing at the next step (Ctrl-C again stops at once)")
    self.received = self.interrupted = True
    signal.signal(signal.SIGINT, self._previous[signal.SIGINT])

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received

  def close(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


class EpochLog:
  """Writes per-step scalars one step late (so the host never waits on the step in flight)
  and keeps the sums behind the epoch means, which a checkpoint carries across a restart."""

  PER_STEP = ("hn_ratio", "embedding_mean_sim", "loss")

  def __init__(self, writer: metric_writers.MetricWriter, sums: dict[str, float] | None = None,
               count: int = 0):
    self.writer = writer
    self.sums = dict(sums or {})
    self.count = count
    self.skipped_in_a_row = 0
    self.skipped_steps = 0
    self._created = time.monotonic()
    self._first_flush_time = None
    self._pending: list[tuple[int, dict[str, jax.Array]]] = []

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self.flush()
    self._pending.append((step, metrics))

  def flush(self) -> None:
    for step, metrics in self._pending:
      values = {k: float(v) for k, v in sharding.local_value(metrics).items()}
      self.writer.write_scalars(step, {("step_loss" if k == "loss" else k): values[k]
                                       for k in self.PER_STEP if k in values})
      for k, v in values.items():
        self.sums[k] = self.sums.get(k, 0.0) + v
      self.count += 1
      if self._first_flush_time is None:
        self._first_flush_time = time.monotonic()
        logging.info("Step %d done (the first step of this process: compiled and ran in "
                     "%.1f s)", step, self._first_flush_time - self._created)
      self.skipped_in_a_row = int(values["skipped_in_a_row"])
      self.skipped_steps = int(values["skipped_steps"])
    self._pending = []

  def epoch_means(self) -> dict[str, float]:
    self.flush()
    means = {k: v / max(1, self.count) for k, v in self.sums.items()}
    scalars = {("loss" if k == "loss" else f"train/{k}"): v for k, v in means.items()
               if k not in ("skipped_in_a_row", "skipped_steps")}
    scalars["skipped_steps"] = float(self.skipped_steps)
    self.sums, self.count = {}, 0
    return scalars

  def progress(self) -> dict[str, Any]:
    self.flush()
    return {"sums": self.sums, "count": self.count}


def _say(message: str, *args: Any) -> None:
  """A line of the run's console account, from process 0 only (the others would repeat it)."""
  if jax.process_index() == 0:
    logging.info(message, *args)


def _create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard event files in `workdir`, written by process 0 only; no console echo."""
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(workdir)])


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _short(metrics: dict[str, float]) -> str:
  """`R_1 0.9018, R_2 0.9509, ..., train_R_1 0.9489`: the keys without `DATA_test_`."""
  return ", ".join(f"{key.split('_', 1)[-1].removeprefix('test_')} {value:.4f}"
                   for key, value in metrics.items())


class Progress:
  """The run's one progress meter: a rate, an ETA, and the lines of the console account.

  The rate is training steps per second of training time (compilation and evaluations
  excluded); the ETA, to the last training step, adds the evaluations still to come before
  it at their mean duration so far. The
  same rate goes to the console (a line per epoch, and every `every_s` seconds inside a long
  epoch) and to TensorBoard (`steps_per_sec` at each epoch's end).
  """

  def __init__(self, total_steps: int, steps_per_epoch: int, num_epochs: int, *,
               began: float | None = None, every_s: float = 60.0, evals_left: int = 0):
    self.total_steps, self.steps_per_epoch, self.num_epochs = (total_steps, steps_per_epoch,
                                                               num_epochs)
    self.every_s = every_s
    self.evals_left = evals_left
    self._created = time.monotonic()
    self._began = self._created if began is None else began
    self._first_step = self._t_first = self._last_line = None
    self._eval_s = 0.0  # evaluation time since the first step
    self._eval_times: list[float] = []

  def rate(self, step: int) -> float | None:
    """Steps per second since the first step of this process finished, evaluations aside."""
    if self._first_step is None or step <= self._first_step:
      return None
    return (step - self._first_step) / max(1e-9, time.monotonic() - self._t_first - self._eval_s)

  def eta(self, step: int) -> float | None:
    rate = self.rate(step)
    if rate is None:
      return None
    mean_eval = sum(self._eval_times) / len(self._eval_times) if self._eval_times else 0.0
    # The evaluations before the last step; the final one follows it.
    return (self.total_steps - step) / rate + max(0, self.evals_left - 1) * mean_eval

  def _pace(self, step: int) -> str:
    rate = self.rate(step)
    if rate is None:
      return ""
    return f"{rate:.1f} steps/s, ETA {_duration(self.eta(step))}"

  def stepped(self, step: int) -> None:
    now = time.monotonic()
    if self._first_step is None:
      self._first_step, self._t_first, self._last_line, self._eval_s = step, now, now, 0.0
    elif now - self._last_line >= self.every_s:
      self._last_line = now
      in_epoch = (step - 1) % self.steps_per_epoch + 1
      _say("epoch %d/%d: step %d of %d, %s", (step - 1) // self.steps_per_epoch + 1,
           self.num_epochs, in_epoch, self.steps_per_epoch, self._pace(step))

  def epoch_done(self, epoch: int, step: int, scalars: dict[str, float]) -> None:
    """Logs the epoch's line; adds `steps_per_sec` to `scalars` once there is a rate."""
    self._last_line = time.monotonic()
    pace = self._pace(step)
    rate = self.rate(step)
    if rate is not None:
      scalars["steps_per_sec"] = rate
    _say("epoch %d/%d: loss %.4f, %s %.3f%s%s", epoch, self.num_epochs, scalars["loss"],
         *(("hn_ratio", scalars["train/hn_ratio"]) if "train/hn_ratio" in scalars
           else ("embedding_mean_sim", scalars["train/embedding_mean_sim"])),
         f", {int(scalars['skipped_steps'])} skipped steps" if scalars["skipped_steps"]
         else "", f" | {pace}" if pace else "")

  def evaluated(self, epoch: int, metrics: dict[str, float]) -> None:
    now = time.monotonic()
    took = now - (self._last_line or self._created)
    if self._first_step is not None:  # an evaluation before it also compiled the embed step
      self._eval_s += took
      self._eval_times.append(took)
    self.evals_left = max(0, self.evals_left - 1) if epoch > 0 else self.evals_left
    self._last_line = now
    _say("epoch %d evaluation: %s (%.1f s)", epoch, _short(metrics), took)

  def summary(self, step: int, skipped: int, metrics: dict[str, float], workdir: str,
              checkpoint_steps) -> str:
    """The run's closing summary line."""
    workdir = os.fspath(run_config.workdir_path(workdir))
    line = (f"Done: {self.num_epochs} epochs, step {step}"
            f"{f' ({skipped} skipped)' if skipped else ''}, in "
            f"{_duration(time.monotonic() - self._began)} (this session). Final evaluation: "
            f"{_short(metrics) or 'none'}. Checkpoints (steps "
            f"{', '.join(str(s) for s in sorted(checkpoint_steps))}) in "
            f"{os.path.join(workdir, 'checkpoints')}; TensorBoard event files in {workdir} "
            f"(tensorboard --logdir={workdir})")
    return line


def _evaluations_after(epoch: int, config: ml_collections.ConfigDict) -> int:
  """How many evaluations the epochs after `epoch` hold."""
  return sum(1 for e in range(epoch + 1, config.num_epochs + 1)
             if e % config.eval_every == 0 or e == config.num_epochs)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       mesh: Mesh | None = None,
                       changes: dict[str, tuple[Any, Any]] | None = None,
                       summary: Callable[[str], None] | None = None) -> dict[str, float]:
  """Trains and evaluates per `config`, logging to and checkpointing in `workdir`.

  The closing summary line goes to `summary` (hn_jax.main: stdout), else to the log.

  `mesh` defaults to one over every device of every process. `changes` are the changeable
  settings that differ from the workdir's, as `run_config.check_run` returned them to a caller
  that checked the config already (hn_jax.main); when None, the config is checked here.

  A run started again on the same workdir resumes from its newest good checkpoint (the
  evaluations', a preemption's (SIGTERM) or a Ctrl-C's), and continues as if never stopped;
  damaged checkpoints are moved aside (`checkpoints`). One run at a time holds the workdir
  (`run_lock`). Returns the metrics of the last evaluation (empty when resumed with nothing
  left to do). Raises errors.Preempted after a SIGTERM and errors.Interrupted after a Ctrl-C
  (both checkpointed first), errors.DiskFull when a checkpoint cannot be written.
  """
  began = time.monotonic()
  mesh = sharding.create_mesh() if mesh is None else mesh
  if changes is None:
    changes = run_config.check_run(config, workdir, num_devices=mesh.size,
                                   num_processes=jax.process_count())
  dataset = datasets.load(config)
  steps_per_epoch = samplers.steps_per_epoch(dataset.train.labels, config)
  if steps_per_epoch == 0:
    raise run_config.ConfigError(
        f"an epoch of {config.dataset} holds fewer images than config.batch_size="
        f"{config.batch_size}; lower the batch size or raise config.repeat")
  # A run with checkpoints takes its weights from them: the published weights are read (and
  # fetched) only for a run that starts afresh, so a resume needs no network.
  resuming = bool(checkpoints_lib.finished_steps(
      run_config.workdir_path(workdir) / checkpoints_lib.FOLDER))
  initial = train_step.init_state(  # reads config.pretrained unless resuming
      config, steps_per_epoch, read_weights=not resuming,
      num_classes=train_step.num_train_classes(dataset.train.labels))
  lock = (WorkdirLock(run_config.workdir_path(workdir)) if jax.process_index() == 0
          else contextlib.nullcontext())
  with lock:  # before anything is written to the workdir
    return _run(config, workdir, mesh, changes, began, dataset, steps_per_epoch, initial,
                summary, weights_read=not resuming)


def _run(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
         changes: dict[str, tuple[Any, Any]], began: float, dataset: datasets.Dataset,
         steps_per_epoch: int, initial: tuple[Any, train_step.TrainState, Any],
         summary: Callable[[str], None] | None, *,
         weights_read: bool = True) -> dict[str, float]:
  """train_and_evaluate's loop, in a workdir this process holds."""
  graphdef, state, tx = initial
  state = sharding.replicate(state, mesh)
  step_fn = train_step.make_train_step(graphdef, tx, config, mesh)
  embed_fn = train_step.make_embed_step(graphdef, mesh, config)
  schedule = train_step.learning_rate_schedule(config, steps_per_epoch)
  evaluator = evaluators.RetrievalEvaluator.from_config(
      config, dataset, mesh=mesh, neighbours_dir=run_config.workdir_path(workdir) / "neighbours")

  def evaluate(epoch: int) -> dict[str, float]:
    embedded = {}  # id(split) -> its embeddings, for the TensorBoard views

    def embed(split):
      embedded[id(split)] = evaluators.embed_split(embed_fn, state, split, config, mesh)
      return embedded[id(split)]

    with _memory("while evaluating", "--config.eval_batch_size (or use --config.cache=off)"):
      metrics = evaluator.run(embed, epoch=epoch)
    views.evaluated(epoch, embedded, writer, final=epoch == config.num_epochs)
    return metrics

  checkpoints = checkpoints_lib.manager(workdir, max_to_keep=config.checkpoints_to_keep)
  total_steps = config.num_epochs * steps_per_epoch
  found = checkpoints_lib.restore_newest_good(checkpoints, state, config=config)
  if found is None and not weights_read and config.pretrained not in ("", "none"):
    # No good checkpoint after all: the run starts afresh, from the published weights.
    state = sharding.replicate(train_step.init_state(
        config, steps_per_epoch,
        num_classes=train_step.num_train_classes(dataset.train.labels))[1], mesh)
  if found is not None and jax.process_index() == 0 and not run_config.file_is_sound(workdir):
    run_config.record(config, workdir)  # a lost or broken config.json, written back
    _say("Wrote %s back (it was lost or broken)", os.path.join(workdir, run_config.CONFIG_FILE))
  if found is not None and found[0] >= total_steps:
    checkpoints.close()
    _say("%s holds a complete run (step %d, epoch %d of %d): nothing to do; "
         "raise --config.num_epochs to train further", workdir, found[0],
         found[0] // steps_per_epoch, config.num_epochs)
    return {}
  saver = checkpoints_lib.Saver(
      checkpoints, num_classes=train_step.num_train_classes(dataset.train.labels), config=config)
  # HParams before the scalars' event file, so that a live TensorBoard polls the newer file.
  views = summaries.RunSummaries(config, dataset, workdir, enabled=jax.process_index() == 0)
  views.started()
  writer = _create_writer(workdir)
  metrics = {}
  step = 0 if found is None else found[0]
  clock = Progress(total_steps, steps_per_epoch, config.num_epochs, began=began,
                   evals_left=_evaluations_after(step // steps_per_epoch, config))
  preemption = Preemption()
  try:
    if found is None:
      if jax.process_index() == 0:
        run_config.record(config, workdir, changes)
      _say("Training %s (%s, %s loss) for %d epochs of %d steps in %s", config.dataset,
           config.model, config.loss, config.num_epochs, steps_per_epoch, workdir)
      metrics = evaluate(0)
      writer.write_scalars(0, metrics)
      clock.evaluated(0, metrics)
      saver.save(0, state, {"sums": {}, "count": 0})
      log = EpochLog(writer)
    else:
      _, state, progress = found
      log = EpochLog(writer, progress["sums"], progress["count"])
      _say("Resumed %s from its checkpoint of step %d (epoch %d of %d)", workdir, step,
           step // steps_per_epoch, config.num_epochs)
      if changes:
        if jax.process_index() == 0:
          run_config.record(config, workdir, changes)
        _say("Changed settings: %s (recorded in %s)", run_config.describe(changes),
             os.path.join(workdir, run_config.HISTORY_FILE))

    for epoch in range(step // steps_per_epoch + 1, config.num_epochs + 1):
      first_step = step - (epoch - 1) * steps_per_epoch
      epoch_batches = input_pipeline.train_batches(dataset.train, config, epoch,
                                                   process_index=jax.process_index(),
                                                   process_count=jax.process_count(),
                                                   first_step=first_step)
      for batch in input_pipeline.prefetch_to_device(epoch_batches, mesh):
        saver.check()  # a save that failed in the background stops the run here
        if preemption.reached(step):
          saver.save(step, state, log.progress())
          saver.wait()
          how = "Ctrl-C" if preemption.interrupted else "Preempted"
          message = (f"{how}: saved the checkpoint of step {step}; run the same command "
                     "to resume")
          raise Interrupted(message) if preemption.interrupted else Preempted(message)
        with _memory("in the training step", "--config.batch_size (a multiple of "
                     "config.images_per_class), or use --config.half_precision=True"):
          state, step_metrics = step_fn(state, batch["images"], batch["labels"],
                                        batch["flips"])
          step += 1
          log.add(step, step_metrics)
        if log.skipped_in_a_row >= config.max_consecutive_skips:
          raise TrainingStopped(
              f"the loss or its gradients were not finite for {log.skipped_in_a_row} steps in "
              f"a row (before step {step}); lower config.learning_rate or use float32 "
              "(config.half_precision=False), then resume from the last checkpoint")
        clock.stepped(step)
      scalars = log.epoch_means()
      scalars["learning_rate"] = float(schedule(step - 1))
      clock.epoch_done(epoch, step, scalars)
      writer.write_scalars(epoch, scalars)
      if epoch % config.eval_every == 0 or epoch == config.num_epochs:
        metrics = evaluate(epoch)
        writer.write_scalars(epoch, metrics)
        clock.evaluated(epoch, metrics)
        _flush(writer, workdir)  # a full disk under the event files stops the run here
        saver.save(step, state, log.progress())
    saver.wait()
    _flush(writer, workdir)
    views.finished()
  finally:
    preemption.close()
    try:
      checkpoints.wait_until_finished()
    except Exception:  # pylint: disable=broad-except; reported by saver.check/wait already
      pass
    try:
      writer.close()
    except Exception:  # pylint: disable=broad-except
      pass
    saved = checkpoints.all_steps()
    checkpoints.close()
  if jax.process_index() == 0 and step == total_steps:  # asked again, the run answers at once
    finished.record(workdir, step=step, num_epochs=config.num_epochs, metrics=metrics,
                    checkpoint_steps=saved)
  line = clock.summary(step, log.skipped_steps, metrics, workdir, saved)
  if jax.process_index() == 0:
    if summary is None:
      logging.info("%s", line)
    else:
      summary(line)
  return metrics


@contextlib.contextmanager
def _memory(where: str, lower: str):
  """Running out of memory (the host's or XLA's) inside: one line naming what to lower."""
  try:
    yield
  except RunStopped:
    raise
  except Exception as e:  # pylint: disable=broad-except; XLA's errors have no common type
    if is_out_of_memory(e):
      raise out_of_memory(where, lower) from None
    raise


def _flush(writer: metric_writers.MetricWriter, workdir: str) -> None:
  """Writes out the event files; a full disk there stops the run with one line."""
  try:
    writer.flush()
  except Exception as e:  # pylint: disable=broad-except
    if checkpoints_lib.is_out_of_space(e):
      raise DiskFull(f"no room for the TensorBoard event files in {workdir} (the checkpoints "
                     "are intact); free space there, then run the same command to "
                     "resume") from None
    raise
