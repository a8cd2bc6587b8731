"""Files a command writes on request (`embed --out`, `search --sheet`): never over a run's own.

`check` refuses, in one line, a path inside a run's bookkeeping (its config.json, change
history, lock, event files, anything under `checkpoints/`), whatever `--overwrite` says, and
an existing file unless `--overwrite` is given. `write` writes to a temporary file beside the
target and renames it, so a full disk or a crash leaves the old file (or none), never a
truncated one. Nothing heavy is imported.
"""

from __future__ import annotations

import errno
import os
import uuid
from typing import BinaryIO, Callable

# A run's own files (hn_jax.run_config, run_lock, checkpoints) and folders.
RUN_FILES = ("config.json", "config_history.json", "run.lock", "run.lease")
RUN_FOLDERS = ("checkpoints", "checkpoints_damaged")


class OutputRefused(ValueError):
  """An output path that would overwrite something; one line naming it and the fix."""


def _is_workdir(folder: str) -> bool:
  return any(os.path.exists(os.path.join(folder, name))
             for name in ("config.json", "run.lock", "checkpoints"))


def bookkeeping(path: str) -> str | None:
  """What of a run's bookkeeping `path` is (None: nothing)."""
  path = os.path.abspath(path)
  folder, name = os.path.split(path)
  if _is_workdir(folder) and (name in RUN_FILES or name.startswith("events.out.tfevents")
                              or name in RUN_FOLDERS):
    return f"the file {name} of the run in {folder}"
  parent = folder
  while True:
    head, tail = os.path.split(parent)
    if tail in RUN_FOLDERS and _is_workdir(head):
      return f"inside the {tail}/ folder of the run in {head}"
    if not tail or head == parent:
      return None
    parent = head


def check(path: str, flag: str, *, overwrite: bool) -> None:
  """Raises OutputRefused if writing `path` (given as `flag`) would harm a run, or would
  replace a file without `overwrite`."""
  what = bookkeeping(path)
  if what is not None:
    raise OutputRefused(f"{flag}={path} is {what}, which a command never overwrites; write "
                        "elsewhere")
  if os.path.isdir(path):
    raise OutputRefused(f"{flag}={path} is a folder; give a file name")
  if os.path.lexists(path) and not overwrite:
    raise OutputRefused(f"{flag}={path} exists; give another name, or --overwrite to replace it")


def write(path: str, flag: str, fill: Callable[[BinaryIO], None]) -> None:
  """Calls `fill` on a temporary file beside `path`, then renames it to `path`; a failure
  (a full disk, ...) removes the temporary file and raises OutputRefused in one line."""
  path = os.path.abspath(path)
  tmp = os.path.join(os.path.dirname(path),
                     f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(tmp, "wb") as f:
      fill(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    raise OutputRefused(
        f"{flag}={path}: cannot write it ({e.strerror or e}); "
        + ("free space there or write elsewhere" if full else "write it elsewhere")
        + (f" (nothing was written; {os.path.basename(path)} is unchanged)"
           if os.path.exists(path) else " (nothing was written)")) from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
