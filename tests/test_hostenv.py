"""The launchers' re-execution with glibc's huge-page tunable (replaid_jax/hostenv.py)."""

import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest

from replaid_jax import hostenv

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LINUX = dict(platform="linux", glibc=(2, 36), thp="madvise")


def test_the_tunable_is_added_only_where_it_helps_and_was_not_declined():
  new = hostenv.environment_with_huge_pages({"PATH": "/bin"}, **_LINUX)
  assert new["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and new["PATH"] == "/bin"
  # Other tunables are kept, in front.
  kept = hostenv.environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **_LINUX)
  assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  # Where it cannot help, or the user decided, or it already ran: nothing to do.
  assert hostenv.environment_with_huge_pages({}, platform="darwin", glibc=None, thp=None) is None
  assert hostenv.environment_with_huge_pages({}, platform="linux", glibc=None, thp="madvise") is None  # musl
  assert hostenv.environment_with_huge_pages({}, platform="linux", glibc=(2, 34), thp="madvise") is None
  assert hostenv.environment_with_huge_pages({}, platform="linux", glibc=(2, 36), thp="always") is None
  assert hostenv.environment_with_huge_pages({}, platform="linux", glibc=(2, 36), thp="never") is None
  assert hostenv.environment_with_huge_pages({}, platform="linux", glibc=(2, 36), thp=None) is None
  assert hostenv.environment_with_huge_pages({"REPLAID_HUGE_PAGES": "0"}, **_LINUX) is None
  assert hostenv.environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, **_LINUX) is None
  assert hostenv.environment_with_huge_pages(new, **_LINUX) is None  # the re-executed process stops there
  assert hostenv.environment_with_huge_pages({"REPLAID_HUGE_PAGES": "1"}, **_LINUX) is not None


def test_the_host_readings_parse():
  version = hostenv.glibc_version()
  assert version is None or (len(version) == 2 and version >= (2, 0))
  assert hostenv.thp_mode() in (None, "always", "madvise", "never")


_PROBE = textwrap.dedent("""
  import ctypes, json, os, resource, sys
  print("start", os.getpid(), file=sys.stderr, flush=True)
  from replaid_jax import hostenv
  hostenv.reexec_with_huge_pages()
  libc = ctypes.CDLL(None)
  libc.malloc.restype = ctypes.c_void_p
  size = 64 << 20
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(ctypes.c_size_t(size))
  ctypes.memset(p, 1, size)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  print(json.dumps(dict(pid=os.getpid(), argv=sys.argv[1:], dev_mode=sys.flags.dev_mode, faults=faults,
                        tunables=os.environ.get("GLIBC_TUNABLES"))))
""")


def _probe(tmp_path, **env_changes):
  script = tmp_path / "probe.py"
  script.write_text(_PROBE)
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "REPLAID_HUGE_PAGES_REEXEC")}
  env.update(env_changes)
  out = subprocess.run([sys.executable, "-X", "dev", str(script), "--flag=1", "two words"], env=env, check=True,
                       capture_output=True, text=True, timeout=60)
  starts = [line.split()[1] for line in out.stderr.splitlines() if line.startswith("start ")]
  return json.loads(out.stdout.strip().splitlines()[-1]), starts


@pytest.mark.skipif(hostenv.thp_mode() != "madvise" or (hostenv.glibc_version() or (0, 0)) < (2, 35),
                    reason="re-executes only with glibc >= 2.35 and transparent huge pages in madvise mode")
def test_a_launcher_reexecutes_itself_once_keeps_its_command_and_gets_huge_pages(tmp_path):
  on, starts = _probe(tmp_path)
  assert on["tunables"] == hostenv.TUNABLE
  assert starts == [str(on["pid"])] * 2  # ran twice, as one process: the second time did not re-execute
  assert on["argv"] == ["--flag=1", "two words"] and on["dev_mode"]  # arguments and interpreter options kept
  off, starts = _probe(tmp_path, REPLAID_HUGE_PAGES="0")
  assert off["tunables"] is None and len(starts) == 1
  # What it is for: 64 MiB written in fresh memory is 16,384 faults of 4 KiB pages; with huge pages a few dozen.
  assert off["faults"] >= 8_000, off
  assert on["faults"] * 8 < off["faults"], (on, off)


def test_every_launcher_reexecutes_before_it_imports_jax():
  launchers = [f for f in glob.glob(os.path.join(_REPO, "launch", "**", "*.py"), recursive=True)
               if "cli.run(" in open(f, encoding="utf-8").read()]
  assert len(launchers) >= 10
  for path in launchers:
    text = open(path, encoding="utf-8").read()
    call = text.find("hostenv.reexec_with_huge_pages()")
    assert call >= 0, f"{path} does not call hostenv.reexec_with_huge_pages()"
    for heavy in ("import jax", "from replaid_jax import cli", "import numpy"):
      at = text.find(heavy)
      assert at < 0 or call < at, f"{path}: '{heavy}' comes before the re-execution"
