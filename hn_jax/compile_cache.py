"""The persistent cache of compiled XLA programs that every hn_jax command shares.

A command started again (a resumed run, a second `embed` of the same model, the seeds of a
`reproduce` study) finds its programs compiled: JAX's persistent compilation cache, kept in
`$XDG_CACHE_HOME/hn_jax/xla` (`~/.cache/hn_jax/xla`), or in the folder `--xla_cache` names.
Every program is kept, however quick it compiled (unless
`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` says otherwise): a command's dozens of small
programs load faster than they compile.

A compiled program is code that the process runs: a cache folder that another user could
write would let them run theirs. So the folder is created private (mode 0700), and one that
is not this user's, or that others may write (the folder or a folder above it, unless that
one has the sticky bit, as /tmp does), is not used: the command says so in one line and
compiles without a cache.

The user's own choice stands: `JAX_COMPILATION_CACHE_DIR` (JAX's variable) is used as it
is, `--xla_cache=off` or `JAX_ENABLE_COMPILATION_CACHE=false` turns the cache off. Nothing
here imports JAX; a process that has not imported it yet gets the folder through the
environment.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

OFF = ("off", "none", "no", "false", "0")
ENV_DIR = "JAX_COMPILATION_CACHE_DIR"
ENV_ENABLE = "JAX_ENABLE_COMPILATION_CACHE"
ENV_MIN_TIME = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def default_dir() -> Path:
  """`$XDG_CACHE_HOME/hn_jax/xla`, `~/.cache/hn_jax/xla` when XDG_CACHE_HOME is unset."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "hn_jax" / "xla"


def problem(folder: str | os.PathLike) -> str | None:
  """Why `folder` is unsafe to run compiled programs from (None: it is safe, or absent).

  Unsafe: the folder belongs to another user or others may write it; a folder above it
  belongs to someone other than this user or root, or others may write it and it lacks the
  sticky bit (so they could replace the cache folder).
  """
  me = os.geteuid()
  path = Path(os.path.abspath(folder))
  try:
    info = path.stat()
  except FileNotFoundError:
    info = None
  if info is not None:
    if not stat.S_ISDIR(info.st_mode):
      return f"{path} is not a folder"
    if info.st_uid != me:
      return f"{path} belongs to another user (uid {info.st_uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
      return (f"others may write {path} (mode {stat.S_IMODE(info.st_mode):04o}); "
              f"`chmod go-w {path}` makes it private")
  for parent in path.parents:
    try:
      info = parent.stat()
    except FileNotFoundError:
      continue
    if info.st_uid not in (me, 0):
      return f"{parent}, a folder above {path}, belongs to another user (uid {info.st_uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
      return (f"others may write {parent}, a folder above {path} "
              f"(mode {stat.S_IMODE(info.st_mode):04o})")
  return None


def prepare(folder: str | os.PathLike) -> str | None:
  """Creates `folder` (and the missing folders above it) with mode 0700 if absent; returns
  why it cannot serve as a cache, or None when it can."""
  path = Path(os.path.abspath(folder))
  found = problem(path)
  if found:
    return found
  missing = [p for p in (path, *path.parents) if not p.exists()]
  try:
    for p in reversed(missing):
      p.mkdir(mode=0o700)
      os.chmod(p, 0o700)  # whatever the umask
  except FileExistsError:
    pass  # another process made it meanwhile: checked below
  except OSError as e:
    return f"cannot create {path}: {e.strerror or e}"
  return problem(path)


def _chosen_elsewhere() -> bool:
  """The user set JAX's cache folder (its variable, or its config in this process)."""
  if os.environ.get(ENV_DIR):
    return True
  jax = sys.modules.get("jax")
  return jax is not None and bool(jax.config.jax_compilation_cache_dir)


def _turned_off() -> bool:
  if os.environ.get(ENV_ENABLE, "").strip().lower() in OFF:
    return True
  jax = sys.modules.get("jax")
  return jax is not None and not jax.config.jax_enable_compilation_cache


def enable(folder: str | os.PathLike | None = None, *, warn=None) -> str | None:
  """Points JAX's persistent cache at `folder` (default: `default_dir()`) unless the user
  chose another folder or turned the cache off; returns the folder in use (None: no cache).

  `folder` may be "off" (no cache). An unsafe folder is not used: `warn` (default: stderr)
  gets one line saying why. Call it before anything compiles.
  """
  if _chosen_elsewhere():
    return os.environ.get(ENV_DIR) or sys.modules["jax"].config.jax_compilation_cache_dir
  if _turned_off() or (isinstance(folder, str) and folder.strip().lower() in OFF):
    return None
  path = Path(os.path.expanduser(os.fspath(folder))) if folder else default_dir()
  found = prepare(path)
  if found:
    message = (f"warning: not caching compiled programs in {path}: {found} (a cache others "
               "can write lets them run code); --xla_cache=DIR names another folder")
    (warn or (lambda line: print(line, file=sys.stderr)))(message)
    return None
  # Every program, however quick to compile: a model's eager initialization alone compiles
  # some 40 programs of ~0.1 s each, which JAX's default (1 s) would compile anew every time.
  settings = {ENV_DIR: str(path)}
  if ENV_MIN_TIME not in os.environ:
    settings[ENV_MIN_TIME] = "0"
  jax = sys.modules.get("jax")
  for name, value in settings.items():
    if jax is None:
      os.environ[name] = value  # read by JAX when it is imported
    else:
      jax.config.update(name.lower(), float(value) if name == ENV_MIN_TIME else value)
  return str(path)
