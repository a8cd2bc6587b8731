"""What float32 mining similarities cost on a TPU: the loss's program at both precisions.

  python benchmarks/mining_precision.py [--topology=v5e:2x2] [--smoke]

`losses.cosine_similarities` multiplies at precision HIGHEST, so the hardest-negative argmax,
the duplicate cut and their ties are decided in float32 on every backend. At default
precision a TPU multiplies float32 in one bfloat16 pass. This compiles the loss and its
gradient (the (B, D) embeddings of the global batch in, as the train step has them) for a
TPU target, no TPU needed, once as the project does and once with the default-precision
product, checks which precision the compiled programs carry, prints XLA's time estimate
(which, measured, does not model the extra passes: equal for both) and bounds the cost from
the passes: 5 more bf16 passes of the 3 (B, B, D) products per step, against the ResNet50
train step's FLOPs at that batch (31.2 GFLOP per image, from the preflight). It also counts
how often the two precisions pick another hardest negative on random embeddings.
"""

from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hn_jax  # noqa: E402,F401  (before jax: quiet plugins)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hn_jax import accelerators, cli, losses, preflight, sharding  # noqa: E402

RESNET50_STEP_FLOPS_PER_IMAGE = 31.2e9


def _default_precision_similarities(embeddings):
  f = embeddings.astype(jnp.float32)
  u = f / jnp.sqrt(jnp.maximum(jnp.sum(f * f, axis=1, keepdims=True), 1e-24))
  return u @ u.T


def _program(batch: int, dim: int, mesh, method: str):
  replicated = sharding.replicated(mesh)

  def loss(e, labels):
    return losses.triplet_loss(e, labels, method=method)[0]

  args = (jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=replicated),
          jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=replicated))
  return jax.jit(jax.value_and_grad(loss)).lower(*args)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--smoke", action="store_true")
  args = parser.parse_args(argv)
  sizes = [(64, 32)] if args.smoke else [(128, 64), (512, 512), (4096, 512)]
  topology = accelerators.parse_topology(args.topology)
  with cli.stderr_silenced():  # libtpu's start-up lines
    mesh = sharding.create_mesh(accelerators.compile_only_devices(topology))
  print("| batch | dim | compiled precision (project / default) | XLA estimate (project / "
        "default) | extra bf16 passes, bound | share of the ResNet50 step |")
  print("|---:|---:|---|---|---:|---:|")
  for batch, dim in sizes:
    high = _program(batch, dim, mesh, "sct")
    with mock.patch.object(losses.triplet, "cosine_similarities", _default_precision_similarities):
      low = _program(batch, dim, mesh, "sct")
    seen, estimate = [], []
    for lowered in (high, low):
      program = preflight.compile_program("loss", lowered, batch, topology.chip)
      with cli.stderr_silenced():
        text = lowered.compile().as_text()
      seen.append("highest" if "operand_precision={highest,highest}" in text else "default")
      estimate.append((program.xla_optimal_seconds or 0) * 1e6)
    # HIGHEST multiplies float32 in 6 bf16 passes where the default takes 1; the similarity
    # product appears 3 times per step (forward, and two products in its gradient).
    extra_flops = 5 * 3 * 2 * batch * batch * dim
    step_flops = RESNET50_STEP_FLOPS_PER_IMAGE * batch
    print(f"| {batch} | {dim} | {seen[0]} / {seen[1]} | {estimate[0]:.1f} / {estimate[1]:.1f} us "
          f"| {extra_flops / 1e9:.2f} GFLOP | {100 * extra_flops / step_flops:.3f}% |")
  # How often the bf16-rounded product picks another hardest negative (a pass of bf16
  # products emulated on the host: inputs rounded to bf16, float32 sums).
  rng = np.random.default_rng(0)
  batch, dim = sizes[-1]
  e = rng.normal(size=(batch, dim)).astype(np.float32)
  u = e / np.linalg.norm(e, axis=1, keepdims=True)
  exact = u.astype(np.float64) @ u.T.astype(np.float64)
  rounded = np.asarray(jnp.asarray(u, jnp.bfloat16).astype(jnp.float32))
  bf16 = rounded @ rounded.T
  labels = np.repeat(np.arange(batch // 2), 2)
  other = labels[:, None] != labels[None, :]
  pick = lambda s: np.argmax(np.where(other, s, -2), axis=1)  # noqa: E731
  changed = float(np.mean(pick(exact) != pick(bf16)))
  print(f"random unit embeddings, batch {batch}, dim {dim}: the hardest negative differs for "
        f"{100 * changed:.1f}% of anchors between bf16-pass and exact similarities "
        f"(float32 HIGHEST: {100 * float(np.mean(pick(exact) != pick(u @ u.T))):.1f}%)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
