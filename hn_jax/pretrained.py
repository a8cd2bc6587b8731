"""Loads published backbone weights into `hn_jax.models`: torchvision's ResNets and GoogLeNet,
timm's and DINO's ViTs.

The paper fine-tunes an ImageNet-pretrained ResNet50 (torchvision's). `hn_jax.models` mirrors
torchvision's module layout, so a torchvision state dict maps onto the model key by key:

  torchvision key                          hn_jax variable (path in the nnx State)
  conv1.weight (O, I, kH, kW)              conv1.kernel (kH, kW, I, O)         Param
  bn1.weight / bn1.bias                    bn1.scale / bn1.bias                Param
  bn1.running_mean / bn1.running_var       bn1.mean / bn1.var                  BatchStat
  bn1.num_batches_tracked                  (consumed and ignored: Flax's BatchNorm uses a fixed
                                            momentum and keeps no counter; optional, as older
                                            checkpoints predate it)
  layer1.0.conv1.weight ...                layer1[0].conv1.kernel ...
  layer2.0.downsample.0.weight             layer2[0].downsample.conv.kernel
  layer2.0.downsample.1.*                  layer2[0].downsample.bn.*
  fc.weight / fc.bias                      (read, shape-checked, then dropped on purpose: the
                                            classifier is replaced by the embedding head, which
                                            keeps its fresh initialisation)

GoogLeNet (torchvision's `googlenet-1378be20.pth`, IMAGENET1K_V1) follows the same rules with
its own names: `conv1.conv.weight`, `conv1.bn.*`, `inception3a.branch2.1.conv.weight`, ...,
`inception3a.branch4.1.*` (torchvision's branch4 is Sequential(MaxPool2d, BasicConv2d)) ->
`inception3a.branch4.*`. Its `aux1.*` / `aux2.*` keys (the auxiliary classifiers, which the
model does not build) are accepted, ignored and logged in one line; `fc.*` is dropped.

The ViTs read timm's keys (timm's `vit_small_patch16_224.*` / `vit_base_patch16_224.*` files,
and DINO's `dino_deitsmall16_pretrain.pth` / `dino_vitbase16_pretrain.pth`, the same keys
without a head): `cls_token`, `pos_embed`, `patch_embed.proj.weight` (OIHW -> HWIO),
`blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*` (Linear (out, in) -> kernel
(in, out); LayerNorm weight -> scale) and `norm.*`. timm's classifier `head.*` is optional,
shape-checked and dropped. A `pos_embed` of another square grid (e.g. 384 px weights, or a
model built for 256 px) is resized to the model's as timm's `resample_abs_pos_embed` does
(bicubic, antialiased, class token kept), logged in one line.

Every other key must match exactly: a missing, unexpected or misshapen key raises
`WeightMismatchError`, which names every offending key with its expected and actual shape
(in torch's layout). Parameters are stored as float32 whatever the file holds.

Obtaining the weights
---------------------
`--config.pretrained=imagenet` (the paper's configs' default) downloads the published file of
`config.model` once into a cache and reads it from there (`hn_jax.weights_cache`,
docs/weights.md). By hand, once, on any machine with network access: the reference file is
torchvision's IMAGENET1K_V1 ResNet50, `resnet50-0676ba61.pth`
(ResNet18: `resnet18-f37072fd.pth`)::

  python -c "import torch; torch.hub.load_state_dict_from_url(
      'https://download.pytorch.org/models/resnet50-0676ba61.pth', model_dir='.')"

or, with torchvision installed, `torchvision.models.ResNet50_Weights.IMAGENET1K_V1.get_state_dict()`
(it lands in `~/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth`), or any HTTP client
(curl, wget). hn_jax reads the `.pth` itself; a converted copy reads faster and needs no
unpickling at all::

  python -m hn_jax.tools.convert_weights --input=resnet50-0676ba61.pth --output=resnet50-0676ba61.npz

GoogLeNet: `https://download.pytorch.org/models/googlenet-1378be20.pth` the same way (or
`torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1`). ViTs: DINO's backbones from
`https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth`
(`.../dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth`), or timm's `model.safetensors`
from the Hugging Face repositories `timm/vit_small_patch16_224.augreg_in21k_ft_in1k`,
`timm/vit_base_patch16_224.augreg_in21k` (ImageNet-21k), ... (timm's keys, read as they are).

Then point the training config at the file (.pth, .npz or .safetensors)::

  --config.pretrained=/path/to/resnet50-0676ba61.pth

torchvision's and DINO's weights expect torchvision's input normalisation (timm's augreg ViTs
were trained with mean = std = 0.5): RGB in [0, 1], minus mean
(0.485, 0.456, 0.406), divided by std (0.229, 0.224, 0.225) (here in NHWC).

`.pth`/`.pt` files are read without PyTorch and without running any code from them
(`hn_jax.torch_files`: an allowlisting unpickler); `safetensors` is imported only for
`.safetensors` files.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from hn_jax import models, torch_files

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "WeightMismatchError",
    "check_torchvision_state_dict",
    "convert_torchvision_state_dict",
    "expected_torchvision_shapes",
    "load_torchvision_weights",
    "load_weights",
    "read_state_dict",
    "torchvision_key",
]

SUPPORTED_EXTENSIONS = (".pth", ".pt", ".npz", ".safetensors")

# Keys torchvision has and the model deliberately does not use (the ImageNet classifier).
HEAD_KEYS = ("fc.weight", "fc.bias")
# timm's classifier: present in timm's ImageNet files, absent from DINO's; read and dropped.
TIMM_HEAD_KEYS = ("head.weight", "head.bias")
# torchvision's GoogLeNet file holds the two auxiliary classifiers, which are not built.
GOOGLENET_AUX_PREFIXES = ("aux1.", "aux2.")
# nnx subtrees that have no torchvision counterpart and are left untouched (the embedding head;
# GoogLeNet's dropout key and counter).
_SKIPPED_SUBTREES = ("embedding", "dropout")
# Top-level attributes of hn_jax.models' ViT, which follow timm's names.
_TIMM_ROOTS = ("cls_token", "pos_embed", "patch_embed", "blocks", "norm")

_LEAF_NAMES = {
    # (module kind, nnx leaf name) -> torch leaf name
    ("conv", "kernel"): "weight",
    ("bn", "scale"): "weight",
    ("bn", "bias"): "bias",
    ("bn", "mean"): "running_mean",
    ("bn", "var"): "running_var",
}


class WeightsFileError(ValueError):
  """A weights file that cannot be read (truncated, foreign, pickled); names the file."""


class WeightMismatchError(ValueError):
  """The state dict's keys or shapes do not match the model; the message lists every problem."""


Path = tuple[Any, ...]


def _module_kind(path: Path) -> str:
  """'conv' or 'bn' from the attribute that owns the variable (conv1, bn2, downsample.bn...)."""
  owner = str(path[-2]) if len(path) >= 2 else ""
  if owner.startswith("conv"):
    return "conv"
  if owner.startswith("bn"):
    return "bn"
  raise KeyError(f"no torchvision counterpart for variable {'.'.join(map(str, path))!r}")


def _timm_entry(path: Path) -> tuple[str, str]:
  """(timm key, layout kind) of a ViT variable: 'conv' (the patch projection), 'linear'
  (transposed) or 'plain' (as it is)."""
  parts = [str(p) for p in path]
  if len(parts) == 1:  # cls_token, pos_embed
    return parts[0], "plain"
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}.get(parts[-1])
  if leaf is None:
    raise KeyError(f"no timm counterpart for variable {'.'.join(parts)!r}")
  kind = "plain"
  if parts[-1] == "kernel":
    kind = "conv" if parts[0] == "patch_embed" else "linear"
  return ".".join(parts[:-1] + [leaf]), kind


def _entry(path: Path) -> tuple[str, str] | None:
  """(state-dict key, layout kind) of an nnx variable path; None for what the files lack."""
  if path and path[0] in _SKIPPED_SUBTREES:
    return None
  if path and path[0] in _TIMM_ROOTS:
    return _timm_entry(path)
  kind = _module_kind(path)
  parts = [str(p) for p in path[:-1]]
  if len(parts) >= 2 and parts[-2] == "downsample":
    parts[-1] = {"conv": "0", "bn": "1"}[kind]  # torchvision's nn.Sequential indices
  if "branch4" in parts:  # GoogLeNet: Sequential(MaxPool2d, BasicConv2d), the conv at 1
    i = parts.index("branch4")
    parts.insert(i + 1, "1")
  leaf = _LEAF_NAMES.get((kind, str(path[-1])))
  if leaf is None:
    raise KeyError(f"no torchvision counterpart for variable {'.'.join(map(str, path))!r}")
  return ".".join(parts + [leaf]), kind


def torchvision_key(path: Path) -> str | None:
  """The torchvision (ResNet, GoogLeNet) or timm (ViT) state-dict key of an nnx variable path;
  None for the embedding head.

  E.g. ('layer2', 0, 'downsample', 'conv', 'kernel') -> 'layer2.0.downsample.0.weight',
  ('inception3a', 'branch4', 'bn', 'var') -> 'inception3a.branch4.1.bn.running_var',
  ('blocks', 3, 'attn', 'qkv', 'kernel') -> 'blocks.3.attn.qkv.weight'.
  """
  entry = _entry(path)
  return None if entry is None else entry[0]


def _torch_shape(nnx_shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  if kind == "conv":
    h, w, i, o = nnx_shape  # HWIO -> OIHW
    return (o, i, h, w)
  if kind == "linear":
    return tuple(reversed(nnx_shape))  # (in, out) -> (out, in)
  return tuple(nnx_shape)


def _to_nnx_layout(value: np.ndarray, kind: str) -> np.ndarray:
  value = np.asarray(value, dtype=np.float32)
  if kind == "conv":
    value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  elif kind == "linear":
    value = value.T
  return np.asarray(value, order="C")


def _flat(state: nnx.State) -> list[tuple[Path, Any]]:
  return list(nnx.to_flat_state(state))


def _feature_dim(params: nnx.State) -> int | None:
  for path, var in _flat(params):
    if path == ("embedding", "kernel"):
      return int(var.shape[0])
  return None


def _family(params: nnx.State) -> str:
  """'vit' (timm's keys), 'googlenet' or 'resnet' (torchvision's), from the variable paths."""
  roots = {path[0] for path, _ in _flat(params)}
  if "cls_token" in roots:
    return "vit"
  if "inception3a" in roots:
    return "googlenet"
  return "resnet"


def expected_torchvision_shapes(params: nnx.State,
                                batch_stats: nnx.State) -> dict[str, tuple[int, ...]]:
  """The state-dict keys (and torch-layout shapes) the model needs, excluding the optional
  `num_batches_tracked` entries and the dropped classifier (`fc`, timm's `head`)."""
  shapes = {}
  for state in (params, batch_stats):
    for path, var in _flat(state):
      entry = _entry(path)
      if entry is not None:
        shapes[entry[0]] = _torch_shape(tuple(var.shape), entry[1])
  return shapes


def _shape_str(shape: tuple[int, ...]) -> str:
  return str(tuple(int(d) for d in shape))


def _square_grid(tokens: int) -> int | None:
  """g where tokens = 1 + g * g (a class token and a square grid), else None."""
  g = int(round(max(tokens - 1, 0) ** 0.5))
  return g if g >= 1 and g * g == tokens - 1 else None


def _check_head(state_dict: Mapping[str, Any], keys: tuple[str, str], feature_dim: int | None,
                required: bool, what: str) -> list[str]:
  problems = []
  weight_key, bias_key = keys
  present = [k for k in keys if k in state_dict]
  if required or present:
    for key in keys:
      if key not in state_dict:
        problems.append(f"missing key {key!r} ({what}, read and dropped)")
  if len(present) == 2:
    w, b = np.shape(state_dict[weight_key]), np.shape(state_dict[bias_key])
    if len(w) != 2 or (feature_dim is not None and w[1] != feature_dim):
      problems.append(f"key {weight_key!r}: expected shape (num_classes, {feature_dim}), "
                      f"got {_shape_str(w)}")
    elif tuple(b) != (w[0],):
      problems.append(f"key {bias_key!r}: expected shape ({w[0]},), got {_shape_str(b)}")
  return problems


def _check_keys(state_dict: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]],
                optional: Mapping[str, tuple[int, ...]], feature_dim: int | None,
                family: str = "resnet") -> None:
  problems = []
  for key, shape in expected.items():
    if key not in state_dict:
      problems.append(f"missing key {key!r} (expected shape {_shape_str(shape)})")
      continue
    got = tuple(np.shape(state_dict[key]))
    if key == "pos_embed" and family == "vit":
      # Any square grid: it is resized to the model's (timm's resample_abs_pos_embed).
      if len(got) != 3 or got[0] != 1 or got[2] != shape[2] or _square_grid(got[1]) is None:
        problems.append(f"key 'pos_embed': expected shape (1, 1 + g*g, {shape[2]}) (a class "
                        f"token and a square grid of patches), got {_shape_str(got)}")
    elif got != tuple(shape):
      problems.append(f"key {key!r}: expected shape {_shape_str(shape)}, got {_shape_str(got)}")
  # The classifier: only its input width is tied to the backbone; the number of classes is free.
  # torchvision's is required (its state dicts always have it); timm's is optional (DINO's
  # backbone files have none).
  if family == "vit":
    problems += _check_head(state_dict, TIMM_HEAD_KEYS, feature_dim, False, "timm's classifier")
  else:
    problems += _check_head(state_dict, HEAD_KEYS, feature_dim, True, "torchvision's classifier")
  for key, shape in optional.items():
    if key in state_dict and tuple(np.shape(state_dict[key])) != tuple(shape):
      problems.append(f"key {key!r}: expected shape {_shape_str(shape)}, "
                      f"got {_shape_str(np.shape(state_dict[key]))}")
  known = set(expected) | set(optional) | set(HEAD_KEYS if family != "vit" else TIMM_HEAD_KEYS)
  ignored = GOOGLENET_AUX_PREFIXES if family == "googlenet" else ()
  extra = sorted(k for k in state_dict if k not in known and not k.startswith(ignored))
  for key in extra:
    problems.append(f"unexpected key {key!r} (shape {_shape_str(np.shape(state_dict[key]))})")
  if extra and all(k.startswith("module.") for k in extra):
    problems.append("hint: the keys carry a DataParallel 'module.' prefix; strip it first")
  if problems:
    source = "timm" if family == "vit" else "torchvision"
    raise WeightMismatchError(
        f"{source} state dict does not match the model ({len(problems)} problem(s)):\n  "
        + "\n  ".join(problems))


def check_torchvision_state_dict(state_dict: Mapping[str, Any], params: nnx.State,
                                 batch_stats: nnx.State) -> None:
  """Raises `WeightMismatchError` naming every missing, unexpected or misshapen key.

  Only shapes are read, so `params`/`batch_stats` may be abstract (from `nnx.eval_shape`).
  The model's family (ResNet, GoogLeNet: torchvision's keys; ViT: timm's) comes from its
  variables. GoogLeNet's `aux1.*`/`aux2.*` keys are accepted and ignored.
  """
  expected = expected_torchvision_shapes(params, batch_stats)
  bn_prefixes = sorted({k.rsplit(".", 1)[0] for k in expected if k.endswith(".running_mean")})
  optional = {f"{p}.num_batches_tracked": () for p in bn_prefixes}
  _check_keys(state_dict, expected, optional, _feature_dim(params), _family(params))


def convert_torchvision_state_dict(
    state_dict: Mapping[str, Any], params: nnx.State, batch_stats: nnx.State,
) -> tuple[nnx.State, nnx.State]:
  """Pure conversion: new (params, batch_stats) States filled from a torchvision (ResNet,
  GoogLeNet) or timm (ViT) state dict.

  `state_dict` maps the library's keys to arrays (numpy, or anything `np.asarray` accepts) in
  torch's layout. The embedding head's variables are returned unchanged. A ViT's `pos_embed`
  of another grid is resized to the model's as timm does (bicubic, antialiased, class token
  kept). Raises `WeightMismatchError` naming every missing, unexpected or misshapen key.
  """
  check_torchvision_state_dict(state_dict, params, batch_stats)
  family = _family(params)
  aux = sorted(k for k in state_dict if family == "googlenet"
               and k.startswith(GOOGLENET_AUX_PREFIXES))
  if aux:
    logging.info("GoogLeNet weights: ignored the %d keys of the auxiliary classifiers "
                 "(aux1.*, aux2.*), which the model does not build", len(aux))

  def fill(path: Path, var: Any) -> Any:
    entry = _entry(path)
    if entry is None:
      return var  # embedding head (and GoogLeNet's dropout state): keep its initialisation
    key, kind = entry
    value = _to_nnx_layout(state_dict[key], kind)
    if key == "pos_embed" and value.shape != tuple(var.shape):
      old, new = _square_grid(value.shape[1]), _square_grid(var.shape[1])
      logging.info("ViT weights: position embeddings resized from a %dx%d grid to %dx%d "
                   "(bicubic, antialiased, class token kept: timm's resample)", old, old, new,
                   new)
      value = models.resample_pos_embed(value, (new, new))
    return var.copy(jnp.asarray(value, dtype=jnp.float32))

  return nnx.map_state(fill, params), nnx.map_state(fill, batch_stats)


# ---------------------------------------------------------------------------------------------
# Files.


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    state_dict = torch_files.load_state_dict(path)  # no PyTorch, runs nothing from the file
  except torch_files.TorchFileError as e:
    raise WeightsFileError(str(e)) from None
  for key, value in state_dict.items():
    if value.dtype != np.float32 and value.dtype.kind in "fV":  # float16/64, bfloat16 (ml_dtypes)
      state_dict[key] = value.astype(np.float32)
  return state_dict


def _read_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as f:
    return {key: f[key] for key in f.files}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"reading {path!r} needs the safetensors package "
                      "(pip install safetensors), or convert it to .npz") from e
  return dict(load_file(path))


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Reads a torchvision state dict as numpy arrays (torch layout) from .pth/.pt (torch.save's
  zip or legacy layout, read without PyTorch), .npz or .safetensors."""
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in SUPPORTED_EXTENSIONS:
    raise ValueError(f"unsupported weights file {path!r}: the extension must be one of "
                     f"{', '.join(SUPPORTED_EXTENSIONS)}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file not found: {path!r}")
  reader = {".pth": _read_torch, ".pt": _read_torch, ".npz": _read_npz}.get(ext,
                                                                         _read_safetensors)
  try:
    return reader(path)
  except (ImportError, WeightsFileError):
    raise
  except Exception as e:  # pylint: disable=broad-except; each reader fails its own way
    text = " ".join(str(e).split())
    if "pickled" in text:
      text = "it holds pickled objects, which a weights file of this format never does"
    raise WeightsFileError(f"{path}: not a readable {ext} weights file ({type(e).__name__}: "
                           f"{text[:200]}); is it complete? Download or convert it again") from None


def load_torchvision_weights(model: nnx.Module, path: str | os.PathLike[str]) -> None:
  """Fills `model`'s backbone params and batch stats in place from a weights file.

  `model` is a `hn_jax.models` ResNet18 / ResNet50 / GoogLeNet (torchvision's files) or ViT
  (timm's or DINO's), matching the checkpoint's architecture; its embedding head keeps its
  initialisation. See the module docstring for the formats.
  """
  state_dict = read_state_dict(path)
  params, batch_stats = nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat)
  params, batch_stats = convert_torchvision_state_dict(state_dict, params, batch_stats)
  nnx.update(model, params, batch_stats)


load_weights = load_torchvision_weights  # the same for every backbone family
