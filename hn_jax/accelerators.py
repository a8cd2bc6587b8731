"""Accelerators a run can be compiled for without one attached: their chips and topologies.

`hn_jax.preflight` compiles a config's programs for a named target through XLA's own
compilers: libtpu for TPU slices (compile-only devices of a named topology) and the CUDA
PJRT plugin for NVIDIA GPUs (from a GPU target description kept in `target_configs/`).
This module names the targets, builds their compile-only devices, and holds the one table of
chip figures the preflight's fit check and roofline use.

Chip figures (per chip; dense, no sparsity), from the vendors' published pages:
  TPU v4, v5e, v5p, v6e: cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e ("System
  architecture": HBM per chip, peak bf16 compute per chip, HBM bandwidth).
  H100 SXM, H200: NVIDIA's H100 and H200 Tensor Core GPU datasheets (BF16 and TF32 Tensor
  Core peaks without sparsity, GPU memory, memory bandwidth).
Usable memory: on TPUs what the compiler allows a program (it refuses more: "exceeds available
HBM"; v5e's 16 GiB leaves 15.75 GiB, and the other TPUs are assumed to keep back the same
0.25 GiB); on GPUs the share JAX takes at start-up
(XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 unless set) of the memory the target describes.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

GIB = 1024**3
_TARGET_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "target_configs")


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip's published figures."""

  kind: str              # v4, v5e, v5p, v6e, h100, h200
  platform: str          # "tpu" or "cuda"
  memory_bytes: int      # HBM per chip
  peak_bf16_flops: float
  peak_f32_flops: float  # float32 matmuls at JAX's default precision (TPU: bf16 passes; GPU: TF32)
  bandwidth: float       # HBM bytes per second
  usable_memory_bytes: int  # what one program may use (see the module docstring)


def _gpu_memory_fraction() -> float:
  try:
    return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
  except ValueError:
    return 0.75


def _chips() -> dict[str, Chip]:
  gpu = _gpu_memory_fraction()
  h100_bytes, h200_bytes = 84942979072, 151397597184  # as the target descriptions say
  return {
      "v4": Chip("v4", "tpu", 32 * GIB, 275e12, 275e12, 1228e9, 32 * GIB - GIB // 4),
      "v5e": Chip("v5e", "tpu", 16 * GIB, 197e12, 197e12, 819e9, 16 * GIB - GIB // 4),
      "v5p": Chip("v5p", "tpu", 95 * GIB, 459e12, 459e12, 2765e9, 95 * GIB - GIB // 4),
      "v6e": Chip("v6e", "tpu", 32 * GIB, 918e12, 918e12, 1640e9, 32 * GIB - GIB // 4),
      "h100": Chip("h100", "cuda", h100_bytes, 989e12, 494e12, 3.35e12, int(h100_bytes * gpu)),
      "h200": Chip("h200", "cuda", h200_bytes, 989e12, 494e12, 4.8e12, int(h200_bytes * gpu)),
  }


_GPU_TARGETS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}
# Cloud accelerator types (what `gcloud compute tpus tpu-vm create --accelerator-type` takes)
# as libtpu topologies. v4 and v5p types count TensorCores (2 per chip), v5e and v6e chips.
_TPU_GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
                 256: "16x16"}
_TPU_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
                 256: "4x8x8", 512: "8x8x8"}
_CLOUD_TPU = re.compile(r"^(v4|v5p|v5e|v5litepod|v6e)-(\d+)$")
_LIBTPU_NAME = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")
_GPU_NAME = re.compile(r"^(h100|h200):(?:(\d+)x)?(\d+)$")
TOPOLOGY_HELP = ("TPU slices as libtpu names them (v4:2x2x1, v5e:4x4, v5p:2x2x4, v6e:2x2) or as "
                 "Cloud TPU types (v4-8, v5litepod-16, v5p-8, v6e-4); NVIDIA hosts as h100:8 "
                 "(one host of 8), h100:2x8 (2 hosts of 8), h200:1")


class TopologyError(ValueError):
  """A target name that is not a known topology; the message says which names work."""


@dataclasses.dataclass(frozen=True)
class Topology:
  """A named target: its chip and how many chips it has."""

  name: str                 # as the user gave it
  chip: Chip
  chips: int
  libtpu_name: str | None = None  # TPUs: e.g. v5e:4x4
  gpus_per_host: int = 0          # GPUs

  @property
  def hosts(self) -> int | None:
    """GPUs: hosts x GPUs per host as named. TPUs: None (libtpu's compile-only devices say)."""
    return self.chips // self.gpus_per_host if self.gpus_per_host else None


def parse_topology(name: str) -> Topology:
  """The target `name` names (see TOPOLOGY_HELP); TopologyError if it names none."""
  chips_table = _chips()
  text = name.strip().lower()
  cloud = _CLOUD_TPU.match(text)
  if cloud:
    kind, count = cloud.group(1).replace("v5litepod", "v5e"), int(cloud.group(2))
    chips = count // 2 if kind in ("v4", "v5p") else count
    grid = (_TPU_GRIDS_3D if kind in ("v4", "v5p") else _TPU_GRIDS_2D).get(chips)
    if grid is None or (kind in ("v4", "v5p") and count % 2):
      raise TopologyError(f"--topology={name}: no {kind} slice of that size is known here; "
                          f"give its libtpu name instead, e.g. {kind}:"
                          f"{'2x2x1' if kind in ('v4', 'v5p') else '2x2'}")
    text = f"{kind}:{grid}"
  tpu = _LIBTPU_NAME.match(text)
  if tpu:
    kind, grid = tpu.group(1), tpu.group(2)
    dims = [int(d) for d in grid.split("x")]
    if (len(dims) == 3) != (kind in ("v4", "v5p")):
      raise TopologyError(f"--topology={name}: {kind} slices are "
                          f"{'3' if kind in ('v4', 'v5p') else '2'}-D, e.g. {kind}:"
                          f"{'2x2x1' if kind in ('v4', 'v5p') else '2x2'}")
    chips = 1
    for d in dims:
      chips *= d
    return Topology(name, chips_table[kind], chips, libtpu_name=text)
  gpu = _GPU_NAME.match(text)
  if gpu:
    hosts, per_host = int(gpu.group(2) or 1), int(gpu.group(3))
    if hosts < 1 or not 1 <= per_host <= 8:
      raise TopologyError(f"--topology={name}: give 1 to 8 GPUs per host, e.g. h100:8 or "
                          "h100:2x8")
    return Topology(name, chips_table[gpu.group(1)], hosts * per_host, gpus_per_host=per_host)
  raise TopologyError(f"--topology={name} is not a known target; use {TOPOLOGY_HELP}")


def prepare_process_for(topology: Topology) -> None:
  """Environment the target's compiler needs, set before it loads (TPU: libtpu's lock file
  guards real chips, and there are none here; its compiler logs go quiet)."""
  if topology.chip.platform == "tpu":
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


def compile_only_devices(topology: Topology) -> list[Any]:
  """The target's devices, for compilation only (no accelerator needed)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  prepare_process_for(topology)
  if topology.chip.platform == "tpu":
    kwargs = {"chip_config_name": "megacore"} if topology.chip.kind == "v4" else {}
    try:
      description = topologies.get_topology_desc(platform="tpu",
                                                 topology_name=topology.libtpu_name, **kwargs)
    except Exception as e:  # pylint: disable=broad-except  (JaxRuntimeError, by message)
      if "TPU support not installed" in str(e) or "libtpu" in str(e).lower() and (
          "not found" in str(e).lower() or "not installed" in str(e).lower()):
        raise TopologyError(f"--topology={topology.name}: libtpu, the TPU compiler, is not "
                            "installed; pip install -e \".[preflight]\"") from None
      if "INVALID_ARGUMENT" not in str(e):
        raise
      message = str(e).split("INVALID_ARGUMENT:", 1)[-1].strip().splitlines()[0]
      raise TopologyError(f"--topology={topology.name}: libtpu refuses {topology.libtpu_name}: "
                          f"{message}; {TOPOLOGY_HELP}") from None
  else:
    from hn_jax import platforms  # pylint: disable=g-import-not-at-top
    with open(os.path.join(_TARGET_CONFIGS, _GPU_TARGETS[topology.chip.kind])) as f:
      target = f.read()

    def describe():
      return topologies.get_topology_desc(
          platform="cuda", topology_name=topology.name,
          topology=f"1x{topology.hosts}x{topology.gpus_per_host}", target_config=target)

    platforms.load_cuda_plugin(started=False)
    try:
      description = describe()
    except NotImplementedError:  # JAX started before the plugin was let in: register it now
      platforms.load_cuda_plugin(started=True)
      try:
        description = describe()
      except NotImplementedError:
        raise TopologyError(f"--topology={topology.name}: JAX's CUDA plugin is not installed; "
                            "pip install -e \".[preflight]\"") from None
  devices = list(description.devices)
  if len(devices) != topology.chips:
    raise TopologyError(f"--topology={topology.name}: the compiler made {len(devices)} devices "
                        f"of {topology.chips} chips")
  return devices
