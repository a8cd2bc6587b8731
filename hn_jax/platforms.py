"""Which JAX platforms a process uses: only the CPU on a machine with no accelerator attached.

The `[preflight]` extra (and requirements-test.txt) installs libtpu and the CUDA plugin so that `hn_jax.preflight` can compile
for TPUs and NVIDIA GPUs without one. Left to itself, JAX would start each installed plugin
in every process: on a machine with neither a TPU nor a GPU, libtpu prints a page of
warnings and leaves a lock file in /tmp, and the CUDA plugin logs 8 lines at import, even
under JAX_PLATFORMS=cpu (JAX imports every installed plugin at start-up). So, on importing
hn_jax:
- no accelerator visible (no Google TPU on the PCI bus, no NVIDIA or AMD device node) and
  `JAX_PLATFORMS` unset: the process uses the CPU alone;
- no NVIDIA device node: JAX's start-up skips the CUDA plugin (its modules are stood in for
  by empty ones, so jaxlib finds no CUDA kernels and JAX's plugin discovery initializes
  nothing); `load_cuda_plugin` undoes that for the preflight. This works when hn_jax is
  imported before jax, as every hn_jax command does.
Everywhere else JAX chooses, as it always does. The checks read a few files of /sys and
/dev: microseconds.
"""

from __future__ import annotations

import glob
import importlib
import os
import sys
import types

_GOOGLE_PCI_VENDOR = "0x1ae0"
_NVIDIA_DEVICE_NODES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")
_ACCELERATOR_DEVICE_NODES = _NVIDIA_DEVICE_NODES + ("/dev/kfd",)
_CUDA_PLUGINS = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")
_CUDA_KERNELS = ("jax_cuda12_plugin", "jax_cuda13_plugin")
_skipped: set[str] = set()  # the plugin modules stood in for


class _SkippedPlugin(types.ModuleType):
  """Stands in for a JAX plugin module that JAX's start-up is not to load."""

  def initialize(self) -> None:
    pass


def accelerator_visible() -> bool:
  """Whether a TPU (PCI vendor Google) or an NVIDIA/AMD GPU device node is on this machine."""
  if any(os.path.exists(node) for node in _ACCELERATOR_DEVICE_NODES):
    return True
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def use_cpu_without_accelerators() -> None:
  """JAX_PLATFORMS=cpu when the user has not chosen and no accelerator is visible; the CUDA
  plugin left unloaded where no NVIDIA GPU is."""
  if not any(os.path.exists(node) for node in _NVIDIA_DEVICE_NODES):
    for name in _CUDA_PLUGINS + _CUDA_KERNELS:
      if name not in sys.modules:
        sys.modules[name] = _SkippedPlugin(name)
        _skipped.add(name)
  if "JAX_PLATFORMS" in os.environ or accelerator_visible():
    return
  os.environ["JAX_PLATFORMS"] = "cpu"
  jax = sys.modules.get("jax")
  if jax is not None and jax.config.jax_platforms is None:
    jax.config.update("jax_platforms", "cpu")  # jax was imported first: its config is read


def load_cuda_plugin(started: bool) -> None:
  """Lets the CUDA plugin load (the preflight compiles for NVIDIA GPUs with it). `started`:
  JAX's start-up already ran without it, so it is registered here."""
  for name in _CUDA_KERNELS + _CUDA_PLUGINS:
    if isinstance(sys.modules.get(name), _SkippedPlugin):
      del sys.modules[name]
  if started:
    for name in _CUDA_PLUGINS:
      if name in _skipped:
        _skipped.discard(name)
        try:
          importlib.import_module(name).initialize()
        except ImportError:
          pass
