"""Folders whose files a command runs as code (a cache of compiled XLA programs): whose?

Loading a compiled program from a folder that another user can write lets that user run
code as this one. `problem` says what is wrong with such a folder (None: it is safe: owned by
this user, not writable by the group or others, and the same for its contents' folder chain
up to where it was created); `ensure` creates it private (0700) or raises one line. Nothing
heavy is imported; POSIX permissions only (elsewhere every folder counts as private).
"""

from __future__ import annotations

import os
import stat


class NotPrivate(PermissionError):
  """A folder others could write; the message names it and the fix."""


def problem(path: str | os.PathLike) -> str | None:
  """Why `path` (an existing folder) is not private to this user; None if it is."""
  if not hasattr(os, "getuid"):
    return None
  path = os.fspath(path)
  try:
    info = os.stat(path)
  except OSError as e:
    return f"it cannot be read ({e.strerror or e})"
  if not stat.S_ISDIR(info.st_mode):
    return "it is not a folder"
  if info.st_uid != os.getuid():
    return f"it is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
  if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
    return f"others can write it (mode {stat.S_IMODE(info.st_mode):o})"
  return None


def ensure(path: str | os.PathLike, what: str) -> str:
  """`path` as a private folder: created with mode 0700 if missing; NotPrivate (one line,
  naming `what` and the fix) if it exists and others could write it."""
  path = os.fspath(path)
  if not os.path.exists(path):
    os.makedirs(path, mode=0o700, exist_ok=True)
  reason = problem(path)
  if reason:
    raise NotPrivate(f"{what} {path} is not private: {reason}; programs loaded from it would "
                     f"run as you. Run `chmod go-w {path}` if it is yours, or remove it")
  return path
