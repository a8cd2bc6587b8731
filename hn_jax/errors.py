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
