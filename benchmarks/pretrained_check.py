"""Checks hn_jax.pretrained against the reference libraries' models (needs torch).

The references: torchvision's ResNets and GoogLeNet, timm's ViTs, where installed; else the
models of `hn_jax.testing.torch_reference`, written in those libraries' layouts and keys (the
torchvision build that matches requirements-test.txt's CPU torch does not import beside it), and
each row says which it used. For each architecture: the reference initialised under
`torch.manual_seed(0)`, every BatchNorm and LayerNorm given random affine parameters (and
BatchNorm random running statistics), saved with `torch.save`, loaded into
`hn_jax.models.create_model(name)` with `load_torchvision_weights`, and the eval-mode backbone
features (the input of the classifier; a ViT's normed class token) compared on random images.
A ViT is built for `--image_size` (its position embeddings resized from 224 px as timm does).

The reference runs in float64 on the CPU; JAX runs float32 on its default device, once at
"highest" matmul/conv precision (the pass/fail check: norm-wise relative error
<= --tolerance) and once at the default precision (TF32 on recent NVIDIA GPUs, reported only).
The reference in float32 on the CPU is reported too, as the scale of float32 rounding.

  python benchmarks/pretrained_check.py        # resnet18, resnet50, googlenet, vit_small_patch16
  python benchmarks/pretrained_check.py --models=resnet50 --image_size=224 --batch=8
  python benchmarks/pretrained_check.py --weights=/path/to/resnet50-0676ba61.pth --models=resnet50
  python benchmarks/pretrained_check.py --smoke   # 2 models, 2 images of 32 px: tests the script

With --weights, that file (e.g. the real IMAGENET1K_V1 weights) replaces the random init.
Imports neither tensorflow nor, until run, torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from hn_jax.models import create_model  # noqa: E402
from hn_jax.pretrained import load_torchvision_weights  # noqa: E402
from hn_jax.testing import torch_reference  # noqa: E402


def _rel(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  norm = float(np.linalg.norm(got - want) / np.linalg.norm(want))
  peak = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
  return norm, peak


def _reference(name: str, image_size: int):
  """(torch model with the reference library's keys, its features function, what it is):
  torchvision's / timm's own model where installed, else hn_jax.testing.torch_reference's."""
  import torch  # pylint: disable=import-outside-toplevel
  if name.startswith("resnet"):
    model, what = torch_reference.build_torch_resnet(name, 1000)

    def features(m, x):
      fc, m.fc = m.fc, torch.nn.Identity()
      try:
        return m(x)
      finally:
        m.fc = fc
    return model, features, what
  if name == "googlenet":
    try:
      import torchvision  # pylint: disable=import-outside-toplevel
      model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True,
                                           transform_input=False)
      model.fc = torch.nn.Identity()
      return model, lambda m, x: m(x), f"torchvision {torchvision.__version__} googlenet"
    except ImportError:
      return (torch_reference.build_torch_googlenet(1000, aux_logits=True),
              lambda m, x: m.features(x), "googlenet in torchvision's layout (torch_reference)")
  if name.startswith("vit_"):
    width, depth, heads = {"vit_small_patch16": (384, 12, 6),
                           "vit_base_patch16": (768, 12, 12)}[name]
    try:
      import timm  # pylint: disable=import-outside-toplevel
      model = timm.create_model(f"{name}_224", pretrained=False, num_classes=0,
                                img_size=image_size)
      return model, lambda m, x: m(x), f"timm {timm.__version__} {name}_224"
    except ImportError:
      return (torch_reference.build_torch_vit(width=width, depth=depth, heads=heads,
                                              image_size=image_size),
              lambda m, x: m.features(x), f"{name} in timm's layout (torch_reference)")
  raise ValueError(f"no reference for {name!r}")


def check(name: str, image_size: int, batch: int, weights: str | None, workdir: str) -> dict:
  """Runs one comparison, prints it, returns its errors (`rel_err_highest` decides)."""
  import torch  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  tv, reference_features, what = _reference(name, image_size)
  if weights:
    tv.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True),
                       strict=not name.startswith("vit_"))
    path = weights
  else:
    torch_reference.randomize_norms(tv, seed=1)
    path = os.path.join(workdir, f"{name}.pth")
    torch.save(tv.state_dict(), path)
  tv.eval()

  model = create_model(name, 128, rngs=nnx.Rngs(0),
                       image_size=image_size if name.startswith("vit_") else None)
  t0 = time.perf_counter()
  load_torchvision_weights(model, path)
  load_s = time.perf_counter() - t0
  model.eval()

  images = np.random.default_rng(0).standard_normal(
      (batch, image_size, image_size, 3)).astype(np.float32)
  x = torch.from_numpy(images).permute(0, 3, 1, 2)
  with torch.no_grad():
    want = reference_features(tv.double(), x.double()).numpy()
    tv32 = reference_features(tv.float(), x).numpy()

  features = nnx.jit(lambda m, im: m.features(im))
  with jax.default_matmul_precision("highest"):
    got_highest = np.asarray(features(model, jnp.asarray(images)))
  got_default = np.asarray(nnx.jit(lambda m, im: m.features(im))(model, jnp.asarray(images)))

  err_highest, peak_highest = _rel(got_highest, want)
  err_default, peak_default = _rel(got_default, want)
  err_tv32, peak_tv32 = _rel(tv32, want)
  print(f"{name} against {what} "
        f"({'file ' + weights if weights else 'random init, BN stats randomized'}), "
        f"{batch}x{image_size}x{image_size}, features {want.shape}, load {load_s:.2f}s")
  print(f"  jax float32 highest precision on {jax.devices()[0]}: "
        f"rel err norm {err_highest:.3e}, max {peak_highest:.3e}")
  print(f"  jax float32 default precision on {jax.devices()[0]}: "
        f"rel err norm {err_default:.3e}, max {peak_default:.3e}")
  print(f"  the reference in float32 on cpu (for scale): "
        f"rel err norm {err_tv32:.3e}, max {peak_tv32:.3e}")
  return dict(name=name, weights=weights or "", image_size=image_size, batch=batch,
              rel_err_highest=err_highest, max_rel_err_highest=peak_highest,
              rel_err_default=err_default, max_rel_err_default=peak_default,
              rel_err_torchvision_float32=err_tv32, load_s=load_s, reference=what)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="resnet18,resnet50,googlenet,vit_small_patch16",
                      help="any of resnet18, resnet50, googlenet, vit_small_patch16, "
                           "vit_base_patch16")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--weights", default=None,
                      help="a torchvision .pth to use instead of the random init (one model)")
  parser.add_argument("--tolerance", type=float, default=1e-4)
  parser.add_argument("--smoke", action="store_true",
                      help="resnet18 and vit_small_patch16 on 2 images of 32 px: tests the script "
                           "(googlenet's reference: tests/test_benchmarks_smoke.py)")
  parser.add_argument("--json", default="",
                      help="also write the errors here (after each model, so a run cut short "
                           "keeps the models done)")
  args = parser.parse_args(argv)
  if args.smoke:
    args.models, args.image_size, args.batch = "resnet18,vit_small_patch16", 32, 2
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    print(f"needs torch: {e}", file=sys.stderr)
    if args.json:
      Path(args.json).write_text(json.dumps(dict(skipped=f"needs torch: {e}", models=[])) + "\n")
    return 2
  try:
    import torchvision  # pylint: disable=import-outside-toplevel
    reference = f"torchvision {torchvision.__version__}"
  except ImportError:
    reference = "no torchvision: hn_jax.testing.torch_reference's ResNet in its layout"
  print(f"jax {jax.__version__} on {jax.devices()}, torch {torch.__version__}, "
        f"{reference} (reference on cpu, float64)")
  names = [n.strip() for n in args.models.split(",") if n.strip()]
  results = []

  def write(complete: bool) -> None:
    if args.json:
      worst = max((r["rel_err_highest"] for r in results), default=None)
      Path(args.json).write_text(json.dumps(dict(
          jax=jax.__version__, device=str(jax.devices()[0].device_kind), torch=torch.__version__,
          reference=reference, tolerance=args.tolerance, models=results,
          worst=worst, passed=None if worst is None else worst <= args.tolerance,
          complete=complete), indent=1) + "\n")

  with tempfile.TemporaryDirectory() as workdir:
    for name in names:
      results.append(check(name, args.image_size, args.batch, args.weights, workdir))
      write(complete=False)
  write(complete=True)
  worst = max(r["rel_err_highest"] for r in results)
  ok = worst <= args.tolerance
  print(f"{'PASS' if ok else 'FAIL'}: worst highest-precision relative error {worst:.3e} "
        f"(tolerance {args.tolerance:g})")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
