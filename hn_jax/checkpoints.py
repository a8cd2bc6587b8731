"""A run's checkpoints: Orbax's CheckpointManager under `workdir/checkpoints`, verified.

A checkpoint holds the `train_step.TrainState` and the loop's progress (the sums behind the
current epoch's means) as JSON, and in that JSON a digest of every array of the state
(sha256 of its dtype, shape and bytes), written in the same atomic save. A restore checks
the arrays against it: Orbax and TensorStore check neither the bytes of an array nor the
files' integrity, so a flipped byte restores silently without it. A checkpoint that fails
its check, or cannot be read, is moved to `workdir/checkpoints_damaged/` (never deleted) and
the newest good one is used. A checkpoint that reads but holds arrays of other shapes than
the config makes is not damaged: it belongs to other settings, and the restore stops with
one line (`CheckpointMismatch`) naming them, moving nothing. Training,
`hn_jax.tools.embed`/`search` and `reproduce` share this restore (readers skip a damaged
checkpoint but leave it in place).

The progress JSON also carries the run's settings (`CONFIG_KEY`), so a workdir whose
config.json was lost or broken still knows its run (`run_config.load` falls back to them).

Saves are asynchronous. A failed save, or too little free space for the next one, stops
the run with one line (`errors.DiskFull`) while the previous checkpoint stays good; a save
that failed in the background stops the run at the next step, and its stuck helper threads
are released so that the process exits.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import threading
import time
import warnings
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from hn_jax import run_config, sharding, train_step
from hn_jax.errors import CheckpointMismatch, DiskFull, NoGoodCheckpoint, RunStopped

FOLDER = run_config.CHECKPOINT_FOLDER
DAMAGED_FOLDER = "checkpoints_damaged"
DIGEST_KEY = "digest"
# The classes the loss was built for (a loss with a parameter per class): what a reader of
# the checkpoint needs to shape its state.
NUM_CLASSES_KEY = "num_classes"
CONFIG_KEY = run_config.CHECKPOINT_CONFIG_KEY
# Room kept free beyond a checkpoint's own size (its metadata, the event files meanwhile).
SPACE_MARGIN = 1 << 20


class NoCheckpoint(ValueError):
  """The workdir holds no checkpoint; the message names the folder."""


def manager(workdir: str | os.PathLike, *, max_to_keep: int | None = None,
            create: bool = True) -> ocp.CheckpointManager:
  """The CheckpointManager of `workdir`'s checkpoints."""
  return ocp.CheckpointManager(
      run_config.workdir_path(workdir) / FOLDER,
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create))


def _host_arrays(state: Any) -> list[tuple[str, np.ndarray]]:
  """(path, this process's copy as NumPy) of every array of a replicated pytree."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if isinstance(leaf, jax.Array):
      if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
      value = np.asarray(leaf.addressable_data(0))
    else:
      value = np.asarray(leaf)
    out.append((jax.tree_util.keystr(path), value))
  return out


def digest(state: Any) -> dict[str, str]:
  """sha256 of each array of `state` (with its dtype and shape), keyed by its pytree path."""
  out = {}
  for path, value in _host_arrays(state):
    h = hashlib.sha256(f"{value.dtype.str}{value.shape}".encode())
    h.update(np.ascontiguousarray(value).tobytes())
    out[path] = h.hexdigest()
  return out


def state_id(state: Any) -> str:
  """One digest of the whole of `state` (of its arrays' `digest`): which checkpoint it is."""
  h = hashlib.sha256()
  for path, value in sorted(digest(state).items()):
    h.update(f"{path}={value};".encode())
  return h.hexdigest()[:32]


def state_bytes(state: Any) -> int:
  """The bytes of the arrays of `state` (what a checkpoint of it writes, uncompressed)."""
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))


def _free_bytes(folder: epath.Path) -> int | None:
  """Free bytes where `folder` lives (None where that is not cheap to know: gs:// etc.)."""
  path = os.fspath(folder)
  if "://" in path:
    return None
  while path and not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path or ".").free


def _mb(n: int) -> str:
  if n >= 10 * 2**20:
    return f"{n / 2**20:.0f} MB"
  return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def _space_problem(folder: epath.Path, needed: int, free: int | None, latest: int | None) -> str:
  good = (f"the checkpoint of step {latest} is intact" if latest is not None
          else "no checkpoint was saved yet")
  have = f"{_mb(free)} free" if free is not None else "the disk is full"
  return (f"no room for a checkpoint in {folder}: it needs about {_mb(needed)}, {have}; {good}. "
          "Free space there (or move the workdir elsewhere), then run the same command to "
          "resume")


def is_out_of_space(error: BaseException) -> bool:
  """Whether `error` (an OSError, or a TensorStore/Orbax error wrapping one) is a full disk."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(error)
    if "No space left" in text or "ENOSPC" in text or "Disk quota exceeded" in text:
      return True
    error = error.__cause__ or error.__context__
  return False


def _first_line(error: BaseException) -> str:
  text = " ".join(str(error).split("\n")[0].split())
  return f"{type(error).__name__}: {text[:300]}"


def finished_steps(folder: epath.Path) -> list[int]:
  """The steps of the finished checkpoints in `folder`, in order (an unfinished save is a
  temporary folder, never a bare number: Orbax renames it when done)."""
  try:
    return sorted(int(p.name) for p in epath.Path(folder).iterdir() if p.name.isdigit())
  except OSError:
    return []


def save_failed(error: BaseException, folder: epath.Path, needed: int,
                latest: int | None) -> RunStopped:
  """The one-line error that stops a run whose checkpoint save raised `error`."""
  if is_out_of_space(error):
    return DiskFull(_space_problem(folder, needed, _free_bytes(folder), latest))
  return RunStopped(f"saving a checkpoint in {folder} failed ({_first_line(error)}); "
                    + (f"the checkpoint of step {latest} is intact. " if latest is not None
                       else "") + "Fix the cause, then run the same command to resume")


def release_stuck_saves() -> int:
  """Lets the helper threads of a failed background save end; how many it released.

  When one part of an Orbax save fails, the threads of its other parts keep waiting (for the
  coordination timeout, half an hour) for a signal that never comes, and, not being daemon
  threads, keep the process from exiting. Each is cancelled and its signals set, so that it
  returns at once. Single process only (several processes signal through JAX's service).
  """
  if jax.process_count() > 1:
    return 0
  try:
    from orbax.checkpoint._src.futures import future, signaling_client  # pylint: disable=g-import-not-at-top
  except ImportError:
    return 0
  # The cancelled threads' coroutines are never awaited; Python would say so at exit.
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                          category=RuntimeWarning)
  released = 0
  client = signaling_client.get_signaling_client()
  for thread in threading.enumerate():
    if not isinstance(thread, getattr(future, "_SignalingThread", ())) or not thread.is_alive():
      continue
    try:
      thread.cancel()
      for signal in getattr(thread, "_receive_signals", ()):
        key = future.AwaitableSignalsContract.get_unique_awaitable_singal_key(
            signal, thread._operation_id)  # pylint: disable=protected-access
        client.key_value_set(key, "cancelled", allow_overwrite=True)
      released += 1
    except Exception as e:  # pylint: disable=broad-except; Orbax internals may change
      logging.debug("could not release %s: %s", thread.name, e)
  for thread in threading.enumerate():
    if isinstance(thread, getattr(future, "_SignalingThread", ())):
      threading.Thread.join(thread, timeout=5)
  return released


class Saver:
  """Saves a run's checkpoints asynchronously and stops the run at the first failed one.

  `check()` (cheap: call it every step) raises the one-line `DiskFull`/`RunStopped` of a save
  that failed in the background; `save` first checks that the checkpoint fits, where free
  space is cheap to know.
  """

  def __init__(self, checkpoints: ocp.CheckpointManager, num_classes: int | None = None,
               config: ml_collections.ConfigDict | None = None):
    self.checkpoints = checkpoints
    self.num_classes = num_classes  # recorded with a state whose loss holds arrays
    self.folder = epath.Path(checkpoints.directory)
    self._needed = 0
    self._config = None if config is None else run_config.as_plain(config)
    self._pending: int | None = None  # the step of the save in flight

  def _failed(self, error: BaseException) -> RunStopped:
    release_stuck_saves()
    steps = finished_steps(self.folder)
    return save_failed(error, self.folder, self._needed, steps[-1] if steps else None)

  def check(self) -> None:
    """Raises the error of a save that failed since the last call.

    Orbax's own check misses a failure that its finalizing thread consumed first (it raises
    an error once), so a save that is no longer in progress but left no checkpoint of its
    step counts as failed too.
    """
    try:
      self.checkpoints.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except; Orbax re-raises the thread's error
      raise self._failed(e) from None
    if (self._pending is None or jax.process_count() > 1
        or self.checkpoints.is_saving_in_progress()):
      return
    step, self._pending = self._pending, None
    if step in finished_steps(self.folder):
      return
    error: BaseException = RuntimeError(f"no checkpoint of step {step} appeared")
    try:
      self.checkpoints.wait_until_finished()  # raises what the finalizing thread kept
    except Exception as e:  # pylint: disable=broad-except
      error = e
    raise self._failed(error) from None

  def save(self, step: int, state: train_step.TrainState, progress: dict[str, Any]) -> None:
    """Saves `state` and `progress` (with the state's digest) as step `step`, unless saved."""
    self.check()
    if self.checkpoints.latest_step() == step:
      return
    self._needed = state_bytes(state) + SPACE_MARGIN
    free = _free_bytes(self.folder)
    if free is not None and free < self._needed:
      self.wait()  # the save in flight, if any, counts as saved
      steps = finished_steps(self.folder)
      raise DiskFull(_space_problem(self.folder, self._needed, free,
                                    steps[-1] if steps else None))
    progress = dict(progress, **{DIGEST_KEY: digest(state)})
    if self.num_classes is not None and (state.loss_params is not None
                                         or state.loss_state is not None):
      progress[NUM_CLASSES_KEY] = self.num_classes
    if self._config is not None:
      progress[CONFIG_KEY] = self._config
    try:
      self.checkpoints.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_item(state)), progress=ocp.args.JsonSave(progress)))
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(e) from None
    self._pending = step

  def wait(self) -> None:
    """Waits for the save in flight; raises its error, if it failed."""
    try:
      self.checkpoints.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._pending = None
      raise self._failed(e) from None
    self.check()


def _item(state: train_step.TrainState) -> dict[str, Any]:
  """What a checkpoint stores of `state`: its array fields by name, those that are None (a
  loss without parameters or memory) left out, as in the checkpoints of before the loss
  had any."""
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
          if f.metadata.get("pytree_node", True) and getattr(state, f.name) is not None}


def restore(checkpoints: ocp.CheckpointManager, step: int, like: train_step.TrainState
            ) -> tuple[train_step.TrainState, dict[str, Any]]:
  """(state, progress) of checkpoint `step`, placed as `like` is (not verified: see
  `restore_newest_good`)."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _item(like))
  restored = checkpoints.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()))
  return like.replace(**restored.state), restored.progress


def verify(state: Any, progress: Any) -> str | None:
  """What is wrong with a restored checkpoint (None: its arrays match their digest)."""
  if not isinstance(progress, dict) or not isinstance(progress.get("sums"), dict):
    return "its progress record is not the one hn_jax writes"
  stored = progress.get(DIGEST_KEY)
  if stored is None:
    return None  # saved before checkpoints carried a digest; the caller says so
  got = digest(state)
  bad = sorted(k for k in set(got) | set(stored) if got.get(k) != stored.get(k))
  if bad:
    return (f"{len(bad)} of {len(stored)} arrays differ from the digest saved with them "
            f"(first: {bad[0]})")
  return None


def _move_aside(checkpoints: ocp.CheckpointManager, step: int) -> epath.Path | None:
  """Moves step `step`'s folder to `<workdir>/checkpoints_damaged/`; where it went."""
  source = epath.Path(checkpoints.directory) / str(step)
  if not source.exists():
    return None
  folder = epath.Path(checkpoints.directory).parent / DAMAGED_FOLDER
  folder.mkdir(parents=True, exist_ok=True)
  target = folder / str(step)
  if target.exists():
    target = folder / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
  source.rename(target)
  return target


# What Orbax says when the arrays asked for are not those stored: other settings, not damage.
_MISMATCH_MARKS = ("is not compatible with the stored shape", "tree structures do not match",
                   "Missing keys", "Unexpected keys", "do not match the structure",
                   "not compatible with the stored")
_SHAPES = re.compile(r"Requested shape: \(([\d, ]*)\) is not compatible with the stored "
                     r"shape: \(([\d, ]*)\)")


def _is_mismatch(error: BaseException) -> bool:
  text = str(error)
  return isinstance(error, (ValueError, KeyError, TypeError)) and any(
      mark in text for mark in _MISMATCH_MARKS)


def _saved_settings(checkpoints: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
  path = epath.Path(checkpoints.directory) / str(step) / "progress" / "metadata"
  try:
    values = json.loads(path.read_text()).get(CONFIG_KEY)
  except (OSError, ValueError, AttributeError):
    return None
  return values if isinstance(values, dict) else None


def _mismatch(checkpoints: ocp.CheckpointManager, step: int, error: BaseException | None,
              config: ml_collections.ConfigDict | None) -> CheckpointMismatch | None:
  """The one line for a checkpoint saved with other settings than `config`; None unless the
  settings it carries, or the shapes Orbax names, show it."""
  saved = _saved_settings(checkpoints, step)
  named = ""
  if saved is not None and config is not None:
    fixed = {k: v for k, v in run_config.differences(saved, config).items()
             if k not in run_config.CHANGEABLE}
    named = "; ".join(f"config.{k}={json.dumps(new)} but the checkpoint's is {json.dumps(old)}"
                      for k, (old, new) in fixed.items())
  if not named and error is not None:
    shapes = _SHAPES.search(str(error))
    if shapes:
      asked, stored = ([d for d in g.replace(" ", "").split(",") if d] for g in shapes.groups())
      if config is not None and asked[-1:] == [str(config.embedding_dim)] != stored[-1:]:
        named = (f"an array of shape {tuple(map(int, stored))} stored, {tuple(map(int, asked))} "
                 f"asked: config.embedding_dim={config.embedding_dim} but the checkpoint's is "
                 f"{stored[-1]}")
      elif asked[-1:] != stored[-1:]:
        named = (f"an array of shape {tuple(map(int, stored))} stored, {tuple(map(int, asked))} "
                 f"asked: probably config.embedding_dim (the checkpoint's: {stored[-1]})")
      else:
        named = (f"an array of shape {tuple(map(int, stored))} stored, {tuple(map(int, asked))} "
                 "asked: config.model or another setting that shapes the model differs")
  if not named and error is not None and "tree structures do not match" in str(error):
    # The metadata read, and names other arrays than the config's model has.
    named = ("its arrays are another model's: config.model or another setting that shapes "
             "the model differs")
  if not named:
    return None  # not shown to be other settings: treated as damage
  return CheckpointMismatch(
      f"the checkpoint of step {step} in {checkpoints.directory} was saved with other settings "
      f"({named}); it is intact and stays where it is: give the run's own settings (drop the "
      "overrides) or use a new --workdir")


def restore_newest_good(checkpoints: ocp.CheckpointManager, like: train_step.TrainState, *,
                        move_aside: bool = True,
                        say: Callable[..., None] = logging.warning,
                        config: ml_collections.ConfigDict | None = None
                        ) -> tuple[int, train_step.TrainState, dict[str, Any]] | None:
  """(step, state, progress) of the newest checkpoint that restores and verifies.

  Each newer one that is damaged (unreadable, or its arrays differ from their digest) is
  reported in one line and, with `move_aside` (training), moved to `checkpoints_damaged/`
  (process 0 moves; every process checks the same files). One that reads but holds arrays
  of other shapes (saved with other settings than `config`) raises CheckpointMismatch and
  moves nothing. None when there is no checkpoint; raises NoGoodCheckpoint when none of them
  is good.
  """
  damaged = []
  for step in sorted(checkpoints.all_steps(), reverse=True):
    try:
      state, progress = restore(checkpoints, step, like)
      problem = verify(state, progress)
    except Exception as e:  # pylint: disable=broad-except; any other failure to read is damage
      mismatch = _mismatch(checkpoints, step, e, config) if _is_mismatch(e) else None
      if mismatch is not None:
        raise mismatch from None
      problem = f"it does not restore ({_first_line(e)})"
    if problem is None:
      if DIGEST_KEY not in progress:
        say("The checkpoint of step %d carries no digest (saved by an older hn_jax): restored "
            "unverified", step)
      if damaged and move_aside:
        checkpoints.reload()
      return step, state, progress
    where = None
    if move_aside:
      if jax.process_index() == 0:
        where = _move_aside(checkpoints, step)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        multihost_utils.sync_global_devices(f"hn_jax_moved_aside_{step}")
    say("The checkpoint of step %d is damaged: %s; %s", step, problem,
        f"moved to {where}, trying the one before" if where else "trying the one before")
    damaged.append(step)
  if damaged:
    if move_aside:
      checkpoints.reload()
    where = epath.Path(checkpoints.directory).parent / DAMAGED_FOLDER
    raise NoGoodCheckpoint(
        f"none of the {len(damaged)} checkpoints in {checkpoints.directory} is good (steps "
        f"{', '.join(map(str, damaged))}" + (f", moved to {where}" if move_aside else "")
        + "); start the run again in a new workdir")
  return None


def restore_run(workdir: str, mesh: Mesh | None = None
                ) -> tuple[ml_collections.ConfigDict, nnx.GraphDef, train_step.TrainState, Mesh]:
  """(config, graphdef, state, mesh) of the newest good checkpoint of the run in `workdir`.

  `state` is replicated on `mesh` (default: every device). Damaged checkpoints are skipped
  (one line each), not moved. Raises NoCheckpoint, NoGoodCheckpoint, or
  run_config.ConfigError for a workdir without a recorded config.
  """
  config = run_config.read(workdir)
  mesh = sharding.create_mesh() if mesh is None else mesh
  checkpoints = manager(workdir, create=False)
  try:
    graphdef, state, _ = train_step.init_state(config, read_weights=False,
                                               num_classes=_num_classes(checkpoints))
    state = sharding.replicate(state, mesh)
    found = restore_newest_good(checkpoints, state, move_aside=False)
  finally:
    checkpoints.close()
  if found is None:
    raise NoCheckpoint(f"no checkpoint in {run_config.workdir_path(workdir) / FOLDER}")
  return config, graphdef, found[1], mesh


def _num_classes(checkpoints: ocp.CheckpointManager) -> int:
  """The classes the newest readable checkpoint's loss was built for (1: no such record)."""
  for step in sorted(checkpoints.all_steps(), reverse=True):
    try:
      progress = checkpoints.restore(step, args=ocp.args.Composite(
          progress=ocp.args.JsonRestore())).progress
    except Exception:  # pylint: disable=broad-except; damage is reported by the restore
      continue
    if isinstance(progress, dict) and isinstance(progress.get(NUM_CLASSES_KEY), int):
      return progress[NUM_CLASSES_KEY]
  return 1
