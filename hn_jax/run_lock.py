"""One run per workdir: a lock that its holder's death releases.

On a local (or NFS) filesystem: an exclusive `flock` on `workdir/run.lock`, which the
operating system drops when the process ends in any way, `kill -9` included; the file names
the holder (host, pid, since when) for the refusal of a second run. On object stores
(`gs://`), which have no locks: a lease object `workdir/run.lease` naming the holder, with
a heartbeat rewritten every `LEASE_SECONDS / 4` by a thread; a second run is refused while
the heartbeat is younger than `LEASE_SECONDS`, and takes the lease over once it is older (its
holder died). Two runs that start within the same second on an object store can both take
the lease: the store offers no atomic create through the file API used here.

Only the process that writes (process 0 of a multi-host run) takes the lock.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time

from etils import epath

from hn_jax import errors
from hn_jax.errors import WorkdirBusy

LOCK_FILE = "run.lock"
LEASE_FILE = "run.lease"
LEASE_SECONDS = 120.0


def _holder() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _busy(workdir: str, holder: dict, how: str, what: str = "run") -> WorkdirBusy:
  who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since "
         f"{holder.get('since', '?')}")
  if what != "run":
    return WorkdirBusy(f"{workdir} is in use by another {what} ({who}; {how}); wait for it to "
                       "end or stop it")
  return WorkdirBusy(f"{workdir} is in use by another run ({who}; {how}); wait for it to end or "
                     "stop it, or give this run another --workdir")


class WorkdirLock:
  """Holds `workdir` for this process (a context manager); raises WorkdirBusy if another
  live process holds it. `lease=True` forces the object-store lease (tests)."""

  def __init__(self, workdir: str | os.PathLike, *, lease: bool | None = None,
               lease_seconds: float = LEASE_SECONDS, lock_file: str = LOCK_FILE,
               what: str = "run"):
    self.workdir = epath.Path(workdir)
    self.lock_file = lock_file
    self.what = what
    self.lease = "://" in os.fspath(workdir) if lease is None else lease
    self.lease_seconds = lease_seconds
    self._fd: int | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def __enter__(self) -> WorkdirLock:
    try:
      self.workdir.mkdir(parents=True, exist_ok=True)
      if self.lease:
        self._take_lease()
      else:
        self._flock()
    except OSError as e:
      raise errors.unwritable(os.fspath(self.workdir), e) from None
    except errors.RunStopped:
      raise
    except Exception as e:  # pylint: disable=broad-except; object stores' client errors
      if not self.lease:
        raise
      first = " ".join(str(e).split("\n")[0].split())[:160]
      raise errors.WorkdirUnusable(
          f"cannot reach {os.fspath(self.workdir)} ({type(e).__name__}: {first}); check the "
          "network and the credentials, or give a local --workdir") from None
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def _flock(self) -> None:
    import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only)
    path = os.fspath(self.workdir / self.lock_file)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
      except ValueError:
        holder = {}
      os.close(fd)
      raise _busy(os.fspath(self.workdir), holder, f"it holds {path}", self.what) from None
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(_holder()).encode(), 0)
    except OSError:
      os.close(fd)
      raise
    self._fd = fd

  def _take_lease(self) -> None:
    path = self.workdir / LEASE_FILE
    if path.exists():
      try:
        held = json.loads(path.read_text())
      except ValueError:
        held = {}
      age = time.time() - float(held.get("heartbeat", 0))
      if age < self.lease_seconds:
        raise _busy(os.fspath(self.workdir), held,
                    f"its lease {path} was renewed {age:.0f} s ago")
    self._mine = dict(_holder(), heartbeat=time.time())
    path.write_text(json.dumps(self._mine))
    self._thread = threading.Thread(target=self._heartbeat, name="hn_jax_lease", daemon=True)
    self._thread.start()

  def _heartbeat(self) -> None:
    path = self.workdir / LEASE_FILE
    while not self._stop.wait(self.lease_seconds / 4):
      self._mine["heartbeat"] = time.time()
      try:
        path.write_text(json.dumps(self._mine))
      except OSError:
        pass  # a missed beat; the next one retries

  def release(self) -> None:
    """Lets the workdir go (also done by the OS, or by the lease's expiry, if we die)."""
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      os.close(self._fd)  # closing drops the flock
      self._fd = None
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
      try:
        (self.workdir / LEASE_FILE).unlink()
      except OSError:
        pass
