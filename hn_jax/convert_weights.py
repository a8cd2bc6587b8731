"""Converts a torchvision state dict (.pth) to .npz or .safetensors, readable without PyTorch.

Run once on a machine that has PyTorch, then copy the output to hosts that do not::

  python -m hn_jax.convert_weights --input=resnet50-0676ba61.pth --output=resnet50-0676ba61.npz
  python -m hn_jax.convert_weights --input=resnet50-0676ba61.pth \
      --output=resnet50-0676ba61.safetensors --model=resnet50

Keys are kept verbatim and arrays stay in torch's layout (the transposition to the model's
layout happens at load time, in `hn_jax.pretrained`); floating-point arrays are stored as
float32, integer ones (`num_batches_tracked`) as they are. Any supported format converts to
any writable one (.npz, .safetensors). `--model` additionally checks every key and shape
against `hn_jax.models.create_model(model)` before writing.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Mapping, Sequence

import numpy as np

from hn_jax import pretrained

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


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m hn_jax.convert_weights",
      description="Convert a torchvision ResNet state dict to .npz / .safetensors.")
  parser.add_argument("--input", required=True,
                      help="torchvision weights: .pth/.pt (needs PyTorch), .npz or .safetensors")
  parser.add_argument("--output", required=True, help="output file: .npz or .safetensors")
  parser.add_argument("--model", default=None, choices=("resnet18", "resnet50"),
                      help="optionally check every key and shape against this architecture")
  args = parser.parse_args(argv)
  try:
    state_dict = convert(args.input, args.output, args.model)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  n_values = sum(int(v.size) for v in state_dict.values())
  print(f"wrote {len(state_dict)} arrays ({n_values:,} values) to {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
