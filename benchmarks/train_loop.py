"""Training-loop throughput: the real loop pieces against the step alone and the input alone.

  python benchmarks/train_loop.py                      # small model, float32, batch 128, 256 px
  python benchmarks/train_loop.py --model=resnet50 --dtype=bfloat16 --batch=128,512
  python benchmarks/train_loop.py --smoke --check_no_tf # digits, seconds; what the test runs

On a cached synthetic split (`hn_jax.data.in_memory.synthetic_images` at the image size, its train
cache built once in memory, timed apart) it times, for each batch size:
- input alone: `input_pipeline.train_batches` (sampler, cached crops) through
  `input_pipeline.prefetch_to_device` (host -> device as uint8), no step;
- step alone: the jitted `train_step.make_train_step` on one batch already on the devices;
- loop: the two together as `hn_jax.train` runs them, with its one-step-late metric read.
The first batch size's step is compiled (a first call on zeros) while the split is made and
cached, in another thread (not with --smoke): its "compile_s" is then measured beside that
work; "first_real_step_s" is the first call on a real batch (short: nothing to recompile).
Each over `--steps` steps after `--warmup` (the input alone over at least 20), on every
device of one mesh; step alone and loop in `--rounds` interleaved rounds, the best of each
kept (load from other jobs only slows a round down). The loop should reach the slower of the
other two (on a GPU: the step). Nothing here needs TensorFlow, TFDS
or CLU; `--check_no_tf` makes them unimportable and reports that none was loaded.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN_MODULES = ("tensorflow", "tensorflow_datasets", "clu")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="small", help="small, resnet18 or resnet50")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--batch", default="128", help="global batch sizes, comma-separated")
  p.add_argument("--image_size", type=int, default=256)
  p.add_argument("--classes", type=int, default=200,
                 help="synthetic classes (half of them train, the only half generated) at 10 "
                      "images each")
  p.add_argument("--steps", type=int, default=4, help="timed steps of each measurement")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
  p.add_argument("--rounds", type=int, default=2,
                 help="interleaved rounds of step alone and loop; the best of each counts")
  p.add_argument("--smoke", action="store_true",
                 help="digits at 16 px, batch 64, 3 steps: a quick check of the script")
  p.add_argument("--check_no_tf", action="store_true",
                 help="make tensorflow, tensorflow_datasets and clu unimportable")
  p.add_argument("--json", help="also write the results to this file")
  args = p.parse_args(argv)
  if args.smoke:
    args.model, args.dtype, args.image_size, args.batch, args.steps, args.rounds = (
        "small", "float32", 16, "64", 3, 1)
  args.batch = [int(b) for b in str(args.batch).split(",") if b.strip()]
  return args


def _blocked_loaded() -> list[str]:
  return sorted(m for m, mod in list(sys.modules.items())
                if m.split(".")[0] in FORBIDDEN_MODULES and mod is not None)


def _config(args, batch: int):
  if args.smoke:
    # tests/test_train.py's digits run, so that the test of this script and that one share
    # the compiled step (JAX's persistent compilation cache).
    from configs import digits  # pylint: disable=g-import-not-at-top
    config = digits.get_config()
    config.update(dict(image_size=16, embedding_dim=16, batch_size=batch, eval_batch_size=512,
                       num_epochs=2, eval_every=1, lr_drop_epochs=(2,), cache="memory"))
    return config
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  config = synthetic.get_config()
  config.update(dict(model=args.model, half_precision=args.dtype == "bfloat16",
                     image_size=args.image_size, batch_size=batch, synthetic_classes=args.classes,
                     embedding_dim=64, cache="memory", learning_rate=0.01))
  return config


def _train_split(args, config):
  """The training split the loop reads: digits' (--smoke), or the training half of the
  synthetic set (only that half is generated: the other is never read here)."""
  if args.smoke:
    from hn_jax.data import datasets  # pylint: disable=g-import-not-at-top
    return datasets.load(config).train
  from hn_jax.data import in_memory, splits  # pylint: disable=g-import-not-at-top
  images, labels = in_memory.synthetic_images(
      args.classes // 2, config.get("synthetic_images_per_class", 10), config.image_size)
  return splits.Split(images, labels, name="synthetic-train",
                      fingerprint=f"train_loop-synthetic-{args.classes}-{config.image_size}")


def _peak_bytes() -> dict:
  """Device 0's peak bytes in use so far in this process (nothing on hosts without it)."""
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.local_devices()[0].memory_stats() or {}
  return {k: stats[k] for k in ("peak_bytes_in_use", "bytes_limit") if k in stats}


def _synthetic_labels(args, config):
  """The labels `_train_split` gives the synthetic set, known before its images exist."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.repeat(np.arange(args.classes // 2, dtype=np.int64),
                   config.get("synthetic_images_per_class", 10))


def prepare(args, batch: int, labels) -> dict:
  """Model, optimizer state and the step of one batch size, compiled by a first call on a
  batch of zeros shaped, typed and placed as the loop's batches are (needs the labels only)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from hn_jax import sharding, train_step  # pylint: disable=g-import-not-at-top
  from hn_jax.data import input_pipeline, samplers  # pylint: disable=g-import-not-at-top

  config = _config(args, batch)
  mesh = sharding.create_mesh()
  steps_per_epoch = samplers.steps_per_epoch(labels, config)
  if steps_per_epoch == 0:
    raise ValueError(f"batch {batch} is larger than an epoch; raise --classes")
  tx = train_step.create_optimizer(config, steps_per_epoch)
  graphdef, state = train_step.create_train_state(train_step.init_model(config), tx)
  state = sharding.replicate(state, mesh)
  step = train_step.make_train_step(graphdef, tx, config, mesh)
  local = batch // jax.process_count()
  size = config.image_size
  zeros = dict(images=np.zeros((local, size, size, 3), np.uint8),
               labels=(np.arange(local) // 2).astype(np.int32), flips=np.zeros(local, bool))
  (dummy,) = input_pipeline.prefetch_to_device([zeros], mesh)
  start = time.perf_counter()
  state, metrics = step(state, dummy["images"], dummy["labels"], dummy["flips"])
  jax.block_until_ready(metrics)
  return dict(config=config, mesh=mesh, state=state, step=step,
              compile_s=time.perf_counter() - start)


def measure(args, batch: int, split, build_s: float, prepared: dict | None = None) -> dict:
  """One batch size's row; `prepared` (from `prepare`) when its step is compiled already."""
  import jax  # pylint: disable=g-import-not-at-top
  from hn_jax import sharding  # pylint: disable=g-import-not-at-top
  from hn_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

  prepared = prepared or prepare(args, batch, split.labels)
  config, mesh, state, step = (prepared[k] for k in ("config", "mesh", "state", "step"))
  compile_s = prepared["compile_s"]
  total = args.warmup + args.steps

  def batches():
    """The loop's device batches, epoch after epoch. (One prefetch over the epochs, unlike
    hn_jax.train, which evaluates between them: the synthetic epochs are short.)"""
    def host():
      epoch = 1
      while True:
        yield from input_pipeline.train_batches(split, config, epoch)
        epoch += 1
    return input_pipeline.prefetch_to_device(host(), mesh)

  # Input alone (cheap: over at least 20 batches).
  input_steps = max(args.steps, 20)
  stream = batches()
  for _ in range(args.warmup):
    jax.block_until_ready(next(stream))
  start = time.perf_counter()
  last = None
  for _ in range(input_steps):
    last = next(stream)
  jax.block_until_ready(last)
  input_s = time.perf_counter() - start
  stream.close()

  stream = batches()
  fixed = next(stream)
  stream.close()
  start = time.perf_counter()  # compiled already, unless the real batch differs from the zeros
  state, metrics = step(state, fixed["images"], fixed["labels"], fixed["flips"])
  jax.block_until_ready(metrics)
  first_step_s = time.perf_counter() - start

  def step_alone(state):
    """On one batch already on the devices."""
    for _ in range(args.warmup):
      state, metrics = step(state, fixed["images"], fixed["labels"], fixed["flips"])
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = step(state, fixed["images"], fixed["labels"], fixed["flips"])
    jax.block_until_ready(metrics)
    return state, metrics, time.perf_counter() - start

  def loop(state):
    """Input, transfer and step together, each step's metrics read a step late."""
    stream = batches()
    pending = metrics = start = None
    for i in range(total):
      if i == args.warmup:
        jax.block_until_ready(metrics)
        start = time.perf_counter()
      b = next(stream)
      state, metrics = step(state, b["images"], b["labels"], b["flips"])
      if pending is not None:
        float(sharding.local_value(pending)["loss"])
      pending = metrics
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
    stream.close()
    return state, metrics, elapsed

  # Interleaved rounds; the best of each (other load on the machine only slows a round down).
  step_times, loop_times = [], []
  for _ in range(args.rounds):
    state, metrics, elapsed = step_alone(state)
    step_times.append(elapsed)
    state, metrics, elapsed = loop(state)
    loop_times.append(elapsed)
  step_s, loop_s = min(step_times), min(loop_times)

  n = args.steps * batch
  row = dict(model=args.model, dtype=args.dtype, batch=batch, image_size=args.image_size,
             devices=int(mesh.devices.size), cache_build_s=build_s, compile_s=compile_s,
             first_real_step_s=first_step_s,
             input_images_per_s=input_steps * batch / input_s, step_images_per_s=n / step_s,
             loop_images_per_s=n / loop_s, final_loss=float(metrics["loss"]),
             step_rounds_s=step_times, loop_rounds_s=loop_times)
  row["loop_over_slower"] = row["loop_images_per_s"] / min(row["input_images_per_s"],
                                                           row["step_images_per_s"])
  row["loop_over_step"] = row["loop_images_per_s"] / row["step_images_per_s"]
  row.update(_peak_bytes())  # the process's high-water mark: batch sizes run smallest first
  return row


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.check_no_tf:
    for name in FORBIDDEN_MODULES:
      if sys.modules.get(name) is None:
        sys.modules[name] = None  # type: ignore[assignment]  # "not importable"
  sys.path.insert(0, REPO)
  import jax  # pylint: disable=g-import-not-at-top
  from hn_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

  # One split and one cache for every batch size (they do not depend on it), made while the
  # first batch size's step compiles (the synthetic labels are known before the images).
  config = _config(args, args.batch[0])
  times = {}

  def build():
    start = time.perf_counter()
    split = _train_split(args, config)
    times["split_s"] = time.perf_counter() - start
    start = time.perf_counter()
    input_pipeline.cache_of(split, "train", config)
    times["build_s"] = time.perf_counter() - start
    return split

  first = None
  if args.smoke:
    split = build()
  else:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      future = pool.submit(build)
      first = prepare(args, args.batch[0], _synthetic_labels(args, config))
      split = future.result()
    assert (split.labels == _synthetic_labels(args, config)).all()
  split_s, build_s = times["split_s"], times["build_s"]
  device = jax.devices()[0]
  rows = []

  def write(complete: bool) -> None:
    """The JSON after every batch size, so that a run cut short keeps the finished ones."""
    if args.json:
      with open(args.json, "w") as f:
        json.dump(dict(rows=rows, load=os.getloadavg(), device=str(device.device_kind),
                       cores=os.cpu_count(), forbidden_loaded=_blocked_loaded(),
                       split_s=split_s, train_images=len(split), complete=complete), f,
                  indent=2)

  print(f"{len(split)} training images of {args.image_size} px made in {split_s:.1f} s, cached "
        f"in {build_s:.1f} s", flush=True)
  for i, batch in enumerate(args.batch):
    rows.append(measure(args, batch, split, build_s, first if i == 0 else None))
    first = None
    print(json.dumps(rows[-1]), flush=True)
    write(complete=False)
  load = os.getloadavg()
  print(f"\n{platform.machine()}, {os.cpu_count()} cores, {device.platform} "
        f"{device.device_kind} x {jax.device_count()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
        f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, {input_pipeline.CACHE_THREADS} input "
        f"threads\n")
  print("| model | dtype | batch | input alone images/s | step alone images/s | loop images/s "
        "| loop / slower | loop / step |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['input_images_per_s']:.0f} | "
          f"{r['step_images_per_s']:.0f} | {r['loop_images_per_s']:.0f} | "
          f"{r['loop_over_slower']:.2f} | {r['loop_over_step']:.2f} |")
  loaded = _blocked_loaded()
  if args.check_no_tf:
    print(f"check_no_tf: tensorflow, tensorflow_datasets and clu blocked; loaded: {loaded}")
  write(complete=True)


if __name__ == "__main__":
  main()
