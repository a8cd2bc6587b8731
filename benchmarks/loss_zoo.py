"""Times the pair and triplet losses (hn_jax.losses) against pytorch-metric-learning on CPU.

    python benchmarks/loss_zoo.py [--batches=128,512,2048] [--dim=512] [--json=PATH]
    python benchmarks/loss_zoo.py --smoke      # tiny sizes: tests the script, not the speed

Each timing is one loss and its gradient with respect to the embeddings (forward and
backward), the median of --repeats runs after a warm-up (JAX: a jitted value_and_grad, its
compile excluded; PML: loss(emb, labels).backward() on torch's CPU threads, every PML timing
first, before JAX starts its thread pool). Batches hold 4 images per class. The two losses'
values on the batch are compared (rel_diff). PML is skipped where its largest temporary
would exceed --pml-max-bytes: the SNR distance's (B, B, D) tensor, lifted structure's and
NT-Xent's (positive pairs x negative pairs) masks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> (PML class, its keyword arguments, PML miner or None)
LOSSES = {
    "contrastive": ("ContrastiveLoss", {}, None),
    "triplet_margin": ("TripletMarginLoss", {}, None),
    "multi_similarity": ("MultiSimilarityLoss", {}, None),
    "circle": ("CircleLoss", {}, None),
    "lifted_structure": ("LiftedStructureLoss", {}, None),
    "generalized_lifted_structure": ("GeneralizedLiftedStructureLoss", {}, None),
    "ntxent": ("NTXentLoss", {}, None),
    "supcon": ("SupConLoss", {}, None),
    "margin": ("MarginLoss", {}, None),
    "fast_ap": ("FastAPLoss", {}, None),
    "snr_contrastive": ("SignalToNoiseRatioContrastiveLoss", {}, None),
    "multi_similarity+miner": ("MultiSimilarityLoss", {}, "MultiSimilarityMiner"),
    "triplet_margin+batch_hard": ("TripletMarginLoss", {}, "BatchHardMiner"),
}
MINERS = {"MultiSimilarityMiner": "multi_similarity", "BatchHardMiner": "batch_hard"}


def _pml_bytes(name: str, batch: int, dim: int) -> float:
  """What PML's largest temporaries take: the SNR distance's (B, B, D) differences; lifted
  structure's and NT-Xent's (positive pairs x negative pairs) masks (bool, float32, product)."""
  if name.startswith("snr"):
    return 4.0 * batch * batch * dim
  if name.startswith(("lifted_structure", "ntxent")):
    return 9.0 * (3 * batch) * (batch * (batch - 4))
  return 0.0


def _median_time(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="128,512,2048")
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--losses", default=",".join(LOSSES))
  parser.add_argument("--pml-max-bytes", type=float, default=8e9)
  parser.add_argument("--smoke", action="store_true", help="batch 16, dim 8, 1 repeat")
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  if args.smoke:
    args.batches, args.dim, args.repeats = "16", 8, 1

  # pylint: disable=import-outside-toplevel
  import numpy as np
  import torch
  from pytorch_metric_learning import losses as pml_losses
  from pytorch_metric_learning import miners as pml_miners

  names = [n for n in args.losses.split(",") if n]
  unknown = sorted(set(names) - set(LOSSES))
  if unknown:
    parser.error(f"unknown --losses {', '.join(unknown)}; use some of {', '.join(LOSSES)}")
  batches = [int(b) for b in args.batches.split(",")]

  def data(batch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, args.dim)).astype(np.float32)
    return x, np.repeat(np.arange(batch // 4 + 1), 4)[:batch]

  # PML first, before JAX starts its thread pool (which would compete with torch's).
  pml_results = {}
  for batch in batches:
    x, y = data(batch)
    for name in names:
      pml_class, kwargs, pml_miner = LOSSES[name]
      if _pml_bytes(name, batch, args.dim) > args.pml_max_bytes:
        continue
      pml = getattr(pml_losses, pml_class)(**kwargs)
      miner = getattr(pml_miners, pml_miner)() if pml_miner else None
      xt, yt = torch.tensor(x), torch.tensor(y)

      def pml_step(pml=pml, miner=miner, xt=xt, yt=yt):
        e = xt.clone().requires_grad_(True)
        value = pml(e, yt, miner(e, yt)) if miner else pml(e, yt)
        value.backward()
        return value.item()
      pml_results[name, batch] = (pml_step(), _median_time(pml_step, args.repeats))

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from hn_jax import losses

  rows = []
  for batch in batches:
    x, y = data(batch)
    for name in names:
      _, _, pml_miner = LOSSES[name]
      module = losses.build(name.split("+")[0], embedding_dim=args.dim,
                            num_classes=batch // 4 + 1, rngs=nnx.Rngs(0),
                            miner=MINERS[pml_miner] if pml_miner else "")
      step = jax.jit(jax.value_and_grad(lambda e, labels, m=module: m(e, labels)[0]))
      xj, yj = jnp.asarray(x), jnp.asarray(y)
      ours_value = float(step(xj, yj)[0])
      ours = _median_time(lambda: jax.block_until_ready(step(xj, yj)), args.repeats)
      row = {"loss": name, "batch": batch, "dim": args.dim, "ours_s": ours}
      if (name, batch) in pml_results:
        pml_value, pml_s = pml_results[name, batch]
        row.update(pml_s=pml_s, speedup=pml_s / ours,
                   rel_diff=abs(ours_value - pml_value) / max(1e-12, abs(pml_value)))
      else:
        row.update(pml_s=None, note=f"PML skipped: it would allocate "
                   f"{_pml_bytes(name, batch, args.dim) / 1e9:.0f} GB")
      rows.append(row)
      speed = f"{row['speedup']:7.2f}x" if row.get("speedup") else "      -"
      pml_s = f"{row['pml_s'] * 1e3:10.2f}" if row.get("pml_s") else "         -"
      print(f"{name:30s} B={batch:5d}  ours {ours * 1e3:10.2f} ms  pml {pml_s} ms  {speed}"
            f"  rel.diff {row.get('rel_diff', float('nan')):.1e}", flush=True)

  summary = {}
  for batch in sorted({r["batch"] for r in rows}):
    speedups = [r["speedup"] for r in rows if r["batch"] == batch and r.get("speedup")]
    if speedups:
      summary[batch] = {"geomean_speedup": math.exp(statistics.fmean(map(math.log, speedups))),
                        "slower_than_pml": [r["loss"] for r in rows
                                            if r["batch"] == batch and r.get("speedup")
                                            and r["speedup"] < 1]}
      print(f"B={batch}: geometric mean speed-up {summary[batch]['geomean_speedup']:.2f}x; "
            f"slower than PML: {', '.join(summary[batch]['slower_than_pml']) or 'none'}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": rows, "summary": summary, "torch_threads": torch.get_num_threads(),
                 "jax": jax.__version__, "load": os.getloadavg()}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
