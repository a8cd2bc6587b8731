"""Every registered loss, forward and backward: jitted JAX against pytorch-metric-learning.

    python benchmarks/losses.py [--batches=128,512,2048] [--dim=512] [--memory=8192]
                                [--losses=NAME,...] [--miners=LOSS+MINER,...]
                                [--loss_module=MOD] [--torch_threads=N] [--json=OUT] [--smoke]

For each loss of `hn_jax.losses.NAMES` (and a user's, registered by `--loss_module`), at each
batch: the time of one forward and backward pass (the gradient of the loss with respect to
the embeddings and to the loss's own parameters, its memory updated) of `losses.build(name)`
jitted, against PML's equivalent (`PML`, below; none for the paper's hn, shn and sct) on the
same CPU in the same process, torch on every core unless `--torch_threads` says otherwise.
Labels are the paper's sampler's: 2 embeddings per class, B/2 classes (a loss with a
parameter per class gets B/2 classes). Where a loss takes cross-batch memory, it is timed
again with `--memory` embeddings remembered (PML's CrossBatchMemory), both memories full of
the same embeddings (the steady state of training, in which the batch meets every slot).
Miner rows (`--miners`, LOSS+MINER, default `MINED`, "" for none): a pair or triplet loss
over the tuples a miner of `losses.MINER_NAMES` picks (`losses.build(loss, miner=...)`)
against PML's loss given PML's miner of that name, both with our defaults, with and without
the memory (which both miners then mine). Each time is the median of `--repeats` calls after
a warm-up (JAX's compile excluded). Both losses' values are printed: equal hyperparameters
give equal values where the two define the same loss (our loss's trainable arrays, the
proxies, are first copied into PML's of the same name). The table ends with the geometric
mean of the speedups at batch >= 512. `--smoke`: batches 16 and 32, dim 16, memory 64, 2
repeats.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hn_jax  # noqa: E402,F401  (before jax: quiet plugins)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from hn_jax import losses, train_step  # noqa: E402

# Our name -> PML's class, where the class name is not ours in CamelCase + "Loss"
# (`proxy_anchor` -> ProxyAnchorLoss is found without an entry). None: PML has no equivalent.
PML = {
    "hn": None, "shn": None, "sct": None,  # the paper's batch-hard mining with sct: not in PML
    "ntxent": "NTXentLoss", "nt_xent": "NTXentLoss", "supcon": "SupConLoss",
    "triplet": "TripletMarginLoss", "triplet_margin": "TripletMarginLoss",
    "nca": "NCALoss", "n_pairs": "NPairsLoss", "npairs": "NPairsLoss",
    "lifted": "LiftedStructureLoss", "generalized_lifted": "GeneralizedLiftedStructureLoss",
    "snr_contrastive": "SignalToNoiseRatioContrastiveLoss", "fastap": "FastAPLoss",
    "fast_ap": "FastAPLoss", "proxy_nca": "ProxyNCALoss",
    "smoothap": "SmoothAPLoss", "pnp": "PNPLoss", "softtriple": "SoftTripleLoss",
    "arcface": "ArcFaceLoss", "cosface": "CosFaceLoss", "sphereface": "SphereFaceLoss",
    "subcenter_arcface": "SubCenterArcFaceLoss", "large_margin_softmax": "LargeMarginSoftmaxLoss",
}
# The miner rows timed by default: LOSS+MINER (a loss of ours, a miner of losses.MINER_NAMES;
# PML's miner is ours in CamelCase + "Miner").
MINED = ("multi_similarity+multi_similarity", "triplet_margin+batch_hard",
         "triplet_margin+triplet_margin")


def pml_class(name: str) -> Any | None:
  """PML's loss class equivalent to our `name`, or None."""
  from pytorch_metric_learning import losses as pml  # pylint: disable=g-import-not-at-top
  cls = PML.get(name, "".join(part.capitalize() for part in name.split("_")) + "Loss")
  return None if cls is None else getattr(pml, cls, None)


def pml_miner(miner: str) -> Any:
  """PML's miner named `miner` in ours, with our defaults for its parameters."""
  from pytorch_metric_learning import miners as pml  # pylint: disable=g-import-not-at-top
  cls = getattr(pml, "".join(part.capitalize() for part in miner.split("_")) + "Miner")
  accepted = inspect.signature(cls.__init__).parameters
  return cls(**{k: v for k, v in losses.miners.miner_parameters(miner).items() if k in accepted})


def pml_loss(name: str, *, dim: int, num_classes: int, memory: int = 0,
             miner: str = "") -> Any | None:
  """PML's equivalent of `name` with our defaults for the hyperparameters both name alike;
  with memory, PML's CrossBatchMemory, mining with `miner` if one is named."""
  cls = pml_class(name)
  if cls is None:
    return None
  accepted = inspect.signature(cls.__init__).parameters
  ours = {k: v for k, v in losses.hyperparameters(name).items()
          if v is not inspect.Parameter.empty and k in accepted}
  shape = {"num_classes": num_classes, "embedding_size": dim}
  # A subclass may pass its base's arguments on through **kwargs (CosFaceLoss's base takes
  # the classes and dimension): the names any __init__ of the class's bases declares.
  declared = {name for base in cls.__mro__ if "__init__" in vars(base)
              for name in inspect.signature(base.__init__).parameters}
  loss = cls(**{k: v for k, v in shape.items() if k in declared}, **ours)
  if memory:
    import torch  # pylint: disable=g-import-not-at-top
    from pytorch_metric_learning import losses as pml  # pylint: disable=g-import-not-at-top
    loss = pml.CrossBatchMemory(loss, dim, memory_size=memory,
                                miner=pml_miner(miner) if miner else None)
    embeddings, labels = memory_fill(memory, dim, num_classes)
    loss.embedding_memory = torch.tensor(embeddings)
    loss.label_memory = torch.tensor(labels.astype(np.int64))
    loss.has_been_filled = True
  return loss


def copy_weights(params: nnx.State | None, pml: Any) -> list[str]:
  """Our loss's trainable arrays into PML's of the same name and shape (the proxies: `proxies`,
  `W`, `fc`), so that both compute the same loss; the names copied."""
  import torch  # pylint: disable=g-import-not-at-top
  copied = []
  for path, value in ([] if params is None else params.flat_state()):
    theirs = getattr(pml, str(path[-1]), None)
    ours = np.asarray(value[...])
    if isinstance(theirs, torch.nn.Parameter) and tuple(theirs.shape) == ours.shape:
      with torch.no_grad():
        theirs.copy_(torch.from_numpy(ours.copy()))
      copied.append(str(path[-1]))
  return copied


def memory_fill(memory: int, dim: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """A full memory, the same for both sides: its steady state, which every call then meets
  (both compare the batch with all `memory` slots; a filling memory would time less)."""
  rng = np.random.default_rng(1)
  return (rng.normal(size=(memory, dim)).astype(np.float32),
          rng.integers(0, num_classes, memory).astype(np.int32))


def jax_program(name: str, *, dim: int, num_classes: int, memory: int = 0, miner: str = ""):
  """(jitted (embeddings, labels, params, memory) -> ((loss, memory), grads), params,
  memory) of our loss, mined by `miner` if one is named; None where it takes no memory of
  that size."""
  try:
    module = losses.build(name, embedding_dim=dim, num_classes=num_classes,
                          rngs=nnx.Rngs(0), memory_size=memory, miner=miner)
  except ValueError:
    if not memory:
      raise
    return None
  if memory:
    embeddings, labels = memory_fill(memory, dim, num_classes)
    module.embeddings[...] = jnp.asarray(embeddings)
    module.labels[...] = jnp.asarray(labels)
    module.filled[...] = jnp.asarray(memory, jnp.int32)
  graphdef, params, state = train_step.split_loss(module)

  def loss_of(embeddings, labels, params, state):
    arrays = [a for a in (params, state) if a is not None] or [nnx.State({})]
    loss_module = nnx.merge(graphdef, *arrays, copy=True)  # fresh Variables: memory mutates
    loss, _ = loss_module(embeddings, labels)
    new_state = None if state is None else nnx.state(loss_module, losses.MemoryState)
    return loss, new_state

  grad = jax.value_and_grad(loss_of, argnums=(0, 2), has_aux=True)
  return jax.jit(grad), params, state


def _median_ms(call, repeats: int) -> float:
  call()  # warm-up (JAX: the compile)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def measure(name: str, batch: int, dim: int, memory: int, repeats: int,
            miner: str = "") -> dict[str, Any] | None:
  """One row: our time and value, PML's; None where our loss takes no such memory."""
  rng = np.random.default_rng(0)
  embeddings = rng.normal(size=(batch, dim)).astype(np.float32)
  labels = (np.arange(batch) // 2).astype(np.int32)  # 2 per class, the paper's sampler
  num_classes = batch // 2
  program = jax_program(name, dim=dim, num_classes=num_classes, memory=memory, miner=miner)
  if program is None:
    return None
  fn, params, state = program
  e, y = jnp.asarray(embeddings), jnp.asarray(labels)
  out = {}

  def run_jax():
    out["jax"] = jax.block_until_ready(fn(e, y, params, state))

  row = {"loss": name, "miner": miner, "batch": batch, "dim": dim, "memory": memory,
         "jax_ms": _median_ms(run_jax, repeats)}
  (value, _), _ = out["jax"]
  row["jax_value"] = float(value)
  pml = None
  try:
    pml = pml_loss(name, dim=dim, num_classes=num_classes, memory=memory, miner=miner)
  except ImportError:
    row["pml_note"] = "pytorch-metric-learning not installed"
  if pml is not None:
    import torch  # pylint: disable=g-import-not-at-top
    te, ty = torch.tensor(embeddings), torch.tensor(labels.astype(np.int64))
    copied = copy_weights(params, pml.loss if memory else pml)
    mine = pml_miner(miner) if miner and not memory else None  # PML's memory holds its own

    def run_pml():
      x = te.clone().requires_grad_(True)
      loss = pml(x, ty, mine(x, ty)) if mine else pml(x, ty)
      loss.backward()
      # The first call's value: ours, whose memory is not carried between calls, is always
      # that of a first call (PML's CrossBatchMemory keeps every call's batch).
      out.setdefault("pml", float(loss.detach()))

    torch.manual_seed(0)
    row["pml_class"] = type(pml.loss if memory else pml).__name__
    if copied:
      row["copied_to_pml"] = copied
    if miner:
      row["pml_miner"] = type(pml.miner if memory else mine).__name__
    try:
      row["pml_ms"] = _median_ms(run_pml, repeats)
    except (RuntimeError, MemoryError) as e:  # e.g. torch cannot allocate PML's (B, B, B)
      row["pml_error"] = str(e).splitlines()[0][:200]
      return row
    row["pml_value"] = out["pml"]
    row["speedup"] = row["pml_ms"] / row["jax_ms"]
  return row


def geometric_mean(values: list[float]) -> float | None:
  return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def table(rows: list[dict[str, Any]], min_batch: int) -> str:
  lines = [f"{'loss(+miner)':<34} {'batch':>6} {'memory':>6} {'JAX ms':>9} {'PML ms':>9} "
           f"{'speedup':>8}  {'JAX loss':>10} {'PML loss':>10}"]
  for r in rows:
    pml = r.get("pml_ms")
    missing = ("PML failed", "-", "-") if "pml_error" in r else ("-", "-", "-")
    cells = missing if pml is None else (
        f"{pml:.2f}", f"{r['speedup']:.2f}x", f"{r['pml_value']:.4f}")
    label = f"{r['loss']}+{r['miner']}" if r.get("miner") else r["loss"]
    lines.append(f"{label:<34} {r['batch']:>6} {r['memory'] or '-':>6} {r['jax_ms']:>9.2f} "
                 f"{cells[0]:>9} {cells[1]:>8}  {r['jax_value']:>10.4f} {cells[2]:>10}")
  mean = geometric_mean([r["speedup"] for r in rows
                         if "speedup" in r and r["batch"] >= min_batch])
  lines.append(f"geometric mean speedup at batch >= {min_batch}: "
               + ("- (no PML equivalent measured)" if mean is None else f"{mean:.2f}x"))
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", default="128,512,2048")
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--memory", type=int, default=8192,
                      help="cross-batch memory size (0: none)")
  parser.add_argument("--losses", default="", help="comma-separated; default: every registered")
  parser.add_argument("--miners", default=",".join(MINED),
                      help="LOSS+MINER rows, comma-separated (\"\": none)")
  parser.add_argument("--loss_module", default="", help="a module that registers losses")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--torch_threads", type=int, default=0,
                      help="torch's threads (0: one per core; on a machine busy with other "
                      "work, 1 avoids OpenMP's waits for descheduled threads)")
  parser.add_argument("--json", default="")
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--max_memory_gb", type=float,
                      default=0.75 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                      / 2**30, help="address space the run may take (0: no limit)")
  args = parser.parse_args(argv)
  if args.loss_module:
    importlib.import_module(args.loss_module)
  batches = [int(b) for b in args.batches.split(",")]
  dim, memory, repeats = args.dim, args.memory, args.repeats
  if args.smoke:
    batches, dim, memory, repeats = [16, 32], 16, 64, 2
  names = [n.strip() for n in args.losses.split(",") if n.strip()] or list(losses.NAMES)
  unknown = [n for n in names if n not in losses.NAMES]
  if unknown:
    parser.error(f"--losses: {', '.join(unknown)} not registered; use {', '.join(losses.NAMES)}")
  mined = [tuple(m.strip().split("+", 1)) for m in args.miners.split(",") if m.strip()]
  for combo in mined:
    try:
      if len(combo) != 2:
        raise ValueError("write LOSS+MINER")
      losses.check(combo[0], miner=combo[1])
    except ValueError as e:
      parser.error(f"--miners: {'+'.join(combo)}: {e}")
  if args.max_memory_gb > 0:
    # An allocation past this fails (a RuntimeError: that row says "PML failed") instead of
    # the kernel killing the whole run: PML's lifted structure with memory wants (B, M, M).
    import resource  # pylint: disable=g-import-not-at-top
    limit = int(args.max_memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
  rows = []
  for name, miner in [(name, "") for name in names] + mined:
    for batch in batches:
      for mem in (0, memory) if memory else (0,):
        row = measure(name, batch, dim, mem, repeats, miner)
        if row is not None:
          rows.append(row)
          print(f"{name}{'+' + miner if miner else ''} batch {batch} memory {mem}: "
                f"JAX {row['jax_ms']:.2f} ms"
                + (f", PML {row['pml_ms']:.2f} ms" if "pml_ms" in row else ""), flush=True)
  min_batch = 512 if not args.smoke else batches[-1]
  text = table(rows, min_batch)
  print(text)
  result = {"smoke": args.smoke, "dim": dim, "batches": batches, "memory": memory,
            "miners": ["+".join(combo) for combo in mined],
            "repeats": repeats, "cpu_count": os.cpu_count(), "torch_threads":
            torch.get_num_threads(), "rows": rows, "min_batch": min_batch,
            "geometric_mean_speedup": geometric_mean(
                [r["speedup"] for r in rows if "speedup" in r and r["batch"] >= min_batch])}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
