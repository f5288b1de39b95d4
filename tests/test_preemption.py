"""Preemption and crashes of launch/train.py: SIGTERM/SIGINT stop cleanly, SIGKILL never corrupts the latest step."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import npy_cli_args
from replaid_jax import checkpoint as ckpt_lib

pytestmark = pytest.mark.slow  # each test starts, signals and restarts training processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300

# Runs launch/train.py with orbax's commit of one step directory held back: the
# step is fully written into its temporary directory, then the rename waits, so
# a SIGKILL lands between the last byte and the commit.
_SLOW_COMMIT_RUNNER = '''
import asyncio, os, runpy, sys
sys.path.insert(0, os.getcwd())
from orbax.checkpoint._src.path import atomicity
_finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self):
  if self._final_path.name == os.environ["SLOW_COMMIT_STEP"] and self._final_path.parent.name == "checkpoints":
    with open(os.environ["SLOW_COMMIT_MARKER"], "w") as f:
      f.write(str(self.get()))
    await asyncio.sleep(3600)
  await _finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.fixture(scope="module")
def npy_args(tmp_path_factory):
  return npy_cli_args(tmp_path_factory.mktemp("npy"))


def _start(workdir, args, *, runner=None, env=None):
  os.makedirs(workdir, exist_ok=True)
  cmd = [sys.executable, *([runner] if runner else []), os.path.join(REPO, "launch", "train.py"),
         "--config=" + os.path.join(REPO, "configs", "tiny.py"), f"--workdir={workdir}", *args]
  log = os.path.join(workdir, f"log_{time.time_ns()}.txt")
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})})
  return proc, log


def _wait(proc, log) -> str:
  try:
    proc.wait(timeout=TIMEOUT_S)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return open(log).read()


def _logged_steps(workdir) -> list[int]:
  path = os.path.join(workdir, "train", "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [r["step"] for r in map(json.loads, f) if "train/loss" in r]


def _wait_for_step(workdir, step, proc):
  deadline = time.time() + TIMEOUT_S
  while max(_logged_steps(workdir), default=0) < step:
    assert proc.poll() is None, f"the run ended (status {proc.returncode}) before step {step} was logged"
    assert time.time() < deadline, f"step {step} not logged in {TIMEOUT_S}s"
    time.sleep(0.05)


def _assert_restorable(workdir, step):
  state = ckpt_lib.read_arrays(str(workdir), step)
  assert int(state["step"]) == step
  assert all(np.isfinite(x).all() for x in __import__("jax").tree.leaves(state["params"]))
  ckpt_lib.read_arrays(str(workdir), step, "ema_params")
  assert os.path.exists(os.path.join(workdir, "checkpoints", str(step), "data_iter", "process_0-of-1.json"))


def _temporary_dirs(workdir) -> list[str]:
  return sorted(n for n in os.listdir(os.path.join(workdir, "checkpoints")) if ".orbax-checkpoint-tmp" in n)


def test_sigterm_and_sigint_save_at_the_next_step_exit_0_and_resume(npy_args, tmp_path):
  workdir = tmp_path / "run"
  args = [*npy_args, "--config.train.num_steps=80", "--config.checkpoint.every_steps=1000"]
  proc, log = _start(workdir, args)
  _wait_for_step(workdir, 3, proc)
  proc.send_signal(signal.SIGTERM)
  text = _wait(proc, log)
  assert proc.returncode == 0, text[-3000:]
  first = int(re.search(r"preempted at step (\d+) \(SIGTERM\); checkpoint saved; rerun to resume", text).group(1))
  assert 3 < first < 80
  assert ckpt_lib.Checkpointer(str(workdir), read_only=True).all_steps() == [first]
  _assert_restorable(workdir, first)
  assert max(_logged_steps(workdir)) == first and not (workdir / "eval" / "final.json").exists()

  proc, log = _start(workdir, args)  # the same command resumes; Ctrl-C (SIGINT) stops it the same way
  _wait_for_step(workdir, first + 2, proc)
  proc.send_signal(signal.SIGINT)
  text = _wait(proc, log)
  assert proc.returncode == 0, text[-3000:]
  assert f"at step {first}" in text and "resumed from" in text
  second = int(re.search(r"preempted at step (\d+) \(SIGINT\)", text).group(1))
  assert first + 2 < second < 80 and "Traceback" not in text

  proc, log = _start(workdir, args)
  text = _wait(proc, log)
  assert proc.returncode == 0, text[-3000:]
  assert f"at step {second}" in text and "preempted" not in text
  assert ckpt_lib.Checkpointer(str(workdir), read_only=True).latest_step() == 80
  assert sorted(set(_logged_steps(workdir))) == list(range(1, 81))
  print(f"SIGTERM stopped at step {first}, SIGINT at step {second}; the third run finished step 80")


def test_sigkill_during_a_save_leaves_the_previous_step_latest_and_restorable(npy_args, tmp_path):
  workdir = tmp_path / "killed"
  runner = tmp_path / "slow_commit.py"
  runner.write_text(_SLOW_COMMIT_RUNNER)
  marker = tmp_path / "commit_reached"
  args = [*npy_args, "--config.train.num_steps=6", "--config.checkpoint.every_steps=1",
          "--config.checkpoint.keep=10"]
  proc, log = _start(workdir, args, runner=str(runner),
                     env={"SLOW_COMMIT_STEP": "3", "SLOW_COMMIT_MARKER": str(marker)})
  deadline = time.time() + TIMEOUT_S
  while not marker.exists():
    assert proc.poll() is None and time.time() < deadline, open(log).read()[-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)  # step 3 is written but not yet renamed
  proc.wait()
  tmp = _temporary_dirs(workdir)
  assert len(tmp) == 1 and tmp[0].startswith("3.orbax-checkpoint-tmp"), tmp
  items = set(os.listdir(workdir / "checkpoints" / tmp[0]))
  assert {"state", "ema_params", "metadata", "data_iter"} <= items  # everything but the commit
  ck = ckpt_lib.Checkpointer(str(workdir), read_only=True)
  assert ck.all_steps() == [1, 2] and ck.latest_step() == 2
  ck.close()
  _assert_restorable(workdir, 2)

  proc, log = _start(workdir, args)  # the rerun resumes from step 2 and removes the leftover
  text = _wait(proc, log)
  assert proc.returncode == 0, text[-3000:]
  assert "at step 2" in text and "resumed from" in text
  assert _temporary_dirs(workdir) == []
  assert ckpt_lib.Checkpointer(str(workdir), read_only=True).all_steps() == [1, 2, 3, 4, 5, 6]
  _assert_restorable(workdir, 6)


def test_sigkill_at_random_moments_of_frequent_async_saves(npy_args, tmp_path):
  workdir = tmp_path / "random"
  args = [*npy_args, "--config.train.num_steps=400", "--config.checkpoint.every_steps=1",
          "--config.checkpoint.keep=2"]
  rng = random.Random(0)
  hits = []
  for _ in range(2):
    proc, log = _start(workdir, args)
    start = max(_logged_steps(workdir), default=0)
    _wait_for_step(workdir, start + 2, proc)
    time.sleep(rng.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    tmp = _temporary_dirs(workdir)
    hits.append(bool(tmp))
    ck = ckpt_lib.Checkpointer(str(workdir), read_only=True)
    steps, latest = ck.all_steps(), ck.latest_step()
    ck.close()
    assert latest is not None and latest >= start + 1 and not any(".orbax" in str(s) for s in steps)
    _assert_restorable(workdir, latest)
  print(f"kills that left an uncommitted step directory behind: {sum(hits)} of {len(hits)}")
