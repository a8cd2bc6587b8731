"""The training loop: epochs of sampled batches, evaluation, metrics and checkpoints.

It composes the pieces: `datasets` and `input_pipeline` (host side), `train_step` (the
jitted step), `evaluation` (recall on embeddings), CLU's metric writer and progress
report, and an Orbax CheckpointManager that saves at every evaluation; a run started again
on the same workdir resumes from its latest checkpoint and continues exactly.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, periodic_actions
from jax.sharding import Mesh

from hn_jax import datasets, input_pipeline, losses, models, sharding, train_step


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
               "eval_every", "image_size"):
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
  need(len(config.mean) == 3 and len(config.std) == 3 and min(config.std) > 0,
       f"config.mean={tuple(config.mean)} and config.std={tuple(config.std)} must be 3 values "
       "each, std positive")


def embed_split(embed_step, state: train_step.TrainState, split: input_pipeline.Split,
                config: ml_collections.ConfigDict, mesh: Mesh) -> np.ndarray:
  """Embeddings of a whole split, in its order, on every process."""
  outputs = []
  for batch in input_pipeline.eval_batches(split, config, process_index=jax.process_index(),
                                           process_count=jax.process_count()):
    images = sharding.global_batch({"images": batch["images"]}, mesh)["images"]
    outputs.append(embed_step(state, images))
  embeddings = np.concatenate([sharding.to_host(o) for o in outputs])
  return embeddings[:len(split)]


def evaluate(embed_step, state: train_step.TrainState, dataset: datasets.Dataset,
             config: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, float]:
  """The dataset's logged metrics for the model in `state`."""
  return dataset.evaluate(lambda split: embed_split(embed_step, state, split, config, mesh))


def _epoch_scalars(step_metrics: list[dict[str, Any]]) -> dict[str, float]:
  means = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}
  return {("loss" if k == "loss" else f"train/{k}"): v for k, v in means.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains and evaluates per `config`, logging to and checkpointing in `workdir`.

  Returns the metrics of the last evaluation.
  """
  check_config(config)
  dataset = datasets.load(config)
  steps_per_epoch = input_pipeline.steps_per_epoch(dataset.train.labels, config)
  if steps_per_epoch == 0:
    raise ConfigError(
        f"an epoch of {config.dataset} holds fewer images than config.batch_size="
        f"{config.batch_size}; lower the batch size or raise config.repeat")

  mesh = sharding.create_mesh()
  tx = train_step.create_optimizer(config, steps_per_epoch)
  graphdef, state = train_step.create_train_state(train_step.create_model(config), tx)
  state = sharding.replicate(state, mesh)
  step_fn = train_step.make_train_step(graphdef, tx, config, mesh)
  embed_fn = train_step.make_embed_step(graphdef, mesh)
  schedule = train_step.learning_rate_schedule(config, steps_per_epoch)

  checkpoints = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoints_to_keep, create=True))
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  start_epoch = checkpoints.latest_step()
  if start_epoch is None:
    start_epoch = 0
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    metrics = evaluate(embed_fn, state, dataset, config, mesh)
    writer.write_scalars(0, metrics)
    checkpoints.save(0, args=ocp.args.StandardSave(state))
  else:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = checkpoints.restore(start_epoch, args=ocp.args.StandardRestore(abstract))
    logging.info("Resumed from the checkpoint of epoch %d in %s", start_epoch, workdir)
    metrics = {}

  total_steps = config.num_epochs * steps_per_epoch
  report_progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  step = start_epoch * steps_per_epoch
  for epoch in range(start_epoch + 1, config.num_epochs + 1):
    step_metrics = []
    for batch in input_pipeline.train_batches(dataset.train, config, epoch,
                                              process_index=jax.process_index(),
                                              process_count=jax.process_count()):
      batch = sharding.global_batch(batch, mesh)
      state, m = step_fn(state, batch["images"], batch["labels"])
      step_metrics.append(m)
      step += 1
      report_progress(step)
    # One transfer per epoch rather than a host sync on every step.
    step_metrics = jax.device_get(step_metrics)
    for i, m in enumerate(step_metrics):
      writer.write_scalars(step - len(step_metrics) + i + 1,
                           {"hn_ratio": m["hn_ratio"], "embedding_mean_sim": m["embedding_mean_sim"]})
    scalars = _epoch_scalars(step_metrics)
    scalars["learning_rate"] = float(schedule(step - 1))
    writer.write_scalars(epoch, scalars)
    logging.info("epoch %d: loss %.4f, hn_ratio %.3f", epoch, scalars["loss"],
                 scalars["train/hn_ratio"])
    if epoch % config.eval_every == 0 or epoch == config.num_epochs:
      metrics = evaluate(embed_fn, state, dataset, config, mesh)
      writer.write_scalars(epoch, metrics)
      logging.info("epoch %d: %s", epoch, json.dumps(metrics))
      checkpoints.save(epoch, args=ocp.args.StandardSave(state))
  checkpoints.wait_until_finished()
  writer.flush()
  return metrics
