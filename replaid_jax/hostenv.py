"""Transparent huge pages for the buffers XLA:CPU allocates on every step.

XLA:CPU allocates an executable's temporaries and outputs afresh on every call and frees them after
(about 180 MB per train step at the demo's shape). glibc serves allocations above its mmap threshold
(32 MiB at most) with new mappings and unmaps them on free, so every step writes into about 45,000
fresh 4 KiB pages, each a page fault. Measured on a 2-core CPU VM: filling 180 MB of fresh 4 KiB pages
takes about 100 ms, the same with transparent huge pages 16 ms, and memory already mapped 7 ms; with
huge pages the demo's step takes about 900 page faults instead of 45,000 (docs/performance.md).

glibc 2.35 and newer advise huge pages on its own mappings when its tunable `glibc.malloc.hugetlb=1`
is set, but tunables are read once, when a process starts. So the launchers call
`reexec_with_huge_pages()` first, before JAX is imported: where it helps (Linux, glibc >= 2.35,
transparent huge pages in `madvise` mode, the tunable not yet set) it re-executes the same command, in
the same process (same PID), with the tunable added to GLIBC_TUNABLES. Nothing else changes: the
numbers computed are the same. `REPLAID_HUGE_PAGES=0` in the environment turns it off; setting
GLIBC_TUNABLES yourself (with or without the tunable) is respected.

This module imports nothing heavy, so calling it first costs a few milliseconds.
"""

import os
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "REPLAID_HUGE_PAGES"  # "0": run as started
_MARKER = "REPLAID_HUGE_PAGES_REEXEC"  # set in the re-executed process: never re-execute twice
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)  # the first release with glibc.malloc.hugetlb


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the running C library if it is glibc, else None."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (AttributeError, ValueError, OSError):  # not glibc, or no confstr
    return None


def thp_mode() -> str | None:
  """The kernel's transparent-huge-page mode ("always", "madvise" or "never"), None where unknown."""
  try:
    with open(_THP_ENABLED, encoding="ascii") as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def environment_with_huge_pages(environ: Mapping[str, str], *, platform: str, glibc: tuple[int, int] | None,
                                thp: str | None) -> dict[str, str] | None:
  """The environment to re-execute with, or None where re-executing would not help or was declined.

  Huge pages need the kernel's `madvise` mode (in `always` every mapping gets them already, in
  `never` none can) and a glibc that knows the tunable; an explicit GLIBC_TUNABLES entry for it, the
  opt-out variable and an earlier re-execution (the marker) all leave the environment as it is.
  """
  tunables = environ.get("GLIBC_TUNABLES", "")
  if (not platform.startswith("linux") or glibc is None or glibc < _MIN_GLIBC or thp != "madvise"
      or environ.get(OPT_OUT) == "0" or _MARKER in environ
      or any(t.split("=")[0] == "glibc.malloc.hugetlb" for t in tunables.split(":"))):
    return None
  new = dict(environ)
  new["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
  new[_MARKER] = "1"
  return new


def reexec_with_huge_pages() -> None:
  """Re-executes this command with glibc's huge-page tunable where that helps; returns where it does not."""
  environ = environment_with_huge_pages(os.environ, platform=sys.platform, glibc=glibc_version(), thp=thp_mode())
  if environ is None or not sys.executable:
    return
  for stream in (sys.stdout, sys.stderr):
    if stream is not None:  # None where the interpreter runs without them
      stream.flush()
  try:  # sys.orig_argv keeps the interpreter's own options (-m, -X, -u) as they were given
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
  except OSError:
    return  # could not re-execute: run as started
