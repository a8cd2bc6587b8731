"""Converts a torchvision or timm state dict (.pth) to .npz or .safetensors, which hold no
pickle (ResNets and GoogLeNet: torchvision's files; ViTs: timm's and DINO's). The .pth is read
without PyTorch (`hn_jax.torch_files`)::

  python -m hn_jax.tools.convert_weights --input=resnet50-0676ba61.pth --output=resnet50-0676ba61.npz
  python -m hn_jax.tools.convert_weights --input=resnet50-0676ba61.pth \
      --output=resnet50-0676ba61.safetensors --model=resnet50
  python -m hn_jax.tools.convert_weights --input=dino_deitsmall16_pretrain.pth \
      --output=dino_deitsmall16_pretrain.npz --model=vit_small_patch16

Keys are kept verbatim and arrays stay in torch's layout (the transposition to the model's
layout happens at load time, in `hn_jax.pretrained`); floating-point arrays are stored as
float32, integer ones (`num_batches_tracked`) as they are. Any supported format converts to
any writable one (.npz, .safetensors). `--model` additionally checks every key and shape
against `hn_jax.models.create_model(model)` before writing.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Sequence

import numpy as np
from absl import flags

from hn_jax import cli, pretrained

OUTPUT_EXTENSIONS = (".npz", ".safetensors")


def _normalize(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.floating):
      value = value.astype(np.float32, copy=False)
    out[key] = np.asarray(value, order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d)
  return out


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike[str]) -> None:
  """Writes a state dict of numpy arrays to .npz or .safetensors (chosen by extension)."""
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  arrays = _normalize(state_dict)
  if ext == ".npz":
    with open(path, "wb") as f:  # a file object stops numpy from appending ".npz"
      np.savez(f, **arrays)
  elif ext == ".safetensors":
    try:
      from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("writing .safetensors needs the safetensors package "
                        "(pip install safetensors); or write .npz") from e
    save_file(arrays, path)
  else:
    raise ValueError(f"unsupported output {path!r}: the extension must be one of "
                     f"{', '.join(OUTPUT_EXTENSIONS)}")


def convert(input_path: str | os.PathLike[str], output_path: str | os.PathLike[str],
            model: str | None = None) -> dict[str, np.ndarray]:
  """Reads `input_path`, optionally validates it against `model`, writes `output_path`."""
  if os.path.splitext(os.fspath(output_path))[1].lower() not in OUTPUT_EXTENSIONS:
    raise ValueError(f"unsupported output {os.fspath(output_path)!r}: the extension must be "
                     f"one of {', '.join(OUTPUT_EXTENSIONS)}")
  if os.path.abspath(input_path) == os.path.abspath(output_path):
    raise ValueError("--input and --output are the same file")
  state_dict = _normalize(pretrained.read_state_dict(input_path))
  if model is not None:
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from hn_jax.models import create_model  # pylint: disable=import-outside-toplevel
    abstract = nnx.eval_shape(lambda: create_model(model, 1, rngs=nnx.Rngs(0)))
    pretrained.check_torchvision_state_dict(  # raises WeightMismatchError on any mismatch
        state_dict, nnx.state(abstract, nnx.Param), nnx.state(abstract, nnx.BatchStat))
  save_state_dict(state_dict, output_path)
  return state_dict


PROG = "hn_jax.tools.convert_weights"
FLAGS = cli.command_flags()
flags.DEFINE_string("input", None, "torchvision weights: .pth/.pt, .npz or "
                    ".safetensors.", flag_values=FLAGS)
flags.DEFINE_string("output", None, "Output file: .npz or .safetensors.", flag_values=FLAGS)
# The models that have published weights (torchvision's ResNets and GoogLeNet, timm's and
# DINO's ViTs); written out so that importing this command imports no JAX.
PRETRAINED_MODELS = ("resnet18", "resnet50", "googlenet", "vit_small_patch16", "vit_base_patch16")
flags.DEFINE_enum("model", None, list(PRETRAINED_MODELS), "Optionally check every key and "
                  "shape against this architecture.", flag_values=FLAGS)


def _convert(_: list[str]) -> int:
  try:
    state_dict = convert(FLAGS.input, FLAGS.output, FLAGS.model)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 1  # a file that cannot be converted (2: a mistake on the command line)
  n_values = sum(int(v.size) for v in state_dict.values())
  print(f"wrote {len(state_dict)} arrays ({n_values:,} values) to {FLAGS.output}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """The command line (without the program name); returns the exit status."""
  return cli.run(_convert, FLAGS, argv, prog=PROG, doc=__doc__, required=("input", "output"))


if __name__ == "__main__":
  sys.exit(main())
