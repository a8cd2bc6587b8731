"""The training state and the jitted train and embedding steps: pure JAX, no TensorFlow.

The model lives as `nnx.split` state (a graph definition plus pytrees of parameters and
BatchNorm statistics); the steps are pure functions of that state under `jax.jit`, with
explicit shardings from `sharding.py`. The Python graph walk of `nnx.merge` happens once,
at trace time, not on every step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from hn_jax import losses, models, pretrained, run_config, sharding, weights_cache
from hn_jax.errors import TrainingStopped  # noqa: F401  (raised by the loop; tests name it here)


@dataclasses.dataclass(frozen=True)
class LossDef:
  """What the train step needs of the loss besides its arrays: its graph definition and the
  optimizer of its parameters (None: it has none)."""

  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation | None


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the config: step, weights, optimizer, and the
  loss's own parameters (proxies), their optimizer state and memory (`losses.MemoryState`).

  A loss without parameters keeps None there, and one without memory None in `loss_state`:
  those add nothing to a checkpoint. `loss` (static, not an array) is None for a state made
  without a loss module: the train step then builds the config's loss, which must have no
  parameters and no memory.
  """

  step: jax.Array
  params: nnx.State
  batch_stats: nnx.State
  opt_state: optax.OptState
  loss_params: nnx.State | None = None
  loss_opt_state: optax.OptState | None = None
  loss_state: nnx.State | None = None
  loss: LossDef | None = flax.struct.field(pytree_node=False, default=None)


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  return jnp.bfloat16 if config.half_precision else jnp.float32


def init_model(config: ml_collections.ConfigDict, *,
               read_weights: bool = True) -> models.ResNetEmbedding:
  """The config's model: seeded by `config.seed`, its backbone read from `config.pretrained`
  (a path, or "imagenet"/"dino": published weights, downloaded once by `weights_cache`) when
  set (and `read_weights`: a checkpoint's restore needs only the shapes)."""
  model = models.create_model(config.model, config.embedding_dim, dtype=compute_dtype(config),
                              rngs=nnx.Rngs(config.seed), image_size=config.image_size)
  if not read_weights:
    return model
  if config.pretrained in weights_cache.RANDOM:
    logging.info("config.pretrained=%r: the backbone starts from random weights",
                 config.pretrained)
    return model
  try:
    path = weights_cache.resolve(config.pretrained, config.model)
  except (weights_cache.WeightsDownloadError, KeyError) as e:
    message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    raise run_config.ConfigError(f"config.pretrained={config.pretrained}: {message}") from None
  if path:
    try:
      pretrained.load_torchvision_weights(model, path)
    except (pretrained.WeightsFileError, pretrained.WeightMismatchError, KeyError,
            ImportError) as e:
      lines = (str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)).splitlines()
      more = f"; ... ({len(lines) - 4} more)" if len(lines) > 4 else ""
      message = "; ".join(line.strip().rstrip(":") for line in lines[:4]) + more
      raise run_config.ConfigError(f"config.pretrained={config.pretrained}: {message}") from None
    logging.info("config.pretrained=%r: backbone weights read from %s", config.pretrained, path)
  return model


OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("step", "cosine")


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """The learning rate by global step.

  "step" (the release's): the base rate, times 0.1 at each epoch of `config.lr_drop_epochs`.
  "cosine": from the base rate down to 0 over `config.cosine_epochs`, then 0. Either way
  `config.warmup_epochs` (default 0) first ramps the rate linearly from 0 to the base rate
  (the drops stay at their epochs; the cosine starts after the warm-up).
  """
  kind = config.get("lr_schedule", "step")
  warmup = int(round(config.get("warmup_epochs", 0) * steps_per_epoch))
  if kind == "step" and not warmup:  # the release's schedule, exactly as it always was
    return optax.piecewise_constant_schedule(
        config.learning_rate,
        {int(epoch) * steps_per_epoch: 0.1 for epoch in config.lr_drop_epochs})
  if kind == "cosine":
    decay = int(config.cosine_epochs) * steps_per_epoch
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup,
                                              warmup + decay, end_value=0.0)
  if kind != "step":
    raise ValueError(f"unknown lr_schedule {kind!r}; use one of {', '.join(LR_SCHEDULES)}")
  drops = optax.piecewise_constant_schedule(
      config.learning_rate,
      {int(epoch) * steps_per_epoch - warmup: 0.1 for epoch in config.lr_drop_epochs})
  return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warmup), drops],
                              [warmup])


def create_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int,
                     lr_multiplier: float = 1.0) -> optax.GradientTransformation:
  """The config's optimizer: plain SGD as the release (the default), or AdamW.

  sgd: momentum only if configured; `config.weight_decay` (default 0: none, as the release)
  adds decay x param to the gradient before the momentum (torch.optim.SGD's weight_decay).
  adamw: Adam (0.9, 0.999, eps 1e-8) with weight decay decoupled from it and scaled by the
  learning rate (torch.optim.AdamW's), on every parameter.

  The update direction sits in `optax.apply_if_finite`: a step whose gradients are not finite
  changes nothing (no momentum or Adam moments either) and is counted; the training loop stops
  after `config.max_consecutive_skips` in a row. The learning rate is applied outside it, so
  its schedule counts every step, skipped or not: its count is the global step
  (`state.step`), and the drops happen at the epochs the config names. `lr_multiplier`
  scales the whole schedule (the loss's parameters train at `config.loss_lr_multiplier`).
  """
  schedule = learning_rate_schedule(config, steps_per_epoch)
  optimizer = config.get("optimizer", "sgd")
  weight_decay = config.get("weight_decay", 0.0)
  if optimizer == "sgd":
    direction = optax.trace(decay=config.momentum) if config.momentum else optax.identity()
    if weight_decay:
      direction = optax.chain(optax.add_decayed_weights(weight_decay), direction)
  elif optimizer == "adamw":
    direction = optax.chain(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
                            optax.add_decayed_weights(weight_decay))
  else:
    raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
  if lr_multiplier != 1.0:
    unscaled = schedule
    schedule = lambda count: lr_multiplier * unscaled(count)  # noqa: E731
  return optax.chain(optax.apply_if_finite(direction, max_consecutive_errors=2**31 - 1),
                     optax.scale_by_schedule(lambda count: -schedule(count)))


def skipped_steps(opt_state: optax.OptState) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(last step skipped, skipped steps in a row, skipped steps in all) of the optimizer."""
  finite = opt_state[0]  # create_optimizer's apply_if_finite
  return ~finite.last_finite, finite.notfinite_count, finite.total_notfinite


# Folded into config.seed for the loss's initialization: the model's stays nnx.Rngs(seed).
LOSS_SEED_SALT = 0x1055


def loss_hyperparameters(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The loss's hyperparameters: `config.loss_params`, and for the paper's hn, shn and sct
  the paper's top-level keys (lam, temperature, hard_threshold)."""
  params = dict(config.get("loss_params") or {})
  if config.loss in losses.METHODS:
    params.update(lam=config.lam, temperature=config.temperature,
                  hard_threshold=config.hard_threshold)
  return params


def init_loss(config: ml_collections.ConfigDict, num_classes: int) -> nnx.Module:
  """The config's loss module (`losses.build`) for `num_classes` training classes; its
  parameters are seeded by `config.seed` apart from the model's."""
  run_config.import_loss_module(config)
  key = jax.random.fold_in(jax.random.key(config.seed), LOSS_SEED_SALT)
  return losses.build(config.loss, embedding_dim=config.embedding_dim, num_classes=num_classes,
                      rngs=nnx.Rngs(key), loss_params=loss_hyperparameters(config),
                      miner=config.get("miner", ""),
                      miner_params=dict(config.get("miner_params") or {}),
                      memory_size=config.get("memory_size", 0))


def split_loss(loss: nnx.Module) -> tuple[nnx.GraphDef, nnx.State | None, nnx.State | None]:
  """(graphdef, Params or None, MemoryState or None) of a loss module."""
  graphdef, params, memory, rest = nnx.split(loss, nnx.Param, losses.MemoryState, ...)
  if jax.tree.leaves(rest):
    kinds = sorted({type(v).__name__ for v in jax.tree.leaves(
        rest, is_leaf=lambda x: isinstance(x, nnx.Variable))})
    raise ValueError(f"a loss's variables must be nnx.Param (trained) or losses.MemoryState "
                     f"(carried); {type(loss).__name__} also holds {', '.join(kinds)}")
  return (graphdef, params if jax.tree.leaves(params) else None,
          memory if jax.tree.leaves(memory) else None)


def create_train_state(model: models.ResNetEmbedding, tx: optax.GradientTransformation,
                       loss: nnx.Module | None = None,
                       loss_tx: optax.GradientTransformation | None = None
                       ) -> tuple[nnx.GraphDef, TrainState]:
  """Splits the model (and `loss`, whose parameters `loss_tx` trains) into the model's graph
  definition and a fresh TrainState."""
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=tx.init(params))
  if loss is not None:
    loss_graphdef, loss_params, memory = split_loss(loss)
    if loss_params is not None and loss_tx is None:
      raise ValueError(f"{type(loss).__name__} has parameters: give their optimizer, loss_tx")
    loss_tx = None if loss_params is None else loss_tx
    state = state.replace(
        loss_params=loss_params, loss_state=memory,
        loss_opt_state=None if loss_tx is None else loss_tx.init(loss_params),
        loss=LossDef(loss_graphdef, loss_tx))
  return graphdef, state


def abstract_state(config: ml_collections.ConfigDict, num_classes: int = 1
                   ) -> tuple[nnx.GraphDef, TrainState, optax.GradientTransformation]:
  """`init_state`'s result as shapes (jax.ShapeDtypeStruct leaves): nothing is computed, no
  weights are read. What a compile for another machine (`hn_jax.preflight`) needs."""
  tx = create_optimizer(config, 1)
  model = nnx.eval_shape(lambda: init_model(config, read_weights=False))
  loss = nnx.eval_shape(lambda: init_loss(config, num_classes))
  loss_tx = create_optimizer(config, 1, config.get("loss_lr_multiplier", 1.0))
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  loss_graphdef, loss_params, memory = split_loss(loss)
  loss_tx = None if loss_params is None else loss_tx
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                     batch_stats=batch_stats, opt_state=jax.eval_shape(tx.init, params),
                     loss_params=loss_params, loss_state=memory,
                     loss_opt_state=None if loss_tx is None else jax.eval_shape(loss_tx.init,
                                                                                 loss_params),
                     loss=LossDef(loss_graphdef, loss_tx))
  return graphdef, state, tx


def init_state(config: ml_collections.ConfigDict, steps_per_epoch: int = 1, *,
               read_weights: bool = True, num_classes: int = 1
               ) -> tuple[nnx.GraphDef, TrainState, optax.GradientTransformation]:
  """(graphdef, a fresh TrainState, the optimizer) of the config's model, loss and optimizer.

  `steps_per_epoch` places the learning-rate drops; it does not shape the state, so a
  checkpoint's restore may pass 1. `num_classes` (the training split's labels lie in
  [0, num_classes): `num_train_classes`) shapes a loss with a parameter per class.
  """
  tx = create_optimizer(config, steps_per_epoch)
  loss_tx = create_optimizer(config, steps_per_epoch, config.get("loss_lr_multiplier", 1.0))
  graphdef, state = create_train_state(init_model(config, read_weights=read_weights), tx,
                                       init_loss(config, num_classes), loss_tx)
  return graphdef, state, tx


def num_train_classes(labels: Sequence[int]) -> int:
  """The classes a loss is built for: training labels lie in [0, this)."""
  labels = np.asarray(labels)
  if labels.size and labels.min() < 0:
    raise ValueError(f"training labels must be >= 0 (got {labels.min()})")
  return int(labels.max()) + 1 if labels.size else 1


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 pixels -> float32 (x / 255 - mean) / std per channel; float input is returned as
  it is (already normalized)."""
  if images.dtype != jnp.uint8:
    return images
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def flip(images: jax.Array, flips: jax.Array) -> jax.Array:
  """Each image (B, H, W, C) mirrored left-right where `flips` (B,) is set."""
  return jnp.where(flips.reshape(-1, 1, 1, 1), images[:, :, ::-1], images)


def loss_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`losses.triplet_loss`'s keyword arguments for the paper's hn, shn and sct."""
  return dict(method=config.loss, lam=config.lam, temperature=config.temperature,
              hard_threshold=config.hard_threshold)


COLLAPSE_KEY = "embedding_mean_sim"


def mean_similarity(embeddings: jax.Array) -> jax.Array:
  """The mean cosine similarity over distinct pairs of a batch's embeddings (near 1: the
  embedding collapsed), as the paper's losses report it."""
  n = embeddings.shape[0]
  sims = jax.lax.stop_gradient(losses.cosine_similarities(embeddings))
  return (jnp.sum(sims) - jnp.trace(sims)) / float(max(1, n * (n - 1)))


def _unless_skipped(skipped: jax.Array, new: Any, old: Any) -> Any:
  return jax.tree.map(lambda n, o: jnp.where(skipped, o, n), new, old)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, mesh: Mesh
                    ) -> Callable[..., tuple[TrainState, dict]]:
  """jit(state, images, labels, flips=None) -> (state, metrics) over the global batch.

  `images`: uint8 crops, mirrored where `flips` (bool, one per image) is set and normalized
  by `config.mean` and `config.std` here, next to the model (or float32 images already
  augmented and normalized). The returned step's `.jitted` is the `jax.jit` function itself
  (`step.jitted.lower(state, images, labels, flips)` compiles it for other devices).

  The loss module (`state.loss`, else the config's, which then must hold no arrays) sees the
  global batch; its parameters train by their own optimizer (`state.loss`'s) on the same
  step, and its memory is carried. A step that is not finite (the loss or any gradient)
  changes neither weights nor loss parameters, moments, BatchNorm statistics or memory.
  """
  mean, std = tuple(config.mean), tuple(config.std)

  def train_step(state: TrainState, images: jax.Array, labels: jax.Array,
                 flips: jax.Array | None):
    if flips is not None:
      images = flip(images, flips)
    images = normalize(images, mean, std)
    loss_def = state.loss
    if loss_def is None:
      loss_graphdef, no_params, no_memory = split_loss(init_loss(config, 1))
      if no_params is not None or no_memory is not None:
        raise ValueError(f"loss {config.loss!r} holds parameters or memory: make the state "
                         "with train_step.init_state (or create_train_state(..., loss=))")
      loss_def = LossDef(loss_graphdef, None)
    trains_loss = state.loss_params is not None

    def loss_fn(params, loss_params):
      # copy=True: fresh Variables in this trace, which BatchNorm may update.
      model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
      model.train()
      embeddings = model(images)
      arrays = [a for a in (loss_params, state.loss_state) if a is not None] or [nnx.State({})]
      loss_module = nnx.merge(loss_def.graphdef, *arrays, copy=True)
      loss, aux = loss_module(embeddings, labels)
      if COLLAPSE_KEY not in aux:  # every run logs it: the report's collapse rule reads it
        aux = dict(aux, **{COLLAPSE_KEY: mean_similarity(embeddings)})
      memory = None if state.loss_state is None else nnx.state(loss_module, losses.MemoryState)
      return loss, (aux, nnx.state(model, nnx.BatchStat), memory)

    if trains_loss:
      (loss, (aux, batch_stats, memory)), (grads, loss_grads) = jax.value_and_grad(
          loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.loss_params)
      finite = functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(g)) for g in
                                                  jax.tree.leaves((grads, loss_grads))],
                                jnp.isfinite(loss))
      # Both optimizers skip together: each one's apply_if_finite sees NaN.
      loss_grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.nan), loss_grads)
    else:
      (loss, (aux, batch_stats, memory)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(state.params, None)
      finite = jnp.isfinite(loss)
    grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.nan), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    skipped, in_a_row, total = skipped_steps(opt_state)
    # A skipped step leaves the BatchNorm statistics alone too.
    batch_stats = _unless_skipped(skipped, batch_stats, state.batch_stats)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    if trains_loss:
      loss_updates, loss_opt_state = loss_def.tx.update(loss_grads, state.loss_opt_state,
                                                        state.loss_params)
      new_state = new_state.replace(
          loss_params=optax.apply_updates(state.loss_params, loss_updates),
          loss_opt_state=loss_opt_state)
    if memory is not None:
      new_state = new_state.replace(loss_state=_unless_skipped(skipped, memory,
                                                               state.loss_state))
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads),
                   skipped_in_a_row=in_a_row, skipped_steps=total)
    return new_state, metrics

  # With half_precision, XLA all-reduces the data-parallel weight gradients in bfloat16 (each
  # device's bf16 partial), and we keep that rather than force a float32 all-reduce at twice
  # the bytes. Measured (benchmarks/gradient_reduction.py, configs/synthetic.py, an exact
  # N-device emulation on CPU): against a float32 sum of the same partials the gradient moves
  # by 0.3% (4 devices) to 1.0% (64), cosine >= 0.99994; bf16 computation itself moves it by
  # 15-35% and another batch by ~140%; a run with the emulated 8-device bf16 sum ended within
  # the seed-to-seed spread.
  batch = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  jitted = jax.jit(train_step, in_shardings=(replicated, batch, batch, batch),
                   out_shardings=(replicated, replicated), donate_argnums=0)

  def step(state: TrainState, images: jax.Array, labels: jax.Array,
           flips: jax.Array | None = None) -> tuple[TrainState, dict]:
    return jitted(state, images, labels, flips)

  step.jitted = jitted
  return step


def make_embed_step(graphdef: nnx.GraphDef, mesh: Mesh,
                    config: ml_collections.ConfigDict | None = None
                    ) -> Callable[[TrainState, jax.Array], jax.Array]:
  """jit(state, images) -> float32 embeddings, BatchNorm in inference mode.

  uint8 images are normalized by `config.mean` and `config.std`; float32 ones are taken as
  already normalized.
  """
  mean = None if config is None else tuple(config.mean)
  std = None if config is None else tuple(config.std)

  def embed_step(state: TrainState, images: jax.Array) -> jax.Array:
    if images.dtype == jnp.uint8 and mean is None:
      raise ValueError("make_embed_step needs the config (mean, std) to embed uint8 images")
    images = normalize(images, mean, std)
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    model.eval()
    return model(images)

  batch = sharding.batch_sharding(mesh)
  return jax.jit(embed_step, in_shardings=(sharding.replicated(mesh), batch), out_shardings=batch)
