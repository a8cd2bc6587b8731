"""Does the bfloat16 all-reduce of data-parallel gradients change results? (half_precision)

    python benchmarks/gradient_reduction.py [--json=/tmp/gradient_reduction.json]
    JAX_PLATFORMS=cpu python benchmarks/gradient_reduction.py --smoke

With `config.half_precision=True` the model computes in bfloat16 and, on TPU and GPU, XLA's
SPMD partitioner all-reduces the data-parallel weight gradients in bfloat16: each device's
partial gradient (the bf16 output of its weight-gradient conv over its share of the batch)
is summed across devices in bf16 and only then converted to float32. On the CPU backend
that reduction is float32, so this script *emulates* an N-device step on one device and
measures, on configs/synthetic.py with half_precision, what the bf16 reduction changes.

The emulation (`local_partials`). In the SPMD program device d holds a contiguous 1/N of the
global batch; BatchNorm statistics, the loss and its hard-negative mining are global (the
partitioner all-reduces the statistics, the loss sees every row), and device d's partial
weight gradient is the sum over *its own rows* of each layer's per-row gradient. Here every
parameter is given N copies, one per emulated device, the model is `jax.vmap`ped over the N
row blocks with each block using its own copy, and every BatchNorm gets `axis_name` set to
the vmap axis, so its statistics are the global batch's (`lax.pmean` of the block means,
which is the batch mean). The forward pass is then the one-device forward (every copy holds
the same values) and the gradient with respect to copy d is exactly device d's partial: the
bf16 weight-gradient of its rows, including the BatchNorm backward terms that depend on the
whole batch. Summing the copies' gradients is the data-parallel all-reduce; we do it three
ways: in float32 (`f32`: what forcing a float32 all-reduce gives), and in bfloat16 with the
partials rounded to bf16 (they already are: the cast of each float32 parameter to bf16 is
where the gradient turns float32) and added in bf16, sequentially (`ring`: each chunk of a
ring all-reduce is accumulated device after device) or pairwise (`tree`).

The brief's variant (`masked_partials`): device d's partial as the VJP of the whole batch with
the embeddings' cotangent masked to d's rows. The weight gradient is linear in that cotangent,
so the partials sum to the full gradient too, and for the embedding head they are the local
ones exactly; for layers under a BatchNorm they differ from the device's local partial by the
BatchNorm coupling (a row's cotangent reaches the other rows through the batch statistics),
so the per-device values, though not their sum, differ from what a device computes. It is
reported beside the local one for N=8.

References, on the same parameters and batch: the float32 model's gradient (half_precision
False), and the gradient of a different batch of the sampler's stream (sampling noise). For
each, ||a - b|| / ||b|| overall and per parameter tensor and the cosine. Measured at
initialization and during training with the project's jitted step (`make_train_step`, one
device). Then a results-level check: training from the same seed with the plain step and
with a step whose gradients are the emulated 8-device bf16 ring all-reduce (everything else
the same as `make_train_step`), against a second seed of the plain step: final test R@1 and
MAP@R.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hn_jax  # noqa: E402,F401  (first: it keeps JAX on the CPU where no accelerator is)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

AXIS = "emulated_devices"
REDUCTIONS = ("f32", "ring", "tree")


# ---------------------------------------------------------------------------------------------
# The emulation: generic over the forward function, so that the tests can check it on a tiny
# model against float64 NumPy.


def check_devices(batch: int, n: int) -> int:
  """n devices holding batch/n rows each; an uneven split is an error (as in the step)."""
  n = int(n)
  if n < 1:
    raise ValueError(f"the number of emulated devices must be at least 1, got {n}")
  if batch % n:
    raise ValueError(f"a batch of {batch} does not split evenly over {n} devices")
  return n


def local_partials(forward: Callable[..., tuple[jax.Array, Any]], params: Any, x: jax.Array,
                   loss_of: Callable[[jax.Array], tuple[jax.Array, Any]], n: int):
  """Each emulated device's partial gradient (leading axis n on every leaf of params).

  `forward(params, x_block) -> (embeddings_block, extra)` runs under `jax.vmap` with axis name
  `AXIS` (a BatchNorm given that axis name sees the global batch); `loss_of(embeddings)` is
  the loss of the whole (B, D) batch. Returns (loss, aux, extra of block 0, partials).
  """
  batch = x.shape[0]
  n = check_devices(batch, n)
  blocks = x.reshape((n, batch // n) + x.shape[1:])

  def loss_fn(copies):
    e, extra = jax.vmap(forward, axis_name=AXIS)(copies, blocks)
    loss, aux = loss_of(e.reshape((batch,) + e.shape[2:]))
    return loss, (aux, jax.tree.map(lambda t: t[0], extra))

  copies = jax.tree.map(lambda p: jnp.broadcast_to(p, (n,) + p.shape), params)
  (loss, (aux, extra)), parts = jax.value_and_grad(loss_fn, has_aux=True)(copies)
  return loss, aux, extra, parts


def masked_partials(forward: Callable[..., tuple[jax.Array, Any]], params: Any, x: jax.Array,
                    loss_of: Callable[[jax.Array], tuple[jax.Array, Any]], n: int):
  """The brief's partials: vjp of the whole batch with the embeddings' cotangent masked to
  each device's contiguous rows (forward runs once, on the whole batch, without vmap)."""
  batch = x.shape[0]
  n = check_devices(batch, n)
  e, vjp, extra = jax.vjp(lambda p: forward(p, x), params, has_aux=True)
  (loss, aux), de = jax.value_and_grad(loss_of, has_aux=True)(e)
  owner = jnp.arange(batch) // (batch // n)
  masks = (owner[None, :] == jnp.arange(n)[:, None])
  parts = jax.lax.map(
      lambda m: vjp(jnp.where(m.reshape((batch,) + (1,) * (de.ndim - 1)), de,
                              jnp.zeros_like(de)))[0], masks)
  return loss, aux, extra, parts


def round_bf16(x: jax.Array) -> jax.Array:
  """float32 -> the nearest bfloat16 value (ties to even), as float32, by integer ops.

  Not `x.astype(bfloat16).astype(float32)`: with `xla_allow_excess_precision` (XLA's default)
  the compiler may drop such a round trip, and on CPU it did (a "bf16" sum of two partials
  came out bit-equal to their float32 sum). Finite values only (NaN may turn into inf).
  """
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  bits = (bits + (jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1)))) & jnp.uint32(0xFFFF0000)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def reduce_partials(parts: Any, how: str, *, bf16_partials: bool = True) -> Any:
  """Sum the partials over the leading axis: in float32 ("f32"), or in bf16, every add rounded
  to bf16, one device after another ("ring") or pairwise ("tree"). Each partial is first
  rounded to bf16 (the dtype of the bf16 weight-gradient conv that makes it) unless
  `bf16_partials` is False and `how` is "f32" (a float32 model's reduction). Float32 leaves."""
  if how not in REDUCTIONS:
    raise ValueError(f"unknown reduction {how!r}; use one of {', '.join(REDUCTIONS)}")

  def one(p):
    if how == "f32" and not bf16_partials:
      return jnp.sum(p.astype(jnp.float32), axis=0)
    p = round_bf16(p)
    if how == "f32":
      return jnp.sum(p, axis=0)
    if how == "ring":
      acc = p[0]
      for i in range(1, p.shape[0]):
        acc = round_bf16(acc + p[i])  # two bf16 values add exactly in f32 (up to 2^-15 apart)
      return acc
    while p.shape[0] > 1:  # tree
      if p.shape[0] % 2:
        p = jnp.concatenate([p[:-2], round_bf16(p[-2] + p[-1])[None]])
      else:
        p = round_bf16(p[0::2] + p[1::2])
    return p[0]
  return jax.tree.map(one, parts)


# ---------------------------------------------------------------------------------------------
# The project's model and loss in the emulation, and a step with the emulated reduction.


def set_axis_name(model: nnx.Module, axis_name: str | None) -> None:
  for _, module in nnx.iter_modules(model):
    if isinstance(module, nnx.BatchNorm):
      module.axis_name = axis_name


def model_forward(graphdef, batch_stats, *, vmapped: bool):
  """forward(params, x) -> (embeddings, new batch stats): `train_step.make_train_step`'s
  loss_fn up to the embeddings (train mode; BatchNorm over the global batch under vmap)."""
  def forward(params, x):
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    model.train()
    if vmapped:
      set_axis_name(model, AXIS)
    return model(x), nnx.state(model, nnx.BatchStat)
  return forward


def prepare_images(config, images, flips):
  from hn_jax import train_step
  if flips is not None:
    images = train_step.flip(images, flips)
  return train_step.normalize(images, tuple(config.mean), tuple(config.std))


def loss_of_labels(config, labels):
  from hn_jax import losses, train_step
  kwargs = train_step.loss_kwargs(config)
  return lambda e: losses.triplet_loss(e, labels, **kwargs)


def make_gradients_fn(graphdef, config, ns: Sequence[int], *, masked_ns: Sequence[int] = ()):
  """jit(params, batch_stats, images, labels, flips) -> dict of float32 gradient trees:
  "full" (one device: value_and_grad of the whole batch, as the train step) and, per N,
  "f32/N", "ring/N", "tree/N" of the local partials and "masked-f32/N", "masked-ring/N"."""
  def grads(params, batch_stats, images, labels, flips):
    x = prepare_images(config, images, flips)
    loss_of = loss_of_labels(config, labels)
    forward = model_forward(graphdef, batch_stats, vmapped=False)

    def loss_fn(p):
      e, _ = forward(p, x)
      return loss_of(e)[0]
    full = jax.grad(loss_fn)(params)
    # One device: its weight-gradient convs' bf16 outputs (the f32 model's: as they are).
    out = {"full": jax.tree.map(round_bf16, full) if config.half_precision else full}
    vforward = model_forward(graphdef, batch_stats, vmapped=True)
    for n in ns:
      _, _, _, parts = local_partials(vforward, params, x, loss_of, n)
      for how in REDUCTIONS:
        out[f"{how}/{n}"] = reduce_partials(parts, how, bf16_partials=config.half_precision)
    for n in masked_ns:
      _, _, _, parts = masked_partials(forward, params, x, loss_of, n)
      for how in ("f32", "ring"):
        out[f"masked-{how}/{n}"] = reduce_partials(parts, how,
                                                   bf16_partials=config.half_precision)
    return out
  return jax.jit(grads)


def make_emulated_step(graphdef, tx, config, n: int, how: str):
  """`train_step.make_train_step`'s step on one device with its gradients replaced by the
  emulated n-device all-reduce `how` of the local partials; everything else the same."""
  from hn_jax import train_step

  def step(state, images, labels, flips):
    x = prepare_images(config, images, flips)
    forward = model_forward(graphdef, state.batch_stats, vmapped=True)
    loss, aux, batch_stats, parts = local_partials(forward, state.params, x,
                                                   loss_of_labels(config, labels), n)
    grads = reduce_partials(parts, how, bf16_partials=config.half_precision)
    grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    skipped, in_a_row, total = train_step.skipped_steps(opt_state)
    batch_stats = jax.tree.map(lambda new, old: jnp.where(skipped, old, new), batch_stats,
                               state.batch_stats)
    new_state = train_step.TrainState(step=state.step + 1, params=params,
                                      batch_stats=batch_stats, opt_state=opt_state)
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads),
                   skipped_in_a_row=in_a_row, skipped_steps=total)
    return new_state, metrics

  jitted = jax.jit(step, donate_argnums=0)
  return lambda state, images, labels, flips=None: jitted(state, images, labels, flips)


# ---------------------------------------------------------------------------------------------
# Comparisons.


def _leaves(tree) -> list[tuple[str, np.ndarray]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path),
           np.asarray(v, np.float64)) for path, v in flat]


def compare(a, b) -> dict[str, Any]:
  """||a - b|| / ||b|| and cos(a, b), overall and per leaf (in float64)."""
  la, lb = _leaves(a), _leaves(b)
  per = {}
  num = den = dot = na = 0.0
  for (name, x), (_, y) in zip(la, lb):
    d = float(np.sum((x - y) ** 2))
    yy, xx, xy = float(np.sum(y * y)), float(np.sum(x * x)), float(np.sum(x * y))
    per[name] = {"rel": (d / yy) ** 0.5 if yy else float("nan"),
                 "cos": xy / (xx * yy) ** 0.5 if xx and yy else float("nan"),
                 "norm": yy ** 0.5, "shape": list(y.shape)}
    num, den, dot, na = num + d, den + yy, dot + xy, na + xx
  return {"rel": (num / den) ** 0.5, "cos": dot / (na * den) ** 0.5, "per": per}


# ---------------------------------------------------------------------------------------------
# The run.


def build_config(args) -> ml_collections.ConfigDict:
  from configs import synthetic
  config = synthetic.get_config()
  config.half_precision = True
  config.seed = args.seed
  if args.smoke:
    config.synthetic_classes = 16
    config.synthetic_images_per_class = 4
    config.batch_size = 8
    config.eval_batch_size = 32
    config.image_size = 16
  if args.epochs:
    config.num_epochs = args.epochs
  return config


def batches_of(dataset, config, epoch: int, count: int | None = None):
  from hn_jax.data import input_pipeline
  out = []
  for b in input_pipeline.train_batches(dataset.train, config, epoch):
    out.append({k: jnp.asarray(v) for k, v in b.items()})
    if count is not None and len(out) >= count:
      break
  return out


def measure(grads_fn, grads32_fn, state, batches, ns, masked_ns) -> dict[str, Any]:
  """Averages over `batches` of each comparison; per-leaf figures of the first batch pair."""
  rows: dict[str, list] = {}
  first = {}
  for i, batch in enumerate(batches):
    args = (state.params, state.batch_stats, batch["images"], batch["labels"], batch["flips"])
    g = grads_fn(*args)
    g32 = grads32_fn(*args)["full"]
    other = batches[(i + 1) % len(batches)]
    g_other = grads_fn(state.params, state.batch_stats, other["images"], other["labels"],
                       other["flips"])["full"]
    cmp = {"one-device bf16 vs f32 model": compare(g["full"], g32),
           "other batch vs this batch": compare(g_other, g["full"])}
    for n in ns:
      base = g[f"f32/{n}"]
      cmp[f"f32/{n} vs one-device"] = compare(base, g["full"])
      cmp[f"ring/{n} vs f32/{n}"] = compare(g[f"ring/{n}"], base)
      cmp[f"tree/{n} vs f32/{n}"] = compare(g[f"tree/{n}"], base)
      cmp[f"ring/{n} vs f32 model"] = compare(g[f"ring/{n}"], g32)
      cmp[f"f32/{n} vs f32 model"] = compare(base, g32)
    for n in masked_ns:
      cmp[f"masked-f32/{n} vs f32/{n}"] = compare(g[f"masked-f32/{n}"], g[f"f32/{n}"])
      cmp[f"masked-ring/{n} vs masked-f32/{n}"] = compare(g[f"masked-ring/{n}"],
                                                          g[f"masked-f32/{n}"])
    for k, v in cmp.items():
      rows.setdefault(k, []).append((v["rel"], v["cos"]))
    if i == 0:
      first = cmp
  summary = {k: {"rel_mean": float(np.mean([r for r, _ in v])),
                 "rel_max": float(np.max([r for r, _ in v])),
                 "cos_min": float(np.min([c for _, c in v])), "batches": len(v)}
             for k, v in rows.items()}
  return {"summary": summary, "per_tensor_first_batch": {k: v["per"] for k, v in first.items()}}


def evaluate(graphdef, state, dataset, config, mesh) -> dict[str, float]:
  from hn_jax import evaluation, evaluators, train_step
  embed = train_step.make_embed_step(graphdef, mesh, config)
  e = evaluators.embed_split(embed, state, dataset.test, config, mesh)
  y = np.asarray(dataset.test.labels)
  r = evaluation.recall_at_k(e, y, (1,), mesh=mesh)
  m = evaluation.map_at_r(e, y, mesh=mesh)
  return {"R@1": r[1], "MAP@R": m["MAP_R"]}


def train(step_fn, state, dataset, config, epochs: int, on_step=None):
  losses_ = []
  step = 0
  for epoch in range(1, epochs + 1):
    for batch in batches_of(dataset, config, epoch):
      if on_step is not None:
        on_step(step, state)
      state, m = step_fn(state, batch["images"], batch["labels"], batch["flips"])
      losses_.append(m["loss"])
      step += 1
  last = float(np.mean([float(x) for x in losses_[-20:]])) if losses_ else float("nan")
  return state, last, step


def _fmt(x: float) -> str:
  return f"{x:.2e}" if abs(x) < 0.01 else f"{x:.4f}"


def print_tables(result: dict[str, Any]) -> None:
  ns = result["ns"]
  for point, m in result["points"].items():
    s = m["summary"]
    print(f"\n## Gradients at {point} ({s['other batch vs this batch']['batches']} batches; "
          "||a-b||/||b|| over all parameters, mean / max over batches; cos min)")
    print("| comparison | rel mean | rel max | cos min |")
    print("|---|---|---|---|")
    keys = ["other batch vs this batch", "one-device bf16 vs f32 model"]
    for n in ns:
      keys += [f"f32/{n} vs one-device", f"f32/{n} vs f32 model", f"ring/{n} vs f32/{n}",
               f"tree/{n} vs f32/{n}", f"ring/{n} vs f32 model"]
    keys += [k for k in s if k.startswith("masked")]
    for k in keys:
      v = s[k]
      print(f"| {k} | {_fmt(v['rel_mean'])} | {_fmt(v['rel_max'])} | {v['cos_min']:.6f} |")
    per = m["per_tensor_first_batch"]
    cols = [f"ring/{n} vs f32/{n}" for n in ns]
    print(f"\n### Per tensor at {point} (first batch): ||a-b||/||b||")
    print("| tensor | shape | ||g|| | " + " | ".join(f"ring/{n}" for n in ns)
          + " | bf16 vs f32 model | other batch |")
    print("|---|---|---|" + "---|" * (len(ns) + 2))
    for name, ref in per["one-device bf16 vs f32 model"].items():
      shape = "x".join(map(str, ref["shape"]))
      vals = [_fmt(per[c][name]["rel"]) for c in cols]
      print(f"| {name} | {shape} | {ref['norm']:.3g} | " + " | ".join(vals)
            + f" | {_fmt(ref['rel'])} | {_fmt(per['other batch vs this batch'][name]['rel'])} |")
  if result.get("runs"):
    print(f"\n## Results ({result['epochs']} epochs, {result['steps']} steps each; test split)")
    print("| run | seed | R@1 | MAP@R | train loss (last 20 steps) | seconds |")
    print("|---|---|---|---|---|---|")
    for r in result["runs"]:
      print(f"| {r['name']} | {r['seed']} | {r['R@1']:.4f} | {r['MAP@R']:.4f} | "
            f"{r['loss']:.4f} | {r['seconds']:.0f} |")


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true",
                 help="tiny: 16 classes, batch 8, N=2,4, 2 batches, 4 training steps, no results runs")
  p.add_argument("--ns", default="", help="emulated device counts (default 4,8,16,64)")
  p.add_argument("--batches", type=int, default=4, help="batches measured at each point")
  p.add_argument("--points", default="", help="training steps at which to measure "
                 "(default: 0, half way, the end)")
  p.add_argument("--epochs", type=int, default=0, help="epochs of the results runs "
                 "(default: the config's)")
  p.add_argument("--no_results", action="store_true", help="skip the training runs")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)

  from hn_jax import sharding, train_step
  from hn_jax.data import in_memory, samplers

  began = time.time()
  config = build_config(args)
  ns = [int(n) for n in args.ns.split(",")] if args.ns else ([4] if args.smoke
                                                            else [4, 8, 16, 64])
  masked_ns = [ns[0]] if args.smoke else [8]
  nbatches = 2 if args.smoke else args.batches
  for n in ns:
    check_devices(config.batch_size, n)
  mesh = sharding.create_mesh(jax.devices()[:1])
  dataset = in_memory.synthetic(config)
  spe = samplers.steps_per_epoch(dataset.train.labels, config)
  config32 = ml_collections.ConfigDict(config.to_dict())
  config32.half_precision = False

  graphdef, state, tx = train_step.init_state(config, spe)
  graphdef32, _, _ = train_step.init_state(config32, spe)
  grads_fn = make_gradients_fn(graphdef, config, ns, masked_ns=masked_ns)
  grads32_fn = make_gradients_fn(graphdef32, config32, [])

  result: dict[str, Any] = {
      "script": "benchmarks/gradient_reduction.py", "smoke": args.smoke,
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
      "cpus": os.cpu_count(), "load": os.getloadavg(), "jax": jax.__version__,
      "devices": [str(d) for d in jax.devices()], "ns": ns, "masked_ns": masked_ns,
      "config": {k: config[k] for k in ("dataset", "model", "batch_size", "image_size",
                                        "embedding_dim", "loss", "learning_rate",
                                        "num_epochs", "half_precision")},
      "steps_per_epoch": spe, "points": {}, "runs": []}
  print(f"gradient_reduction: {result['date']} on {result['machine']}, {result['cpus']} CPUs, "
        f"load {result['load'][0]:.2f}, jax {jax.__version__}, {jax.devices()[0].platform}")
  print(f"configs/synthetic.py half_precision: {config.model}, batch {config.batch_size}, "
        f"{config.image_size}px, {spe} steps/epoch; N = {ns}")

  # A held-out stream of batches to measure on (epoch 10**6 of the sampler: never trained on).
  probe = batches_of(dataset, config, 10**6, nbatches)

  plain = train_step.make_train_step(graphdef, tx, config, mesh)

  def on_step(step, st):
    if step in points:
      t = time.time()
      result["points"][f"step {step}"] = measure(grads_fn, grads32_fn, st, probe, ns, masked_ns)
      print(f"  measured at step {step} ({time.time() - t:.0f} s)", flush=True)

  epochs = 1 if args.smoke else config.num_epochs
  total = epochs * spe
  points = ([int(x) for x in args.points.split(",")] if args.points
            else [0] if args.smoke else [0, total // 2, total])
  if max(points) > total:
    raise SystemExit(f"--points beyond the {total} steps of {epochs} epochs")
  results = not (args.no_results or args.smoke)

  # The plain step from seed 0 (measured along the way), then, for the results, the emulated
  # 8-device bf16 ring all-reduce from the same seed and the plain step from the next seed
  # (the same compiled step: the graph does not depend on the seed).
  runs = [("plain", args.seed, None)]
  if results:
    runs += [("bf16 ring all-reduce, 8 devices", args.seed, (8, "ring")),
             ("plain", args.seed + 1, None)]
  for name, seed, emulated in runs:
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.seed = seed
    g, st, t_x = train_step.init_state(cfg, spe)
    st = sharding.replicate(st, mesh)
    step_fn = plain if emulated is None else make_emulated_step(g, t_x, cfg, *emulated)
    first = name == "plain" and seed == args.seed
    t = time.time()
    st, loss, steps = train(step_fn, st, dataset, cfg, epochs, on_step if first else None)
    seconds = time.time() - t
    if first and total in points:
      on_step(total, st)
    if not results:
      break
    metrics = evaluate(g, st, dataset, cfg, mesh)
    result["runs"].append(dict(name=name, seed=seed, loss=loss, seconds=seconds, **metrics))
    print(f"  trained {name} seed {seed}: {metrics} ({seconds:.0f} s)", flush=True)
  result["epochs"], result["steps"] = epochs, total
  result["seconds"] = time.time() - began
  print_tables(result)
  print(f"\n{result['seconds']:.0f} s in all")
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=1, default=float))
  return 0


if __name__ == "__main__":
  sys.exit(main())
