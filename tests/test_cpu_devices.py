"""Splitting a CPU host into devices (mesh.cpu_devices, replaid_jax/distributed.py): the choice and real runs."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from replaid_jax import chips
from replaid_jax import distributed
from replaid_jax import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MESH = (-1, 1, 1)


@pytest.mark.parametrize("rows, cores, expected", [
    ((32, 64), 2, 2),  # the demo on 2 cores
    ((32, 64), 1, 1),
    ((32, 64), 6, 4),  # 6 and 5 do not divide 32
    ((8, 16), 16, 8),  # no more than the batch's divisors allow
    ((64, 64), 64, distributed.MAX_AUTO_CPU_DEVICES),
    ((30, 45), 4, 3),  # a count that divides every batch
    ((7,), 4, 1),
    ((12, 0), 4, 4),  # a zero (nothing of that kind) constrains nothing
])
def test_auto_takes_the_most_cores_that_divide_every_batch(rows, cores, expected):
  n = distributed.cpu_devices_for(0, rows, DEFAULT_MESH, cores=cores)
  assert n == expected
  assert all(r % n == 0 for r in rows) and n <= cores


def test_an_explicit_count_is_taken_as_given_and_other_meshes_are_left_alone():
  assert distributed.cpu_devices_for(3, (32,), DEFAULT_MESH, cores=2) == 3
  assert distributed.cpu_devices_for(1, (32,), DEFAULT_MESH, cores=8) == 1
  # A mesh that names its own sizes decides for itself: auto leaves the backend as it is.
  for shape in ((1, 1, 1), (2, -1, 1), (-1, 1, 2), (4, 1, 1)):
    assert distributed.cpu_devices_for(0, (32,), shape, cores=8) is None
  assert distributed.cpu_devices_for(0, (32,), (1, -1, 1), cores=8) == 8
  with pytest.raises(errors.ConfigError, match="mesh.cpu_devices=-1"):
    distributed.cpu_devices_for(-1, (32,), DEFAULT_MESH)


def test_a_training_config_splits_over_its_micro_batch_and_eval_batch():
  from configs import demo  # pylint: disable=g-import-not-at-top
  cd = demo.get_config()
  cd.train.batch_size, cd.train.grad_accum_steps, cd.eval.batch_size = 24, 4, 64
  # micro-batch 6 and eval batch 64: only 1 and 2 divide both.
  assert distributed.cpu_devices_of(cd) == min(2, distributed.usable_cores())
  assert distributed.cpu_devices_of(cd, mesh_shape=(1, 1, 1)) is None


def test_a_count_the_user_fixed_is_kept(monkeypatch):
  # These tests run with --xla_force_host_platform_device_count=8 (conftest.py): a user's setting.
  assert "xla_force_host_platform_device_count" in distributed.cpu_count_fixed_by()
  assert not distributed.split_cpu(2)
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true")
  assert distributed.cpu_count_fixed_by() is None


def test_a_cpu_peak_is_one_measurement_per_process_not_per_device():
  p = chips.resolve_peak("auto", device_kind="cpu", platform="cpu", num_devices=4, measure=lambda: 2e11)
  assert p["flops_per_s"] == 2e11 and p["per_device"] == 2e11
  p = chips.resolve_peak("auto", device_kind="cpu", platform="cpu", num_devices=4, num_processes=2,
                         measure=lambda: 2e11)
  assert p["flops_per_s"] == 4e11
  assert chips.measured_units("gpu", 8, 2) == 8 and chips.measured_units("cpu", 8, 2) == 2


def _bare_env() -> dict:
  """The environment without the tests' fixed CPU device count: what a user's shell has."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
  env.pop("JAX_NUM_CPU_DEVICES", None)
  return env


def test_the_benchmark_binary_splits_the_host_by_itself(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run([sys.executable, "launch/benchmark.py", "--config=configs/tiny.py", "--mesh_shape=-1,1,1",
                         "--steps=1", "--warmup=0", f"--json_out={out}"], capture_output=True, text=True, cwd=REPO,
                        timeout=600, env=_bare_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  expected = distributed.cpu_devices_for(0, (8, 16), DEFAULT_MESH)  # tiny: batch 8, eval batch 16
  assert r["num_devices"] == expected
  assert r["peak"]["flops_per_s"] == r["peak"]["per_device"]  # one process: the cores are counted once
  if expected > 1:
    assert f"CPU devices: {expected} (mesh.cpu_devices" in proc.stderr


def _train(workdir, *args):
  cmd = [sys.executable, os.path.join(REPO, "launch", "train.py"), "--config=" + os.path.join(REPO, "configs", "tiny.py"),
         f"--workdir={workdir}", "--config.mesh.shape=(-1, 1, 1)", *args]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=_bare_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in (workdir / "train" / "metrics.jsonl").read_text().splitlines()]
  return proc.stderr, [r["train/loss"] for r in rows if "train/loss" in r], json.loads(
      (workdir / "eval" / "final.json").read_text())["nats_per_token"]


@pytest.mark.slow
def test_a_run_split_over_two_cpu_devices_trains_as_one_device_does(tmp_path):
  log2, loss2, final2 = _train(tmp_path / "two", "--config.mesh.cpu_devices=2")
  log1, loss1, final1 = _train(tmp_path / "one", "--config.mesh.cpu_devices=1")
  assert "CPU devices: 2 (mesh.cpu_devices" in log2 and "CPU devices:" not in log1
  assert len(loss1) == len(loss2) == 4
  np.testing.assert_allclose(loss2, loss1, rtol=2e-5)
  np.testing.assert_allclose(final2, final1, rtol=2e-5)


def test_a_negative_count_in_the_config_is_refused_with_the_key():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from replaid_jax import config_lib  # pylint: disable=g-import-not-at-top
  cd = tiny.get_config()
  cd.mesh.cpu_devices = -2
  with pytest.raises(errors.ConfigError, match=r"mesh.cpu_devices=-2 must be 0"):
    config_lib.from_config_dict(cd)
