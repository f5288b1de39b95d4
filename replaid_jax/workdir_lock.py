"""One trainer per workdir: a lock file with the owner's host, PID and start time.

`<workdir>/train.lock` is created exclusively (O_EXCL) by process 0 of a run and
removed when the run ends, however it ends short of SIGKILL. A second trainer on
the same workdir finds it and stops with one line naming the owner. A lock left
by a process that no longer runs on this host (SIGKILL, a crash of the machine)
is stale: it is replaced, with a warning. A lock taken on another host cannot be
checked from here; the message says how to remove it once that run is known to
be gone. The other processes of a multi-process run share the workdir and take
no lock.
"""

import datetime
import json
import os
import socket
from typing import Any

from absl import logging
import jax

from replaid_jax import errors
from replaid_jax import paths

LOCK_NAME = "train.lock"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _read(path: str) -> dict[str, Any] | None:
  try:
    with paths.open_file(path) as f:
      owner = json.load(f)
    return owner if isinstance(owner, dict) else None
  except (OSError, ValueError):
    return None


def _create_exclusive(path: str) -> int | None:
  """A new local file, atomically (FileExistsError if it exists); on a bucket, None after checking that it does
  not exist (buckets have no exclusive create: two trainers starting within the same second could both pass)."""
  if paths.is_uri(path):
    if paths.exists(path):
      raise FileExistsError(path)
    return None
  return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)


class WorkdirLock:
  """Context manager holding <workdir>/train.lock for the duration of a run (process 0 only)."""

  def __init__(self, workdir: str):
    self.path = paths.join(workdir, LOCK_NAME)
    self.held = False

  def acquire(self) -> None:
    if jax.process_index() != 0:
      return
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    for _ in range(2):
      try:
        fd = _create_exclusive(self.path)
      except FileExistsError:
        owner = _read(self.path)
        if owner is None or (owner.get("host") == me["host"] and not _pid_alive(int(owner.get("pid", -1)))):
          logging.warning("removing the stale workdir lock %s (%s)", self.path,
                          "unreadable" if owner is None else f"process {owner.get('pid')} on {owner.get('host')}, "
                          f"started {owner.get('started')}, no longer runs")
          try:
            paths.path(self.path).unlink()
          except FileNotFoundError:
            pass
          continue
        raise errors.ConfigError(
            f"the workdir {os.path.dirname(self.path)} is in use by another trainer (process {owner.get('pid')} on "
            f"host {owner.get('host')}, started {owner.get('started')}); wait for it to end, use another --workdir, "
            f"or, if that run is known to be gone, delete {self.path}.") from None
      if fd is None:
        paths.path(self.path).write_text(json.dumps(me))
      else:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
          json.dump(me, f)
      self.held = True
      return
    raise errors.ConfigError(f"could not take the workdir lock {self.path}; another trainer is starting there.")

  def release(self) -> None:
    if self.held:
      self.held = False
      owner = _read(self.path)
      if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        paths.path(self.path).unlink()

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
