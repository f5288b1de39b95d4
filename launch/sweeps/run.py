"""Runs the training commands of a sweep written by launch/sweeps/isoflop.py.

  python launch/sweeps/run.py --sweep=runs/isoflop [--parallel=2] [--only=replaid]

Runs `--parallel` commands at a time from the repository root (with more than
one, each process is pinned to its own share of the CPU cores where the OS
allows it). A run whose workdir/eval/final.json exists is skipped, so an
interrupted sweep resumes where it stopped (each training run also resumes from
its own checkpoints). Each run's output goes to DIR/logs/NAME.log, each outcome
to DIR/status.json. A failed run does not stop the others; the exit status is 1
when any failed.
"""

import json
import os
import subprocess
import sys
import time
from typing import Any, Sequence

from replaid_jax import paths

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def final_path(run: dict[str, Any]) -> str:
  """Where a finished run's final evaluation lies."""
  return os.path.join(run["workdir"], "eval", "final.json")


def core_sets(parallel: int) -> list[set[int]] | None:
  """`parallel` disjoint sets of the cores this process may use, or None when pinning is unavailable or moot."""
  if parallel <= 1 or not hasattr(os, "sched_setaffinity"):
    return None
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) < parallel:
    return None
  per = len(cores) // parallel
  return [set(cores[i * per:(i + 1) * per]) for i in range(parallel)]


def _argv(command: Sequence[str]) -> list[str]:
  """The run's argv, with a leading `python` meaning this interpreter."""
  command = list(command)
  if command and command[0] in ("python", "python3"):
    command[0] = sys.executable
  return command


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Status:
  """DIR/status.json: one entry per run, rewritten after every change."""

  def __init__(self, path: str):
    self.path = path
    self.entries: dict[str, dict[str, Any]] = {}
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        self.entries = json.load(f)

  def set(self, name: str, **entry) -> None:
    self.entries[name] = entry
    paths.write_text_atomic(self.path, json.dumps(self.entries, indent=1))


class _Progress:
  """The runs of a sweep that ended so far and their training FLOPs, for the ETA of the rest."""

  def __init__(self, pending: Sequence[dict[str, Any]]):
    self.total = len(pending)
    self.flops_total = sum(r.get("train_flops", 1.0) for r in pending) or 1.0
    self.flops_done = 0.0
    self.finished = self.failed = 0
    self.t0 = time.time()


# A started run: its process, its entry in sweep.json, its start time and its open log file.
_Active = tuple[subprocess.Popen, dict[str, Any], float, Any]


def run_sweep(sweep_dir: str, parallel: int = 1, only: str = "", poll_s: float = 1.0) -> dict[str, dict[str, Any]]:
  """Runs the pending runs of sweep_dir/sweep.json (names containing `only`) and returns their status."""
  with open(os.path.join(sweep_dir, "sweep.json"), encoding="utf-8") as f:
    runs = [r for r in json.load(f) if only in r["name"]]
  log_dir = os.path.join(sweep_dir, "logs")
  os.makedirs(log_dir, exist_ok=True)
  status = _Status(os.path.join(sweep_dir, "status.json"))
  pending = _pending(runs, status)
  total = len(pending)
  print(f"{len(runs)} runs, {len(runs) - total} already done, {total} to run, {max(parallel, 1)} at a time",
        flush=True)
  _run_all(pending, parallel, log_dir, status, poll_s)
  return {r["name"]: status.entries[r["name"]] for r in runs}


def _pending(runs: Sequence[dict[str, Any]], status: _Status) -> list[dict[str, Any]]:
  """The runs without eval/final.json; those with one are recorded as done."""
  pending = []
  for r in runs:
    if os.path.exists(final_path(r)):
      if status.entries.get(r["name"], {}).get("status") != "done":  # keep a finished run's record (its seconds)
        status.set(r["name"], status="done", note="final.json exists")
    else:
      pending.append(r)
  return pending


def _run_all(pending: Sequence[dict[str, Any]], parallel: int, log_dir: str, status: _Status, poll_s: float) -> None:
  """Runs `pending` in order, `parallel` at a time, until every one has ended.

  On KeyboardInterrupt the running ones are terminated, recorded as
  interrupted, and the interrupt is raised again.
  """
  slots = core_sets(parallel)
  free = list(range(max(parallel, 1)))
  active: dict[int, _Active] = {}
  progress = _Progress(pending)
  queue = list(pending)
  try:
    while queue or active:
      while queue and free:
        r, slot = queue.pop(0), free.pop(0)
        active[slot] = _start(r, None if slots is None else slots[slot], log_dir, status)
      time.sleep(poll_s)
      for slot, (proc, r, start, log) in list(active.items()):
        rc = proc.poll()
        if rc is None:
          continue
        log.close()
        del active[slot]
        free.append(slot)
        _record_end(r, rc, start, log.name, status, progress)
  except KeyboardInterrupt:
    for proc, r, _, log in active.values():
      proc.terminate()
      proc.wait()
      log.close()
      status.set(r["name"], status="interrupted", log=log.name)
    raise


def _start(r: dict[str, Any], cores: set[int] | None, log_dir: str, status: _Status) -> _Active:
  """Starts run `r` from the repository root, its output appended to log_dir/NAME.log, pinned to `cores` if set."""
  log = open(os.path.join(log_dir, r["name"] + ".log"), "a", encoding="utf-8")
  log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(r['command'])}\n")
  log.flush()
  env = dict(os.environ)
  preexec = None
  if cores is not None:
    env.setdefault("OMP_NUM_THREADS", str(len(cores)))
    preexec = lambda cores=cores: os.sched_setaffinity(0, cores)  # pylint: disable=unnecessary-lambda-assignment
  proc = subprocess.Popen(_argv(r["command"]), cwd=_REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                          preexec_fn=preexec)
  started = (proc, r, time.time(), log)
  status.set(r["name"], status="running", pid=proc.pid, log=log.name)
  return started


def _record_end(r: dict[str, Any], rc: int, start: float, log_name: str, status: _Status, progress: _Progress) -> None:
  """Records how run `r` ended (exit status `rc`) in the status file and prints a line with the sweep's ETA."""
  seconds = time.time() - start
  ok = rc == 0 and os.path.exists(final_path(r))
  outcome = "done" if ok else "failed"
  note = "" if ok else (f"exit status {rc}" if rc else "exited without writing eval/final.json")
  status.set(r["name"], status=outcome, returncode=rc, seconds=round(seconds, 1), log=log_name, note=note)
  progress.finished += 1
  progress.failed += not ok
  progress.flops_done += r.get("train_flops", 1.0)
  elapsed = time.time() - progress.t0
  eta = elapsed * (progress.flops_total - progress.flops_done) / progress.flops_done if progress.flops_done else 0.0
  print(f"[{progress.finished}/{progress.total}] {r['name']}: {outcome}{' (' + note + ')' if note else ''} in "
        f"{_duration(seconds)}; elapsed {_duration(elapsed)}, ETA {_duration(eta)}"
        f"{f', {progress.failed} failed' if progress.failed else ''}", flush=True)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("sweep", None, "Sweep directory holding sweep.json.")
  flags.DEFINE_integer("parallel", 1, "Runs at a time.")
  flags.DEFINE_string("only", "", "Run only the runs whose name contains this text.")
  flags.mark_flags_as_required(["sweep"])
  return flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  entries = run_sweep(FLAGS.sweep, FLAGS.parallel, FLAGS.only)
  failed = sorted(n for n, e in entries.items() if e["status"] != "done")
  if failed:
    print(f"{len(failed)} run(s) failed: {', '.join(failed)}; see {os.path.join(FLAGS.sweep, 'logs')} and "
          "status.json. Rerun the same command to retry them.", flush=True)
    sys.exit(1)
  print("all runs done.", flush=True)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  FLAGS = _define_flags()
  app.run(main)
