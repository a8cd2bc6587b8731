"""Which JAX platforms a process uses: only the CPU on a machine with no accelerator attached.

`requirements.txt` installs libtpu and the CUDA plugin so that `hn_jax.preflight` can compile
for TPUs and NVIDIA GPUs without one. Left to itself, JAX would start each installed plugin
in every process: on a machine with neither a TPU nor a GPU, libtpu prints a page of
warnings, leaves a lock file in /tmp, and the CUDA plugin adds its own lines. When no
accelerator is visible (no Google TPU on the PCI bus, no NVIDIA or AMD device node) and the
user has not chosen (`JAX_PLATFORMS` unset), the process uses the CPU alone; the preflight
loads the plugins as compilers only, which this does not touch. Everywhere else JAX chooses,
as it always does. The checks read a few files of /sys and /dev: microseconds.
"""

from __future__ import annotations

import glob
import os
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"
_ACCELERATOR_DEVICE_NODES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


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
  """Sets JAX_PLATFORMS=cpu when the user has not chosen and no accelerator is visible."""
  if "JAX_PLATFORMS" in os.environ or accelerator_visible():
    return
  os.environ["JAX_PLATFORMS"] = "cpu"
  jax = sys.modules.get("jax")
  if jax is not None and jax.config.jax_platforms is None:
    jax.config.update("jax_platforms", "cpu")  # jax was imported first: its config is read
