"""The errors that stop a command with one line: the message names the problem and the fix.

They live here, with nothing heavy imported, so that a command can name them before it
imports JAX or TensorFlow.
"""

from __future__ import annotations


class RunStopped(RuntimeError):
  """A run cannot go on; what was saved before stays usable. The message says why and what
  to do."""


class TrainingStopped(RunStopped):
  """Training itself went wrong (e.g. the loss stayed non-finite)."""


class DiskFull(RunStopped):
  """A checkpoint or an event file could not be written for lack of space."""


class WorkdirBusy(RunStopped):
  """Another live process holds the workdir."""


class NoGoodCheckpoint(RunStopped):
  """Every checkpoint of a workdir failed its check."""


class Interrupted(RunStopped):
  """Ctrl-C: the run checkpointed (where it could) and stopped; exit status 130."""


class Preempted(Exception):
  """SIGTERM: the run checkpointed and stopped; the same command resumes it (exit status 0,
  so that schedulers requeue rather than fail it)."""


class CheckpointMismatch(RunStopped):
  """A checkpoint that reads but was saved with other settings (not damage: nothing moves)."""


class OutOfMemory(RunStopped):
  """The host or the device ran out of memory; the message names the setting to lower."""


class WorkdirUnusable(RunStopped):
  """The workdir cannot be created or written (read-only, a file, a name too long, ...)."""


_OOM_MARKS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM when allocating",
              "Failed to allocate")


def is_out_of_memory(error: BaseException | None) -> bool:
  """Whether `error` (or what caused it) is the host's MemoryError or XLA's out of memory."""
  while error is not None:
    if isinstance(error, MemoryError):
      return True
    if any(mark in str(error) for mark in _OOM_MARKS):
      return True
    error = error.__cause__ or error.__context__
  return False


def out_of_memory(where: str, lower: str) -> OutOfMemory:
  """The one line for running out of memory in `where`: which setting to lower."""
  return OutOfMemory(f"out of memory {where}; lower {lower}, then run the same command again "
                     "(what was saved is intact)")


def unwritable(folder, error: OSError) -> RunStopped:
  """The one line for a workdir (or data folder) that cannot be written: `error`'s cause."""
  import errno  # pylint: disable=g-import-not-at-top
  reason = error.strerror or " ".join(str(error).split())[:200]
  if "://" in str(folder) and error.errno is None:  # an object store's client error
    return WorkdirUnusable(f"cannot reach {folder} ({reason}); check the network and the "
                           "credentials, or give a local --workdir")
  if error.errno in (errno.ENOSPC, errno.EDQUOT):
    return DiskFull(f"no room to write in {folder} ({reason}); free space there (or use another "
                    "folder), then run the same command again")
  if error.errno == errno.ENAMETOOLONG:
    fix = "use a shorter path"
  elif error.errno in (errno.ENOTDIR, errno.EEXIST):
    fix = "a file stands where a folder should be: move it, or use another path"
  elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    fix = "make it writable, or use a folder you can write"
  else:
    fix = "use another folder"
  return WorkdirUnusable(f"cannot write in {folder} ({reason}); {fix}")
