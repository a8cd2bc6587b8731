"""The training state and the jitted train and embedding steps: pure JAX, no TensorFlow.

The model lives as `nnx.split` state (a graph definition plus pytrees of parameters and
BatchNorm statistics); the steps are pure functions of that state under `jax.jit`, with
explicit shardings from `sharding.py`. The Python graph walk of `nnx.merge` happens once,
at trace time, not on every step.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from hn_jax import losses, models, pretrained, run_config, sharding, weights_cache
from hn_jax.errors import TrainingStopped  # noqa: F401  (raised by the loop; tests name it here)


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the config: step, weights, optimizer."""

  step: jax.Array
  params: nnx.State
  batch_stats: nnx.State
  opt_state: optax.OptState


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


def create_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  """The config's optimizer: plain SGD as the release (the default), or AdamW.

  sgd: momentum only if configured; `config.weight_decay` (default 0: none, as the release)
  adds decay x param to the gradient before the momentum (torch.optim.SGD's weight_decay).
  adamw: Adam (0.9, 0.999, eps 1e-8) with weight decay decoupled from it and scaled by the
  learning rate (torch.optim.AdamW's), on every parameter.

  The update direction sits in `optax.apply_if_finite`: a step whose gradients are not finite
  changes nothing (no momentum or Adam moments either) and is counted; the training loop stops
  after `config.max_consecutive_skips` in a row. The learning rate is applied outside it, so
  its schedule counts every step, skipped or not: its count is the global step
  (`state.step`), and the drops happen at the epochs the config names.
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
  return optax.chain(optax.apply_if_finite(direction, max_consecutive_errors=2**31 - 1),
                     optax.scale_by_schedule(lambda count: -schedule(count)))


def skipped_steps(opt_state: optax.OptState) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(last step skipped, skipped steps in a row, skipped steps in all) of the optimizer."""
  finite = opt_state[0]  # create_optimizer's apply_if_finite
  return ~finite.last_finite, finite.notfinite_count, finite.total_notfinite


def create_train_state(model: models.ResNetEmbedding,
                       tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
  """Splits the model into its graph definition and a fresh TrainState."""
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=tx.init(params))
  return graphdef, state


def abstract_state(config: ml_collections.ConfigDict
                   ) -> tuple[nnx.GraphDef, TrainState, optax.GradientTransformation]:
  """`init_state`'s result as shapes (jax.ShapeDtypeStruct leaves): nothing is computed, no
  weights are read. What a compile for another machine (`hn_jax.preflight`) needs."""
  tx = create_optimizer(config, 1)
  model = nnx.eval_shape(lambda: init_model(config, read_weights=False))
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                     batch_stats=batch_stats, opt_state=jax.eval_shape(tx.init, params))
  return graphdef, state, tx


def init_state(config: ml_collections.ConfigDict, steps_per_epoch: int = 1, *,
               read_weights: bool = True
               ) -> tuple[nnx.GraphDef, TrainState, optax.GradientTransformation]:
  """(graphdef, a fresh TrainState, the optimizer) of the config's model and optimizer.

  `steps_per_epoch` places the learning-rate drops; it does not shape the state, so a
  checkpoint's restore may pass 1.
  """
  tx = create_optimizer(config, steps_per_epoch)
  graphdef, state = create_train_state(init_model(config, read_weights=read_weights), tx)
  return graphdef, state, tx


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
  return dict(method=config.loss, lam=config.lam, temperature=config.temperature,
              hard_threshold=config.hard_threshold)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, mesh: Mesh
                    ) -> Callable[..., tuple[TrainState, dict]]:
  """jit(state, images, labels, flips=None) -> (state, metrics) over the global batch.

  `images`: uint8 crops, mirrored where `flips` (bool, one per image) is set and normalized
  by `config.mean` and `config.std` here, next to the model (or float32 images already
  augmented and normalized). The returned step's `.jitted` is the `jax.jit` function itself
  (`step.jitted.lower(state, images, labels, flips)` compiles it for other devices).
  """
  kwargs = loss_kwargs(config)
  mean, std = tuple(config.mean), tuple(config.std)

  def train_step(state: TrainState, images: jax.Array, labels: jax.Array,
                 flips: jax.Array | None):
    if flips is not None:
      images = flip(images, flips)
    images = normalize(images, mean, std)

    def loss_fn(params):
      # copy=True: fresh Variables in this trace, which BatchNorm may update.
      model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
      model.train()
      embeddings = model(images)
      loss, aux = losses.triplet_loss(embeddings, labels, **kwargs)
      return loss, (aux, nnx.state(model, nnx.BatchStat))

    (loss, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    skipped, in_a_row, total = skipped_steps(opt_state)
    # A skipped step leaves the BatchNorm statistics alone too.
    batch_stats = jax.tree.map(lambda new, old: jnp.where(skipped, old, new), batch_stats,
                               state.batch_stats)
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                           opt_state=opt_state)
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
