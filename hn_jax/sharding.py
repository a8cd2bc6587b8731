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


def process_rows(num_rows: int) -> np.ndarray:
  """This process's contiguous share of `num_rows` rows of host-side work (indices)."""
  return np.array_split(np.arange(num_rows), jax.process_count())[jax.process_index()]


def gather_process_rows(local: np.ndarray, num_rows: int) -> np.ndarray:
  """Every process's `process_rows` share of a host result, in order, on every process."""
  count = jax.process_count()
  if count == 1:
    return np.asarray(local)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  sizes = [len(part) for part in np.array_split(np.arange(num_rows), count)]
  local = np.asarray(local)
  padded = np.zeros((max(sizes),) + local.shape[1:], local.dtype)
  padded[:len(local)] = local
  stacked = np.asarray(multihost_utils.process_allgather(padded))  # (processes, max size, ...)
  return np.concatenate([stacked[p, :size] for p, size in enumerate(sizes)])
