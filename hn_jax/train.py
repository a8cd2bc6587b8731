"""The training loop: epochs of sampled batches, evaluation, metrics and checkpoints.

It composes the pieces: `datasets` and `input_pipeline` (host side), `train_step` (the
jitted step), `evaluation` (recall on embeddings), CLU's metric writer and progress
report, and an Orbax CheckpointManager that saves at every evaluation; a run started again
on the same workdir resumes from its latest checkpoint and continues exactly.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from hn_jax import (datasets, image_cache, input_pipeline, losses, models, run_config, sharding,
                    train_step)


class ConfigError(ValueError):
  """A config value that cannot work; the message names it and says how to fix it."""


def check_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
                 num_processes: int | None = None) -> None:
  """Raises ConfigError on the first setting that cannot work, before anything compiles."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  num_processes = jax.process_count() if num_processes is None else num_processes

  def need(ok: bool, message: str) -> None:
    if not ok:
      raise ConfigError(message)

  need(config.loss in losses.METHODS,
       f"config.loss={config.loss!r} is not a loss; use one of {', '.join(losses.METHODS)}")
  need(config.dataset in datasets.DATASET_NAMES,
       f"config.dataset={config.dataset!r} is not a dataset; use one of "
       f"{', '.join(datasets.DATASET_NAMES)}")
  need(config.model in models.MODEL_NAMES,
       f"config.model={config.model!r} is not a model; use one of {', '.join(models.MODEL_NAMES)}")
  need(config.sampler in input_pipeline.SAMPLERS,
       f"config.sampler={config.sampler!r} is not a sampler; use one of "
       f"{', '.join(input_pipeline.SAMPLERS)}")
  for name in ("embedding_dim", "batch_size", "eval_batch_size", "images_per_class", "repeat",
               "eval_every", "image_size", "eval_max_bytes"):
    value = config[name]
    need(isinstance(value, int) and value >= 1,
         f"config.{name}={value!r} must be a positive integer")
  need(config.images_per_class >= 2,
       f"config.images_per_class={config.images_per_class} must be at least 2 (a positive "
       "pair per class)")
  need(config.image_size >= 16, f"config.image_size={config.image_size} must be at least 16")
  need(isinstance(config.num_epochs, int) and config.num_epochs >= 0,
       f"config.num_epochs={config.num_epochs!r} must be a non-negative integer")
  m, b = config.images_per_class, config.batch_size
  need(b % m == 0, f"config.batch_size={b} must be a multiple of config.images_per_class={m}; "
       f"try --config.batch_size={max(m, b // m * m)}")
  need(b % num_devices == 0, f"config.batch_size={b} is not divisible by the {num_devices} "
       f"devices; use a multiple of {num_devices}, e.g. --config.batch_size="
       f"{max(1, b // num_devices) * num_devices}")
  need((b // num_processes) % m == 0,
       f"config.batch_size={b} splits into {b // num_processes} images per process, which is "
       f"not a multiple of config.images_per_class={m}; use a multiple of {m * num_processes}")
  need(config.eval_batch_size % num_devices == 0,
       f"config.eval_batch_size={config.eval_batch_size} is not divisible by the {num_devices} "
       f"devices; use a multiple of {num_devices}")
  need(config.learning_rate > 0, f"config.learning_rate={config.learning_rate} must be positive")
  need(config.temperature > 0, f"config.temperature={config.temperature} must be positive")
  need(0 <= config.momentum < 1, f"config.momentum={config.momentum} must be in [0, 1)")
  need(all(isinstance(e, int) and e >= 1 for e in config.lr_drop_epochs),
       f"config.lr_drop_epochs={tuple(config.lr_drop_epochs)!r} must be positive epoch numbers")
  if config.pretrained:
    need(config.model in ("resnet18", "resnet50"),
         f"config.pretrained is set but config.model={config.model!r} has no torchvision "
         "weights; use resnet18 or resnet50")
    need(os.path.isfile(config.pretrained),
         f"config.pretrained={config.pretrained!r}: no such file; give the path of torchvision "
         "weights (.pth, .npz or .safetensors), see hn_jax/pretrained.py")
  need("cache_images" not in config,
       "config.cache_images was replaced by config.cache (auto, memory, disk or off); use "
       "--config.cache=memory for cache_images=True, or leave the default (auto)")
  need(config.get("cache", "auto") in image_cache.MODES,
       f"config.cache={config.get('cache')!r} is not a cache mode; use one of "
       f"{', '.join(image_cache.MODES)}")
  need(config.get("cache_memory_gb", 0) >= 0,
       f"config.cache_memory_gb={config.get('cache_memory_gb')} must be >= 0 (0: a quarter of "
       "this host's memory)")
  need(len(config.mean) == 3 and len(config.std) == 3 and min(config.std) > 0,
       f"config.mean={tuple(config.mean)} and config.std={tuple(config.std)} must be 3 values "
       "each, std positive")


def embed_split(embed_step, state: train_step.TrainState, split: input_pipeline.Split,
                config: ml_collections.ConfigDict, mesh: Mesh) -> np.ndarray:
  """Embeddings of a whole split, in its order, on every process."""
  outputs = []
  batches = input_pipeline.eval_batches(split, config, process_index=jax.process_index(),
                                        process_count=jax.process_count())
  for batch in input_pipeline.prefetch_to_device(({"images": b["images"]} for b in batches),
                                                 mesh):
    outputs.append(embed_step(state, batch["images"]))
  embeddings = np.concatenate([sharding.to_host(o) for o in outputs])
  return embeddings[:len(split)]


def evaluate(embed_step, state: train_step.TrainState, dataset: datasets.Dataset,
             config: ml_collections.ConfigDict, mesh: Mesh, workdir: str,
             epoch: int) -> dict[str, float]:
  """The dataset's logged metrics for the model in `state`.

  Nearest-neighbour lists, where the dataset has them (Hotels-50K), are saved by process 0
  as `workdir/neighbours/epoch_<epoch>.npy` (int32, queries x 100, nearest first).
  """

  def save_neighbours(top: np.ndarray) -> None:
    if jax.process_index() == 0:
      folder = run_config.workdir_path(workdir) / "neighbours"
      folder.mkdir(parents=True, exist_ok=True)
      with (folder / f"epoch_{epoch}.npy").open("wb") as f:
        np.save(f, top)

  return dataset.evaluate(lambda split: embed_split(embed_step, state, split, config, mesh),
                          save_neighbours, max_bytes=config.eval_max_bytes, mesh=mesh)


class TrainingStopped(RuntimeError):
  """The run cannot go on (e.g. the loss stayed non-finite); the message says why."""


class Preemption:
  """Notices a SIGTERM (preemption notice) so the loop can checkpoint and exit cleanly.

  One process: a signal handler. Several: JAX's preemption service, through which every
  process agrees on the same step to stop at.
  """

  def __init__(self):
    self.received = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: checkpointing at the next step")
    self.received = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


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
                                       for k in self.PER_STEP})
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
  """The console's account of a run: rate and ETA, a line per epoch and per evaluation
  (and every `every_s` seconds inside a long epoch), and a closing summary."""

  def __init__(self, total_steps: int, steps_per_epoch: int, num_epochs: int, *,
               began: float | None = None, every_s: float = 60.0):
    self.total_steps, self.steps_per_epoch, self.num_epochs = (total_steps, steps_per_epoch,
                                                               num_epochs)
    self.every_s = every_s
    self._created = time.monotonic()
    self._began = self._created if began is None else began
    self._first_step = self._t_first = self._last_line = None
    self._eval_s = 0.0

  def _rate(self, step: int) -> float | None:
    """Steps per second since the first step of this process finished (compilation aside)."""
    if self._first_step is None or step <= self._first_step:
      return None
    return (step - self._first_step) / max(1e-9, time.monotonic() - self._t_first - self._eval_s)

  def _pace(self, step: int) -> str:
    rate = self._rate(step)
    if rate is None:
      return ""
    return f"{rate:.1f} steps/s, ETA {_duration((self.total_steps - step) / rate)}"

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
    self._last_line = time.monotonic()
    pace = self._pace(step)
    _say("epoch %d/%d: loss %.4f, hn_ratio %.3f%s%s", epoch, self.num_epochs,
         scalars["loss"], scalars["train/hn_ratio"],
         f", {int(scalars['skipped_steps'])} skipped steps" if scalars["skipped_steps"]
         else "", f" | {pace}" if pace else "")

  def evaluated(self, epoch: int, metrics: dict[str, float]) -> None:
    now = time.monotonic()
    took = now - (self._last_line or self._created)
    if self._first_step is not None:
      self._eval_s += took
    self._last_line = now
    _say("epoch %d evaluation: %s (%.1f s)", epoch, _short(metrics), took)

  def summary(self, step: int, skipped: int, metrics: dict[str, float], workdir: str,
              checkpoint_steps) -> None:
    workdir = os.fspath(run_config.workdir_path(workdir))
    _say("Done: %d epochs, step %d%s, in %s (this session). Final evaluation: %s. "
         "Checkpoints (steps %s) in %s; TensorBoard event files in %s "
         "(tensorboard --logdir=%s)", self.num_epochs, step,
         f" ({skipped} skipped)" if skipped else "",
         _duration(time.monotonic() - self._began), _short(metrics) or "none",
         ", ".join(str(s) for s in sorted(checkpoint_steps)),
         os.path.join(workdir, "checkpoints"), workdir, workdir)


def _save(checkpoints: ocp.CheckpointManager, step: int, state: train_step.TrainState,
          progress: dict[str, Any]) -> None:
  if checkpoints.latest_step() != step:
    checkpoints.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   progress=ocp.args.JsonSave(progress)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       mesh: Mesh | None = None) -> dict[str, float]:
  """Trains and evaluates per `config`, logging to and checkpointing in `workdir`.

  `mesh` defaults to one over every device of every process.

  A run started again on the same workdir resumes from its latest checkpoint: the
  evaluations' and a preemption's (SIGTERM), and continues as if never stopped.
  Returns the metrics of the last evaluation (empty when resumed with nothing left to do).
  """
  began = time.monotonic()
  mesh = sharding.create_mesh() if mesh is None else mesh
  check_config(config, num_devices=mesh.size)
  changes = run_config.check(config, workdir)
  dataset = datasets.load(config)
  steps_per_epoch = input_pipeline.steps_per_epoch(dataset.train.labels, config)
  if steps_per_epoch == 0:
    raise ConfigError(
        f"an epoch of {config.dataset} holds fewer images than config.batch_size="
        f"{config.batch_size}; lower the batch size or raise config.repeat")

  tx = train_step.create_optimizer(config, steps_per_epoch)
  graphdef, state = train_step.create_train_state(train_step.create_model(config), tx)
  state = sharding.replicate(state, mesh)
  step_fn = train_step.make_train_step(graphdef, tx, config, mesh)
  embed_fn = train_step.make_embed_step(graphdef, mesh, config)
  schedule = train_step.learning_rate_schedule(config, steps_per_epoch)

  checkpoints = ocp.CheckpointManager(
      run_config.workdir_path(workdir) / "checkpoints",
      options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoints_to_keep, create=True))
  total_steps = config.num_epochs * steps_per_epoch
  step = checkpoints.latest_step()
  if step is not None and step >= total_steps:
    _say("%s holds a complete run (step %d, epoch %d of %d): nothing to do; "
         "raise --config.num_epochs to train further", workdir, step,
         step // steps_per_epoch, config.num_epochs)
    return {}
  writer = _create_writer(workdir)
  metrics = {}
  clock = Progress(total_steps, steps_per_epoch, config.num_epochs, began=began)
  if step is None:
    step = 0
    if jax.process_index() == 0:
      run_config.record(config, workdir, changes)
    _say("Training %s (%s, %s loss) for %d epochs of %d steps in %s", config.dataset,
         config.model, config.loss, config.num_epochs, steps_per_epoch, workdir)
    metrics = evaluate(embed_fn, state, dataset, config, mesh, workdir, 0)
    writer.write_scalars(0, metrics)
    clock.evaluated(0, metrics)
    _save(checkpoints, 0, state, {"sums": {}, "count": 0})
    log = EpochLog(writer)
  else:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = checkpoints.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()))
    state = restored.state
    log = EpochLog(writer, restored.progress["sums"], restored.progress["count"])
    _say("Resumed %s from its checkpoint of step %d (epoch %d of %d)", workdir, step,
         step // steps_per_epoch, config.num_epochs)
    if changes:
      if jax.process_index() == 0:
        run_config.record(config, workdir, changes)
      _say("Changed settings: %s (recorded in %s)", run_config.describe(changes),
           os.path.join(workdir, run_config.HISTORY_FILE))

  preemption = Preemption()
  report_progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  try:
    for epoch in range(step // steps_per_epoch + 1, config.num_epochs + 1):
      first_step = step - (epoch - 1) * steps_per_epoch
      batches = input_pipeline.train_batches(dataset.train, config, epoch,
                                             process_index=jax.process_index(),
                                             process_count=jax.process_count(),
                                             first_step=first_step)
      for batch in input_pipeline.prefetch_to_device(batches, mesh):
        if preemption.reached(step):
          _save(checkpoints, step, state, log.progress())
          checkpoints.wait_until_finished()
          logging.warning("Preempted: saved the checkpoint of step %d; run the same command "
                          "to resume", step)
          return metrics
        state, step_metrics = step_fn(state, batch["images"], batch["labels"], batch["flips"])
        step += 1
        log.add(step, step_metrics)
        if log.skipped_in_a_row >= config.max_consecutive_skips:
          raise TrainingStopped(
              f"the loss or its gradients were not finite for {log.skipped_in_a_row} steps in "
              f"a row (before step {step}); lower config.learning_rate or use float32 "
              "(config.half_precision=False), then resume from the last checkpoint")
        report_progress(step)
        clock.stepped(step)
      scalars = log.epoch_means()
      scalars["learning_rate"] = float(schedule(step - 1))
      writer.write_scalars(epoch, scalars)
      clock.epoch_done(epoch, step, scalars)
      if epoch % config.eval_every == 0 or epoch == config.num_epochs:
        metrics = evaluate(embed_fn, state, dataset, config, mesh, workdir, epoch)
        writer.write_scalars(epoch, metrics)
        clock.evaluated(epoch, metrics)
        _save(checkpoints, step, state, log.progress())
  finally:
    preemption.close()
    checkpoints.wait_until_finished()
    writer.flush()
    writer.close()
  clock.summary(step, log.skipped_steps, metrics, workdir, checkpoints.all_steps())
  return metrics
