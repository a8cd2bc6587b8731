"""Proxy and classification losses: hn_jax vs pytorch-metric-learning, loss and gradients.

    python benchmarks/losses_proxy.py [--batches=128,512,2048] [--dim=512] [--classes=100]
        [--json=/tmp/losses_proxy.json]
    JAX_PLATFORMS=cpu python benchmarks/losses_proxy.py --smoke

Times one training step's share of each loss: the loss and its gradients w.r.t. the
embeddings and the loss's trainable arrays, float32. hn_jax: the registered module's jitted
`value_and_grad` (compiled before timing). PML 2.9: the loss's forward and `backward()` in
eager PyTorch on the same embeddings, labels and weights (copied in). The two take turns,
`--reps` calls each; reported: the median and the min of each, their ratios and how far the
two losses agree.
For a fair CPU comparison run both on one thread:

    OMP_NUM_THREADS=1 JAX_PLATFORMS=cpu XLA_FLAGS='--xla_cpu_multi_thread_eigen=false
        intra_op_parallelism_threads=1' python benchmarks/losses_proxy.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from hn_jax import losses  # noqa: E402

# name -> (PML class name, trainable attribute: the same name in both)
PML = {
    "proxy_nca": ("ProxyNCALoss", "proxies"),
    "proxy_anchor": ("ProxyAnchorLoss", "proxies"),
    "normalized_softmax": ("NormalizedSoftmaxLoss", "W"),
    "arcface": ("ArcFaceLoss", "W"),
    "cosface": ("CosFaceLoss", "W"),
    "soft_triple": ("SoftTripleLoss", "fc"),
}


def _interleaved_ms(fns, reps: int) -> list[tuple[float, float]]:
  """(median, min) in ms of `reps` timed calls of each of `fns`, called in turn, so that a
  shared machine's changing load falls on all of them alike; the min is the call least
  slowed by the others."""
  times = [[] for _ in fns]
  for _ in range(reps):
    for fn, kept in zip(fns, times):
      start = time.perf_counter()
      fn()
      kept.append(time.perf_counter() - start)
  return [(1e3 * statistics.median(t), 1e3 * min(t)) for t in times]


def jax_step(name: str, dim: int, classes: int):
  """(weight, jitted (state, x, y) -> ((loss, aux), grads), state) for the registered loss."""
  module = losses.create(name, embedding_dim=dim, num_classes=classes, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(module)

  def loss_fn(state, x, y):
    return nnx.merge(graphdef, state)(x, y)

  weight = np.asarray(getattr(module, PML[name][1])[...])
  return weight, jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)), state


def measure(name: str, batch: int, dim: int, classes: int, reps: int) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import pytorch_metric_learning.losses as pml  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(batch)
  x = rng.normal(size=(batch, dim)).astype(np.float32)
  y = rng.integers(0, classes, batch).astype(np.int32)
  weight, step, state = jax_step(name, dim, classes)
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  start = time.perf_counter()
  (loss, _), _ = jax.block_until_ready(step(state, xj, yj))
  compile_s = time.perf_counter() - start

  cls_name, attr = PML[name]
  theirs = getattr(pml, cls_name)(num_classes=classes, embedding_size=dim)
  getattr(theirs, attr).data = torch.from_numpy(weight.copy())
  xt = torch.from_numpy(x.copy()).requires_grad_(True)
  yt = torch.from_numpy(y.astype(np.int64))

  def torch_step():
    xt.grad = None
    theirs.zero_grad(set_to_none=True)
    out = theirs(xt, yt)
    out.backward()
    return out

  torch_loss = torch_step().item()
  (jax_ms, jax_min_ms), (pml_ms, pml_min_ms) = _interleaved_ms(
      [lambda: jax.block_until_ready(step(state, xj, yj)), torch_step], reps)
  return {"loss": name, "batch": batch, "dim": dim, "classes": classes,
          "hn_jax_ms": jax_ms, "pml_ms": pml_ms, "pml_over_hn_jax": pml_ms / jax_ms,
          "hn_jax_min_ms": jax_min_ms, "pml_min_ms": pml_min_ms,
          "pml_over_hn_jax_min": pml_min_ms / jax_min_ms,
          "compile_s": compile_s, "loss_hn_jax": float(loss), "loss_pml": torch_loss,
          "loss_rel_diff": abs(float(loss) - torch_loss) / max(abs(torch_loss), 1e-12)}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="128,512,2048")
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--classes", type=int, default=100)
  parser.add_argument("--losses", default=",".join(PML))
  parser.add_argument("--reps", type=int, default=15)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, one rep: runs only")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  names = args.losses.split(",")
  unknown = sorted(set(names) - set(PML))
  if unknown:
    parser.error(f"unknown loss {', '.join(unknown)}; choose from {', '.join(PML)}")
  batches = [int(b) for b in args.batches.split(",")]
  dim, classes, reps = args.dim, args.classes, args.reps
  if args.smoke:
    batches, dim, classes, reps = [16], 8, 5, 1

  try:
    import torch  # pylint: disable=import-outside-toplevel
    import pytorch_metric_learning  # noqa: F401  pylint: disable=unused-import
  except ImportError:
    parser.error("needs torch and pytorch-metric-learning: pip install "
                 "pytorch-metric-learning==2.9.0")
  rows = []
  print(f"{'loss':20s} {'batch':>6s} {'hn_jax ms':>10s} {'PML ms':>10s} {'PML/hn_jax':>10s} "
        f"{'(min) hn_jax':>13s} {'PML':>8s} {'PML/hn_jax':>10s} {'loss rel diff':>14s}")
  for name in names:
    for batch in batches:
      row = measure(name, batch, dim, classes, reps)
      rows.append(row)
      print(f"{name:20s} {batch:6d} {row['hn_jax_ms']:10.2f} {row['pml_ms']:10.2f} "
            f"{row['pml_over_hn_jax']:10.2f} {row['hn_jax_min_ms']:13.2f} {row['pml_min_ms']:8.2f} "
            f"{row['pml_over_hn_jax_min']:10.2f} {row['loss_rel_diff']:14.2e}", flush=True)
  result = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                 f"load {os.getloadavg()[0]:.1f}",
      "jax_backend": jax.default_backend(), "torch_threads": torch.get_num_threads(),
      "smoke": args.smoke, "reps": reps, "results": rows,
  }
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
