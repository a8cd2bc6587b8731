"""Where arrays live: one mesh over every device of every host, with a single `data` axis.

Parameters and optimizer state are replicated; batches are split along their first axis.
Each process contributes its own rows of a global batch, and the jitted step sees the
global array, so the loss mines over the whole batch whatever the number of devices.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Split along the first axis over the `data` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble each process's rows into global arrays sharded along `data`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Place a pytree of host or device arrays replicated on the mesh."""
  return jax.device_put(tree, replicated(mesh))


def to_host(x: jax.Array) -> np.ndarray:
  """A global (possibly multi-host) array as one NumPy array on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def local_value(tree: Any) -> Any:
  """A pytree of replicated arrays as NumPy values, read from this process's first copy."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
