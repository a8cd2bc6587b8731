"""A run's checkpoints: Orbax's CheckpointManager under `workdir/checkpoints`, and the one restore
that training, `hn_jax.tools.embed` and `hn_jax.tools.search` share.

A checkpoint holds the `train_step.TrainState` and the loop's progress (the sums behind the
current epoch's means) as JSON.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from hn_jax import run_config, sharding, train_step

FOLDER = "checkpoints"


class NoCheckpoint(ValueError):
  """The workdir holds no checkpoint; the message names the folder."""


def manager(workdir: str | os.PathLike, *, max_to_keep: int | None = None,
            create: bool = True) -> ocp.CheckpointManager:
  """The CheckpointManager of `workdir`'s checkpoints."""
  return ocp.CheckpointManager(
      run_config.workdir_path(workdir) / FOLDER,
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create))


def save(checkpoints: ocp.CheckpointManager, step: int, state: train_step.TrainState,
         progress: dict[str, Any]) -> None:
  """Saves `state` and `progress` as step `step` (asynchronously), unless it is saved already."""
  if checkpoints.latest_step() != step:
    checkpoints.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   progress=ocp.args.JsonSave(progress)))


def restore(checkpoints: ocp.CheckpointManager, step: int, like: train_step.TrainState
            ) -> tuple[train_step.TrainState, dict[str, Any]]:
  """(state, progress) of checkpoint `step`, placed as `like` is."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  restored = checkpoints.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()))
  return restored.state, restored.progress


def restore_run(workdir: str, mesh: Mesh | None = None
                ) -> tuple[ml_collections.ConfigDict, nnx.GraphDef, train_step.TrainState, Mesh]:
  """(config, graphdef, state, mesh) of the latest checkpoint of the run in `workdir`.

  `state` is replicated on `mesh` (default: every device). Raises NoCheckpoint, or
  run_config.ConfigError for a workdir without a recorded config.
  """
  config = run_config.read(workdir)
  mesh = sharding.create_mesh() if mesh is None else mesh
  graphdef, state, _ = train_step.init_state(config, read_weights=False)
  state = sharding.replicate(state, mesh)
  checkpoints = manager(workdir, create=False)
  try:
    step = checkpoints.latest_step()
    if step is None:
      raise NoCheckpoint(f"no checkpoint in {run_config.workdir_path(workdir) / FOLDER}")
    state, _ = restore(checkpoints, step, state)
  finally:
    checkpoints.close()
  return config, graphdef, state, mesh
