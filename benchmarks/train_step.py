"""Train-step speed: the jitted hn_jax step against the same step in PyTorch (issue 8).

The GPU figures (one H100; JAX rows, then every PyTorch row, in one run):

    python benchmarks/train_step.py --json=/tmp/train_step.json

Smoke test on a CPU (tiny models, 32 px, batch 16, 2 timed steps; not a performance figure):

    JAX_PLATFORMS=cpu python benchmarks/train_step.py --smoke --json=/tmp/train_step_smoke.json

What is measured, per (framework, mode, dtype, batch):
  jax    The project's own step, `hn_jax.train_step.make_train_step` (ResNet50 in Flax NNX,
         sct loss mining over the global batch, SGD in `optax.apply_if_finite`, the non-finite
         guards, donated state), jitted over `sharding.create_mesh()` (every local device: one
         on a one-GPU host). bfloat16 is `config.half_precision=True` (bfloat16 compute,
         float32 parameters, loss and optimizer), as in training.
  torch  The same step in PyTorch: torchvision's `resnet50(weights=None)` with `fc` replaced by
         Linear(2048, 512) (with --smoke, or when torchvision is missing, the same layout
         written in this file), the release's sct loss written here in vectorized torch
         (docs/protocol.md section 1; `hn_jax.testing.torch_reference`, tested equal to `hn_jax.losses`), plain
         `torch.optim.SGD`. bfloat16 is `torch.autocast(dtype=torch.bfloat16)` around the model
         (the loss is computed in float32, as in hn_jax). Channels-last memory format for model
         and images (`--torch_channels_last`), `cudnn.benchmark=True`. Modes: `eager`, and
         `compile` = `torch.compile` of model + loss (forward and backward) and of
         `optimizer.step`, the strongest PyTorch a user would normally pick.
Inputs are random images (N(0, 1), float32, already on the device; labels: 2 images per
class) created once. Each configuration: the first call is timed alone ("compile s": XLA
compilation, or torch.compile / cuDNN autotuning, plus one step), then `--warmup` untimed
steps, then `--steps` steps each timed to completion (`jax.block_until_ready`,
`torch.cuda.synchronize`): "step ms" is their median and "images/s" = batch / median.
The JSON also has the mean of a back-to-back window of `--steps` steps synchronised only at
its end ("pipelined_images_per_s"). torch.compile keeps compiled kernels in an on-disk cache
(inductor's, under the temp directory), so a repeated run reports a shorter "compile s"; the
first run on a fresh machine is the cold figure.

Each framework runs in its own subprocess (JAX preallocates GPU memory, PyTorch caches it;
neither must starve the other). An out-of-memory configuration is reported as "OOM" in its
row and the run goes on; another failure is reported as "error: ..."; if a worker process
dies, its configuration is marked and a fresh worker runs the rest. Every row, the versions
and the device names are written to `--json`.

Backbones (issue 23): `--jax_model` / `--torch_model` also take googlenet, vit_small_patch16
and vit_base_patch16 (`--torch_model` defaults to `--jax_model`). The torch side: torchvision's
`googlenet(weights=None, aux_logits=False, transform_input=False)` with `fc` =
Linear(1024, embedding_dim) (the release's GBN; dropout 0.2 before it, as in hn_jax) and timm's
`create_model("vit_*_patch16_224", num_classes=embedding_dim, img_size=image_size)` (head =
Linear(width, embedding_dim) on the normed class token), or, when that library is missing (or
`--torch_impl=script`), the same layouts from `hn_jax.testing.torch_reference`
(`build_torch_googlenet`, `build_torch_vit`). Each torch row's `model_impl` says which. For
tests and CPU rehearsals, googlenet_mini and vit_mini are hn_jax's tiny variants, on the torch
side the reference builders with the same layout. The loss and step are the ResNets'.
Compare a ViT at --image_size=224 (its position embeddings are built for that size).

Targets (issue 8, one H100, ResNet50 at 256 px, embedding 512, sct): JAX at least 1.5x eager
PyTorch's images/s and 1.2x compiled PyTorch's at the same precision and batch, and at least
5,500 images/s at batch 512 in bfloat16. Reference H100 figures (images/s, batch 128 / 512):
eager PyTorch float32 1,364 / 1,480, bfloat16 channels-last 2,713 / 3,135; compiled PyTorch
bfloat16 channels-last 3,648 / 3,783, float32 1,665 / -; an untuned Flax ResNet50 step
float32 2,280 / -, bfloat16 3,938 / 4,590.

Budget on the GPU: four JAX compilations (about a minute each at most) and four
torch.compile compilations (typically one to a few minutes each for ResNet50 training); to
fit a short device session pick configurations with `--configs` (in the order given, e.g.
`--configs=jax:jit:bfloat16:128,jax:jit:float32:128,jax:jit:bfloat16:512`), or split with
`--frameworks`, `--torch_modes`, and different `--json` files. benchmarks/device_check.sh
runs the ones of its eight-minute call. Stopped by SIGTERM (`timeout`), the driver ends
its worker and still prints and writes the configurations finished (the others: "stopped").

Peak device memory per row: JAX `jax.local_devices()[0].memory_stats()["peak_bytes_in_use"]`,
the worker process's high-water mark so far (run the configurations smallest first and each
row's peak is its own); torch `torch.cuda.max_memory_allocated()`, reset per configuration.

Ideas that matter on the GPU (notes; nothing here is switched on unless stated):
  * bfloat16 compute (`config.half_precision`) is the big one: tensor cores at full rate, half
    the activation memory traffic. The targets at bfloat16 assume it.
  * float32 rows run each framework's default precision for 32-bit convolutions and matmuls.
    On Ampere and later, cuDNN convolutions in PyTorch use TF32 by default
    (`torch.backends.cudnn.allow_tf32`), matmuls do not (`torch.backends.cuda.matmul.allow_tf32`);
    JAX's is set by `jax_default_matmul_precision` (unset = the backend default;
    `--jax_matmul_precision=tensorfloat32|float32|bfloat16` sets it). The JSON records both.
  * Buffer donation: the hn_jax step already donates its state (`donate_argnums=0`), so
    parameters and optimizer state are updated in place.
  * `XLA_PYTHON_CLIENT_MEM_FRACTION`: JAX preallocates 75% of GPU memory by default; this
    script's JAX worker sets 0.9 unless the variable is already set, so that batch 512 in
    float32 has room.
  * `--xla_gpu_enable_latency_hiding_scheduler=true` (an XLA GPU flag that JAX's GPU
    performance notes list) overlaps collectives with compute: it matters for several GPUs
    only, not for this one-GPU figure.
  * Input layout: hn_jax feeds NHWC, which is what cuDNN's fast bfloat16 kernels want; that is
    why PyTorch is run channels-last here too.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import importlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # hn_jax from this checkout (the device machine installs none)

from hn_jax.testing.torch_reference import (  # noqa: E402
    build_torch_googlenet, build_torch_resnet, build_torch_vit, triplet_loss_torch)

FRAMEWORKS = ("jax", "torch")
DTYPES = ("float32", "bfloat16")
TORCH_MODES = ("eager", "compile")
# Modules that must not be needed (the GPU machine has none of them).
FORBIDDEN_MODULES = ("tensorflow", "tensorflow_datasets", "clu")

SMOKE = dict(batch_sizes="16", image_size=32, steps=2, warmup=1, jax_model="small")

RESNETS = ("small", "resnet18", "resnet50")
# patch, width, depth, heads: hn_jax.models.VIT_SPECS (not imported: the torch worker has no JAX).
VIT_SPECS = {"vit_small_patch16": (16, 384, 12, 6), "vit_base_patch16": (16, 768, 12, 12),
             "vit_mini": (8, 32, 2, 2)}
TIMM_NAMES = {"vit_small_patch16": "vit_small_patch16_224",
              "vit_base_patch16": "vit_base_patch16_224"}
MODELS = RESNETS + ("googlenet", "vit_small_patch16", "vit_base_patch16", "googlenet_mini",
                    "vit_mini")
TORCH_IMPLS = ("auto", "library", "torchvision", "timm", "script")

TARGET_VS_EAGER = 1.5
TARGET_VS_COMPILE = 1.2
TARGET_IMAGES_PER_S = 5500.0  # bfloat16, batch 512, one H100.


# ---------------------------------------------------------------------------------------------
# Flags.


def _csv(choices: tuple[str, ...] | None = None):
  def parse(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if choices is not None:
      bad = [s for s in items if s not in choices]
      if bad:
        raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
    return items
  return parse


def _configs(text: str) -> list[dict]:
  """FRAMEWORK:MODE:DTYPE:BATCH,... -> plan entries, in the order given."""
  out = []
  for item in _csv()(text):
    parts = item.split(":")
    if len(parts) != 4:
      raise argparse.ArgumentTypeError(f"{item!r}: want FRAMEWORK:MODE:DTYPE:BATCH")
    framework, mode, dtype, batch = parts
    modes = ("jit",) if framework == "jax" else TORCH_MODES
    if framework not in FRAMEWORKS or mode not in modes or dtype not in DTYPES:
      raise argparse.ArgumentTypeError(f"{item!r}: framework one of {FRAMEWORKS}, mode one of "
                                       f"{modes}, dtype one of {DTYPES}")
    try:
      size = int(batch)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{item!r}: the batch is not a number") from None
    out.append(dict(framework=framework, mode=mode, dtype=dtype, batch=size))
  return out


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true",
                 help=f"CPU smoke-test preset: {SMOKE} (explicit flags still win)")
  p.add_argument("--batch_sizes", default="128,512", help="comma-separated global batch sizes")
  p.add_argument("--image_size", type=int, default=256)
  p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
  p.add_argument("--warmup", type=int, default=5, help="untimed steps after the first call")
  p.add_argument("--frameworks", type=_csv(FRAMEWORKS), default="jax,torch")
  p.add_argument("--dtypes", type=_csv(DTYPES), default="float32,bfloat16")
  p.add_argument("--torch_modes", type=_csv(TORCH_MODES), default="eager,compile")
  p.add_argument("--configs", type=_configs, default=[],
                 help="instead of every framework x mode x dtype x batch: these, run in this "
                      "order, as FRAMEWORK:MODE:DTYPE:BATCH (JAX's mode is jit), e.g. "
                      "jax:jit:bfloat16:128,torch:compile:bfloat16:128")
  p.add_argument("--json", default="", help="write every row, versions and devices here")
  p.add_argument("--embedding_dim", type=int, default=512)
  p.add_argument("--loss", default="sct", choices=("hn", "shn", "sct"))
  p.add_argument("--learning_rate", type=float, default=0.03)
  p.add_argument("--jax_model", default="resnet50", choices=MODELS)
  p.add_argument("--torch_model", default="", choices=("",) + MODELS,
                 help="default: the same as --jax_model")
  p.add_argument("--torch_impl", default="auto", choices=TORCH_IMPLS,
                 help="auto: the model's library (torchvision: ResNets and googlenet; timm: "
                      "ViTs) when installed (never for small, googlenet_mini, vit_mini), else "
                      "the same layout from hn_jax.testing.torch_reference; library (or its "
                      "name): that library or an error; script: the reference always")
  p.add_argument("--torch_channels_last", default="all", choices=("all", "bfloat16", "none"),
                 help="which torch dtypes run channels-last")
  p.add_argument("--torch_compile_mode", default="default",
                 help="torch.compile(mode=...): default, reduce-overhead, max-autotune, ...")
  p.add_argument("--jax_matmul_precision", default="",
                 help="if set, jax_default_matmul_precision (e.g. tensorfloat32, float32)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--check_no_tf", action="store_true",
                 help="block imports of tensorflow / tensorflow_datasets / clu in the workers "
                      "and report that none of them is in sys.modules")
  p.add_argument("--_worker_spec", default="", help=argparse.SUPPRESS)
  return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = build_parser()
  first, _ = parser.parse_known_args(argv)
  if first.smoke:
    parser.set_defaults(**SMOKE)
  args = parser.parse_args(argv)
  for name in ("frameworks", "dtypes", "torch_modes"):  # string defaults are not parsed
    value = getattr(args, name)
    if isinstance(value, str):
      setattr(args, name, _csv()(value))
  args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
  args.torch_model = args.torch_model or args.jax_model
  return args


# ---------------------------------------------------------------------------------------------
# The torch models.


def _library_for(name: str) -> str | None:
  if name in ("resnet18", "resnet50", "googlenet"):
    return "torchvision"
  return "timm" if name in TIMM_NAMES else None


def _torch_googlenet_mini(embedding_dim: int) -> Any:
  """hn_jax's googlenet_mini in torch: the reference at 1/8 width, inception3a and 4a only
  (maxpool3 between them, no maxpool4), `fc` = Linear(64, embedding_dim)."""
  from torch import nn  # pylint: disable=g-import-not-at-top
  model = build_torch_googlenet(embedding_dim, aux_logits=False, width=8)
  w = lambda c: max(1, c // 8)
  in_ch = w(64) + w(128) + w(32) + w(32)  # inception3a's output
  model.inception4a = type(model.inception3a)(in_ch, w(192), w(96), w(208), w(16), w(48), w(64))
  for name in ("inception3b", "inception4b", "inception4c", "inception4d", "inception4e",
               "maxpool4", "inception5a", "inception5b"):
    setattr(model, name, nn.Identity())
  model.fc = nn.Linear(w(192) + w(208) + w(48) + w(64), embedding_dim)
  return model


def build_torch_model(name: str, embedding_dim: int, impl: str = "auto",
                      image_size: int = 224) -> tuple[Any, str]:
  """(model, description): `name` in torch with a Linear(features, embedding_dim) head.

  From torchvision (ResNets, googlenet) or timm (ViTs) when `impl` allows and the library is
  importable, else from hn_jax.testing.torch_reference; the description says which."""
  library = _library_for(name)
  if impl in ("torchvision", "timm") and impl != library:
    raise ValueError(f"--torch_impl={impl}: {name} is not from {impl} "
                     f"(its library: {library or 'none, the reference only'})")
  if impl in ("library", "torchvision", "timm") and library is None:
    raise ValueError(f"--torch_impl={impl}: {name} has no library version; use auto or script")
  if name in RESNETS:
    return build_torch_resnet(name, embedding_dim, "torchvision" if impl == "library" else impl)
  from torch import nn  # pylint: disable=g-import-not-at-top
  if impl != "script" and library is not None:
    try:
      module = importlib.import_module(library)
    except ImportError:
      if impl != "auto":
        raise
    else:
      if name == "googlenet":
        model = module.models.googlenet(weights=None, aux_logits=False, transform_input=False,
                                        init_weights=True)
        model.fc = nn.Linear(model.fc.in_features, embedding_dim)
        return model, (f"torchvision {module.__version__} models.googlenet(weights=None, "
                       f"aux_logits=False, transform_input=False), fc -> Linear(1024, "
                       f"{embedding_dim})")
      model = module.create_model(TIMM_NAMES[name], pretrained=False,
                                  num_classes=embedding_dim, img_size=image_size)
      return model, (f"timm {module.__version__} create_model('{TIMM_NAMES[name]}', "
                     f"num_classes={embedding_dim}, img_size={image_size})")
  where = "(hn_jax.testing.torch_reference"
  if name == "googlenet":
    return (build_torch_googlenet(embedding_dim, aux_logits=False),
            f"googlenet in torchvision's layout {where}.build_torch_googlenet)")
  if name == "googlenet_mini":
    return (_torch_googlenet_mini(embedding_dim),
            f"googlenet_mini (1/8 width, inception3a and 4a) {where}.build_torch_googlenet)")
  patch, width, depth, heads = VIT_SPECS[name]
  return (build_torch_vit(patch=patch, width=width, depth=depth, heads=heads,
                          image_size=image_size, num_classes=embedding_dim),
          f"{name} in timm's layout, {image_size} px {where}.build_torch_vit)")


# ---------------------------------------------------------------------------------------------
# Workers: one process per framework.


def _block_forbidden_imports() -> None:
  """Makes tensorflow, tensorflow_datasets and clu absent, as on the GPU machine.

  A `None` entry in `sys.modules` is Python's own way to say "not importable": `import x`
  raises ImportError and `importlib.util.find_spec(x)` returns None (optional imports in
  libraries then take their no-TensorFlow path).
  """
  for name in FORBIDDEN_MODULES:
    if sys.modules.get(name) is None:
      sys.modules[name] = None  # type: ignore[assignment]


def _forbidden_loaded() -> list[str]:
  return sorted(m for m, mod in list(sys.modules.items())
                if m.split(".")[0] in FORBIDDEN_MODULES and mod is not None)


def _is_oom(exc: BaseException) -> bool:
  text = f"{type(exc).__name__} {exc}".lower()
  return any(s in text for s in ("out of memory", "resource_exhausted", "outofmemory",
                                 "resource exhausted"))


def _timings(first_s: float, times: list[float], window_s: float, steps: int,
             batch: int) -> dict[str, Any]:
  median = statistics.median(times)
  return dict(status="ok", compile_s=first_s, step_ms=1e3 * median,
              step_ms_min=1e3 * min(times), step_ms_mean=1e3 * statistics.fmean(times),
              images_per_s=batch / median, pipelined_images_per_s=batch * steps / window_s)


def _jax_memory() -> dict[str, Any]:
  """Device 0's peak and limit (bytes) so far in this process; nothing on hosts without them.

  The peak is the process's high-water mark: run the configurations smallest first (as
  device_check.sh does) and each row's peak is its own."""
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.local_devices()[0].memory_stats() or {}
  return {k: stats[k] for k in ("peak_bytes_in_use", "bytes_limit") if k in stats}


def _jax_worker(spec: dict, emit) -> None:
  args = spec["args"]
  import jax  # pylint: disable=g-import-not-at-top
  if args["jax_matmul_precision"]:
    jax.config.update("jax_default_matmul_precision", args["jax_matmul_precision"])
  import flax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(REPO))
  from configs import default  # pylint: disable=g-import-not-at-top
  from hn_jax import sharding, train_step  # pylint: disable=g-import-not-at-top

  mesh = sharding.create_mesh()
  devices = jax.devices()
  emit(dict(kind="env", framework="jax", jax=jax.__version__, flax=flax.__version__,
            jaxlib=_dist_version("jaxlib"),
            backend=jax.default_backend(), device_kind=devices[0].device_kind,
            device_count=len(devices), mesh_devices=int(mesh.devices.size),
            jax_default_matmul_precision=jax.config.jax_default_matmul_precision,
            XLA_FLAGS=os.environ.get("XLA_FLAGS", ""),
            XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")))

  for cfg in spec["configs"]:
    row = dict(cfg, model=args["jax_model"], image_size=args["image_size"],
               device=devices[0].device_kind, devices=int(mesh.devices.size),
               model_impl=f"hn_jax.models {args['jax_model']}")
    state = step = images = labels = metrics = None
    try:
      config = default.get_config()
      config.model = args["jax_model"]
      config.embedding_dim = args["embedding_dim"]
      config.half_precision = cfg["dtype"] == "bfloat16"
      config.loss = args["loss"]
      config.batch_size = cfg["batch"]
      config.image_size = args["image_size"]
      config.learning_rate = args["learning_rate"]
      config.seed = args["seed"]
      config.pretrained = ""
      if cfg["batch"] % mesh.devices.size:
        raise ValueError(f"batch {cfg['batch']} is not divisible by {mesh.devices.size} devices")
      model = train_step.init_model(config)
      tx = train_step.create_optimizer(config, steps_per_epoch=1000)
      graphdef, state = train_step.create_train_state(model, tx)
      del model
      state = sharding.replicate(state, mesh)
      step = train_step.make_train_step(graphdef, tx, config, mesh)
      shape = (cfg["batch"], args["image_size"], args["image_size"], 3)
      batch_sharding = sharding.batch_sharding(mesh)
      images = jax.jit(lambda key: jax.random.normal(key, shape, np.float32),
                       out_shardings=batch_sharding)(jax.random.key(args["seed"]))
      labels = jax.device_put(np.arange(cfg["batch"], dtype=np.int32) // 2, batch_sharding)
      jax.block_until_ready((state, images, labels))

      t0 = time.perf_counter()
      state, metrics = step(state, images, labels)
      jax.block_until_ready((state, metrics))
      first_s = time.perf_counter() - t0
      for _ in range(args["warmup"]):
        state, metrics = step(state, images, labels)
      jax.block_until_ready((state, metrics))
      times = []
      for _ in range(args["steps"]):
        t0 = time.perf_counter()
        state, metrics = step(state, images, labels)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      for _ in range(args["steps"]):
        state, metrics = step(state, images, labels)
      jax.block_until_ready((state, metrics))
      window_s = time.perf_counter() - t0
      row.update(_timings(first_s, times, window_s, args["steps"], cfg["batch"]))
      row["final_loss"] = float(metrics["loss"])
    except Exception as exc:  # pylint: disable=broad-except
      row.update(status="OOM" if _is_oom(exc) else "error",
                 error=f"{type(exc).__name__}: {str(exc)[:2000]}")
    row.update(_jax_memory())
    del state, step, images, labels, metrics
    gc.collect()
    emit(dict(kind="row", **row))


def _torch_worker(spec: dict, emit) -> None:
  args = spec["args"]
  import torch  # pylint: disable=g-import-not-at-top

  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  device_name = torch.cuda.get_device_name(0) if cuda else f"cpu ({_cpu_model()})"
  torch.backends.cudnn.benchmark = True
  _, impl = build_torch_model(args["torch_model"], args["embedding_dim"], args["torch_impl"],
                             args["image_size"])
  emit(dict(kind="env", framework="torch", torch=torch.__version__,
            torchvision=_dist_version("torchvision"), cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version() if cuda else None, device=device_name,
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_benchmark=True, num_threads=torch.get_num_threads(), model_impl=impl))

  for cfg in spec["configs"]:
    row = dict(cfg, model=args["torch_model"], image_size=args["image_size"], device=device_name,
               devices=1, model_impl=impl)
    if cuda:
      torch.cuda.synchronize()
      torch.cuda.empty_cache()
      torch.cuda.reset_peak_memory_stats()
    try:
      torch.manual_seed(args["seed"])
      bf16 = cfg["dtype"] == "bfloat16"
      channels_last = args["torch_channels_last"] == "all" or (
          args["torch_channels_last"] == "bfloat16" and bf16)
      row["memory_format"] = "channels_last" if channels_last else "contiguous"
      model, _ = build_torch_model(args["torch_model"], args["embedding_dim"],
                                   args["torch_impl"], args["image_size"])
      model = model.to(device)
      images = torch.randn(cfg["batch"], 3, args["image_size"], args["image_size"], device=device)
      if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
      labels = torch.arange(cfg["batch"], device=device) // 2
      model.train()
      opt = torch.optim.SGD(model.parameters(), lr=args["learning_rate"], momentum=0.0)

      def forward_loss(x, y, model=model, bf16=bf16):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
          embeddings = model(x)
        return triplet_loss_torch(embeddings.float(), y, method=args["loss"])

      def opt_step(opt=opt):
        opt.step()

      if cfg["mode"] == "compile":
        forward_loss = torch.compile(forward_loss, mode=args["torch_compile_mode"])
        opt_step = torch.compile(opt_step, mode=args["torch_compile_mode"])

      def step(forward_loss=forward_loss, opt_step=opt_step, opt=opt, x=images, y=labels):
        opt.zero_grad(set_to_none=True)
        loss = forward_loss(x, y)
        loss.backward()
        opt_step()
        return loss

      def sync():
        if cuda:
          torch.cuda.synchronize()

      sync()
      t0 = time.perf_counter()
      loss = step()
      sync()
      first_s = time.perf_counter() - t0
      for _ in range(args["warmup"]):
        loss = step()
      sync()
      times = []
      for _ in range(args["steps"]):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      for _ in range(args["steps"]):
        loss = step()
      sync()
      window_s = time.perf_counter() - t0
      row.update(_timings(first_s, times, window_s, args["steps"], cfg["batch"]))
      row["final_loss"] = float(loss.detach())
    except Exception as exc:  # pylint: disable=broad-except
      row.update(status="OOM" if _is_oom(exc) else "error",
                 error=f"{type(exc).__name__}: {str(exc)[:2000]}")
    if cuda:  # this configuration's own peak (reset above)
      row.update(max_memory_allocated=torch.cuda.max_memory_allocated(),
                 max_memory_reserved=torch.cuda.max_memory_reserved())
    model = opt = images = labels = step = None  # free this configuration's memory
    gc.collect()
    if cuda:
      torch.cuda.empty_cache()
    if cfg["mode"] == "compile":
      torch._dynamo.reset()  # pylint: disable=protected-access
    emit(dict(kind="row", **row))


def worker_main(spec_path: str) -> int:
  spec = json.loads(Path(spec_path).read_text())
  if spec["args"]["check_no_tf"]:
    _block_forbidden_imports()
  out = open(spec["out"], "a", encoding="utf-8")  # pylint: disable=consider-using-with

  def emit(record: dict) -> None:
    out.write(json.dumps(record) + "\n")
    out.flush()
    if record["kind"] == "row":
      status = record["status"]
      detail = (f"{record['step_ms']:.1f} ms, {record['images_per_s']:.1f} images/s, first call "
                f"{record['compile_s']:.1f} s" if status == "ok" else record.get("error", ""))
      print(f"[{record['framework']} {record['mode']} {record['dtype']} batch {record['batch']}]"
            f" {status}: {detail}", flush=True)

  {"jax": _jax_worker, "torch": _torch_worker}[spec["framework"]](spec, emit)
  if spec["args"]["check_no_tf"]:
    loaded = _forbidden_loaded()
    emit(dict(kind="check_no_tf", framework=spec["framework"], loaded=loaded))
    print(f"check_no_tf ({spec['framework']} worker): tensorflow, tensorflow_datasets and clu "
          f"made unimportable; loaded anyway: {loaded}", flush=True)
  out.close()
  return 0


# ---------------------------------------------------------------------------------------------
# The driver: plan, run the workers, table, JSON.


def _dist_version(name: str) -> str | None:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


def _cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def plan(args: argparse.Namespace) -> dict[str, list[dict]]:
  """Configurations by framework, frameworks in the order they run."""
  configs: dict[str, list[dict]] = {}
  if args.configs:
    for cfg in args.configs:
      configs.setdefault(cfg["framework"], []).append(dict(cfg))
    return configs
  for framework in args.frameworks:
    modes = ["jit"] if framework == "jax" else list(args.torch_modes)
    configs[framework] = [dict(framework=framework, mode=mode, dtype=dtype, batch=batch)
                          for dtype in args.dtypes for batch in args.batch_sizes
                          for mode in modes]
  return configs


def _key(row: dict) -> tuple:
  return row["framework"], row["mode"], row["dtype"], row["batch"]


class Stopped(Exception):
  """The driver got SIGTERM (e.g. from `timeout`): it stops and writes what it has."""


def _on_sigterm(signum, frame) -> None:
  del frame
  # `timeout` signals the driver and then its whole process group: the second is ignored, so
  # that it cannot cut short the writing of the results.
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  raise Stopped(signal.Signals(signum).name)


def _harvest(out: Path, records: list[dict], rows: list[dict]) -> set[tuple]:
  """Adds a worker's records and rows to the lists; returns the keys of its rows."""
  done = set()
  if not out.exists():
    return done
  for line in out.read_text().splitlines():
    try:
      record = json.loads(line)
    except ValueError:  # the last line of a worker killed while writing it
      continue
    if record["kind"] == "row":
      rows.append(record)
      done.add(_key(record))
    else:
      records.append(record)
  return done


def run_framework(framework: str, configs: list[dict], args: argparse.Namespace,
                  workdir: Path, records: list[dict] | None = None,
                  rows: list[dict] | None = None) -> tuple[list[dict], list[dict]]:
  """Runs `configs` in worker processes; a crashed worker's configuration is marked, and a
  fresh worker takes the rest. Returns (env and check records, rows), also appended to the
  lists given; when the driver is stopped (`Stopped`), they hold the rows finished so far."""
  remaining = list(configs)
  rows = [] if rows is None else rows
  records = [] if records is None else records
  attempt = 0
  while remaining:
    attempt += 1
    out = workdir / f"{framework}-{attempt}.jsonl"
    spec_path = workdir / f"{framework}-{attempt}.json"
    spec_path.write_text(json.dumps(dict(framework=framework, configs=remaining, out=str(out),
                                         args=vars(args))))
    env = dict(os.environ)
    if framework == "jax":
      env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--_worker_spec={spec_path}"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
    tail: collections.deque[str] = collections.deque(maxlen=40)
    try:
      for line in proc.stderr:
        sys.stderr.write(line)
        tail.append(line)
      rc = proc.wait()
    finally:
      if proc.poll() is None:  # stopped: the worker goes too
        proc.terminate()
        try:
          proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
          proc.kill()
          proc.wait()
      done = _harvest(out, records, rows)
    remaining = [c for c in remaining if _key(c) not in done]
    if remaining:  # the worker died (or stopped early) at its first unfinished configuration
      crashed = remaining.pop(0)
      text = "".join(tail)
      status = "OOM" if any(s in text.lower() for s in ("out of memory", "resource_exhausted")) \
          else "error"
      rows.append(dict(crashed, status=status, kind="row",
                       error=f"worker exited with code {rc}: {text[-1500:]}"))
  return records, rows


def ratios(rows: list[dict]) -> list[dict]:
  by_key = {_key(r): r for r in rows}
  out = []
  for r in rows:
    if r["framework"] != "jax":
      continue
    entry = dict(dtype=r["dtype"], batch=r["batch"])
    for mode in TORCH_MODES:
      t = by_key.get(("torch", mode, r["dtype"], r["batch"]))
      if t is None:
        continue
      ok = r.get("status") == "ok" and t.get("status") == "ok"
      entry[f"jax_over_torch_{mode}"] = r["images_per_s"] / t["images_per_s"] if ok else None
    out.append(entry)
  return out


def targets(rows: list[dict], ratio_rows: list[dict]) -> list[dict]:
  """The issue's targets (meaningful only for ResNet50 at 256 px on one H100)."""
  out = []
  for e in ratio_rows:
    for mode, goal in (("eager", TARGET_VS_EAGER), ("compile", TARGET_VS_COMPILE)):
      value = e.get(f"jax_over_torch_{mode}")
      if f"jax_over_torch_{mode}" in e:
        out.append(dict(target=f"jax/torch-{mode} images/s >= {goal}", dtype=e["dtype"],
                        batch=e["batch"], value=value,
                        passed=None if value is None else value >= goal))
  for r in rows:
    if r["framework"] == "jax" and r["dtype"] == "bfloat16" and r["batch"] == 512:
      value = r.get("images_per_s")
      out.append(dict(target=f"jax images/s >= {TARGET_IMAGES_PER_S:.0f}", dtype="bfloat16",
                      batch=512, value=value,
                      passed=None if value is None else value >= TARGET_IMAGES_PER_S))
  return out


def format_table(rows: list[dict], ratio_rows: list[dict]) -> str:
  by_ratio = {(e["dtype"], e["batch"]): e for e in ratio_rows}
  header = ("framework", "mode", "dtype", "batch", "step ms", "images/s", "compile s",
            "JAX/eager", "JAX/compiled", "peak GiB")
  lines = [header]

  def fmt(x, spec):
    return "-" if x is None else format(x, spec)

  order = {"jax": 0, "torch": 1}
  mode_order = {"jit": 0, "eager": 1, "compile": 2}
  for r in sorted(rows, key=lambda r: (r["dtype"] != "float32", r["batch"], order[r["framework"]],
                                       mode_order[r["mode"]])):
    if r.get("status") == "ok":
      cells = (fmt(r["step_ms"], ".1f"), fmt(r["images_per_s"], ".1f"), fmt(r["compile_s"], ".1f"))
    else:
      cells = (r.get("status", "error"), "-", "-")
    e = by_ratio.get((r["dtype"], r["batch"]), {}) if r["framework"] == "jax" else {}
    peak = r.get("peak_bytes_in_use", r.get("max_memory_allocated"))
    lines.append((r["framework"], r["mode"], r["dtype"], str(r["batch"])) + cells
                 + (fmt(e.get("jax_over_torch_eager"), ".2f"),
                    fmt(e.get("jax_over_torch_compile"), ".2f"),
                    fmt(None if peak is None else peak / 2**30, ".1f")))
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  text = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
  text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args._worker_spec:  # pylint: disable=protected-access
    return worker_main(args._worker_spec)  # pylint: disable=protected-access

  started = datetime.datetime.now(datetime.timezone.utc)
  print(f"train-step benchmark: batches {args.batch_sizes}, {args.image_size} px, "
        f"models jax={args.jax_model} torch={args.torch_model}, embedding {args.embedding_dim}, "
        f"loss {args.loss}, {args.warmup} warm-up + {args.steps} timed steps"
        + (" (--smoke: a smoke test, not a performance figure)" if args.smoke else ""), flush=True)
  records, rows = [], []
  stopped = ""
  signal.signal(signal.SIGTERM, _on_sigterm)
  with tempfile.TemporaryDirectory(prefix="hn_train_step_") as tmp:
    try:
      for framework, configs in plan(args).items():
        run_framework(framework, configs, args, Path(tmp), records, rows)
    except Stopped as e:
      stopped = str(e)
      done = {_key(r) for r in rows}
      rows += [dict(c, kind="row", status="stopped", error=f"{stopped}: not run or not finished")
               for configs in plan(args).values() for c in configs if _key(c) not in done]
      print(f"stopped by {stopped}: writing the configurations finished so far", flush=True)
  envs = {r["framework"]: {k: v for k, v in r.items() if k not in ("kind", "framework")}
          for r in records if r["kind"] == "env"}
  checks = [r for r in records if r["kind"] == "check_no_tf"]
  ratio_rows = ratios(rows)
  on_target = not args.smoke and args.jax_model == args.torch_model == "resnet50"
  target_rows = targets(rows, ratio_rows) if on_target else []

  print()
  if "jax" in envs:
    e = envs["jax"]
    print(f"jax {e['jax']} (jaxlib {e['jaxlib']}), flax {e['flax']}; {e['backend']} "
          f"x{e['mesh_devices']}: {e['device_kind']}; "
          f"jax_default_matmul_precision={e['jax_default_matmul_precision']}")
  if "torch" in envs:
    e = envs["torch"]
    print(f"torch {e['torch']} (torchvision {e['torchvision']}, CUDA {e['cuda']}, cuDNN "
          f"{e['cudnn']}); device: {e['device']}; model: {e['model_impl']}; "
          f"cudnn.allow_tf32={e['cudnn_allow_tf32']}, matmul.allow_tf32={e['matmul_allow_tf32']}")
  print(format_table(rows, ratio_rows))
  for t in target_rows:
    verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["passed"]]
    value = "-" if t["value"] is None else f"{t['value']:.2f}"
    print(f"target {t['target']} ({t['dtype']}, batch {t['batch']}): {value} {verdict}")
  if target_rows:
    print("(the targets are for one H100 at ResNet50 / 256 px)")
  if args.check_no_tf:
    bad = sorted({m for c in checks for m in c["loaded"]})
    print(f"check_no_tf: \"tensorflow\" in sys.modules: {'tensorflow' in bad} (forbidden "
          f"modules loaded in any worker: {bad}; {len(checks)} worker(s) checked)")

  result = dict(
      date=started.isoformat(timespec="seconds"), argv=sys.argv, args=vars(args),
      host=dict(hostname=platform.node(), nproc=os.cpu_count(), cpu=_cpu_model(),
                python=platform.python_version()),
      env=envs, rows=rows, ratios=ratio_rows, targets=target_rows, check_no_tf=checks,
      stopped=stopped, note="smoke test (--smoke), not a performance figure" if args.smoke else "")
  if args.json:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
  if stopped:
    return 128 + signal.SIGTERM
  if args.check_no_tf and any(c["loaded"] for c in checks):
    return 3
  return 0


if __name__ == "__main__":
  sys.exit(main())
