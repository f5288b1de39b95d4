"""No run is lost: non-finite steps, damaged checkpoints, a second trainer, bad counts, changed configs on resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from conftest import npy_cli_args
from replaid_jax import checkpoint as ckpt_lib
from replaid_jax import config_lib
from replaid_jax import errors
from replaid_jax import objectives
from replaid_jax import workdir_lock
from replaid_jax.eval import run as eval_run
from replaid_jax.sample import run as sample_run
from replaid_jax.train import loop
from replaid_jax.train import build as build_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300


def _config(npy_dir, **overrides):
  cd = tiny.get_config()
  values = {"data.source": "npy", "data.train_files": str(npy_dir / "train.npy"),
            "data.val_files": str(npy_dir / "val.npy"), "data.npy_vocab_size": 40, "data.val_plays": "",
            "eval.num_samples": 0, "eval.final_num_times": 0, "train.num_steps": 4, "checkpoint.every_steps": 1,
            "checkpoint.keep": 3, **overrides}
  for key, value in values.items():
    section, field = key.split(".")
    cd[section][field] = value
  return cd


@pytest.fixture(scope="module")
def npy_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("npy")
  npy_cli_args(d)
  return d


@pytest.fixture(scope="module")
def trained(npy_dir, tmp_path_factory):
  """A finished 4-step run with checkpoints 2, 3 and 4 (each with its checksum manifest)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  loop.train_and_evaluate(_config(npy_dir), str(workdir))
  return workdir


def _copy(src, tmp_path, name="run"):
  dst = tmp_path / name
  shutil.copytree(src, dst)
  return dst


def _steps(workdir):
  ck = ckpt_lib.Checkpointer(str(workdir), read_only=True)
  try:
    return ck.all_steps()
  finally:
    ck.close()


def _assert_finite_checkpoint(workdir, step):
  state = ckpt_lib.read_arrays(str(workdir), step)
  ema = ckpt_lib.read_arrays(str(workdir), step, "ema_params")
  for tree in (state["params"], state["opt_state"], ema):
    for x in jax.tree.leaves(tree):
      if np.issubdtype(np.asarray(x).dtype, np.floating):
        assert np.isfinite(x).all(), f"non-finite array in committed step {step}"


def _logged_steps(workdir):
  path = os.path.join(workdir, "train", "metrics.jsonl")
  with open(path) as f:
    return [r["step"] for r in map(json.loads, f) if "train/loss" in r]


# ---- non-finite steps.


class _PoisonedObjective:
  """The real objective, except that the loss and gradients of the chosen step are NaN (a fault to inject)."""

  def __init__(self, inner, bad_step):
    self._inner, self._bad_step = inner, bad_step

  def __getattr__(self, name):
    return getattr(self._inner, name)

  def setup(self, state, batch, key):
    return (self._inner.setup(state, batch, key), state.step + 1)  # the step this update produces

  def loss_and_grads(self, params, tokens, setup, key):
    inner_setup, step = setup
    loss, terms, grads = self._inner.loss_and_grads(params, tokens, inner_setup, key)
    poison = jnp.where(step == self._bad_step, jnp.nan, 1.0)
    return loss * poison, terms, jax.tree.map(lambda g: g * poison, grads)

  def metrics(self, terms, setup, params):
    return self._inner.metrics(terms, setup[0], params)


def _poison(monkeypatch, bad_step):
  real_make = objectives.make
  monkeypatch.setattr(objectives, "make", lambda c: _PoisonedObjective(real_make(c), bad_step))


def test_a_non_finite_step_is_not_applied(npy_dir, monkeypatch):
  _poison(monkeypatch, 2)
  corpus = loop.pipeline.load_corpus(config_lib.from_config_dict(_config(npy_dir)).data, workdir=str(npy_dir))
  c = build_lib.resolve_vocab(config_lib.from_config_dict(_config(npy_dir)), corpus)
  run = build_lib.build(c, corpus, devices=jax.devices()[:1])
  step = build_lib.compile_step(run)
  key = jax.random.key(0)
  batch = lambda i: build_lib.global_batch(run, {"tokens": corpus.train[8 * i:8 * (i + 1)]})
  state, m1 = step(run.state, batch(0), key)
  before = jax.device_get((state.params, state.ema_params, state.opt_state, state.loss_stats))
  state, m2 = step(state, batch(1), key)
  after = jax.device_get((state.params, state.ema_params, state.opt_state, state.loss_stats))
  assert int(m1["nonfinite"]) == 0 and int(m2["nonfinite"]) == 1 and not np.isfinite(float(m2["loss"]))
  assert int(state.step) == 2  # the step counter (and so the data and random stream) moves past the batch
  jax.tree.map(np.testing.assert_array_equal, before, after)


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_nan_at_a_chosen_step_stops_before_saving_and_the_documented_recovery_completes(npy_dir, tmp_path,
                                                                                        monkeypatch, keep):
  workdir = tmp_path / "run"
  cfg = lambda: _config(npy_dir, **{"train.num_steps": 6, "train.log_every": 5, "checkpoint.keep": keep})
  with monkeypatch.context() as patch:
    _poison(patch, 4)
    with pytest.raises(errors.TrainingError, match=r"non-finite loss or gradients at step 4 .*newest checkpoint is "
                       r"step 3.*--config.optim.lr="):
      loop.train_and_evaluate(cfg(), str(workdir))
  steps = _steps(workdir)
  assert steps[-1] == 3 and len(steps) == min(keep, 3), steps
  assert not [n for n in os.listdir(workdir / "checkpoints") if "tmp" in n]
  assert not (workdir / workdir_lock.LOCK_NAME).exists()
  for s in steps:
    _assert_finite_checkpoint(workdir, s)
  # The documented way on (a lower learning rate, or anything that removes the fault) resumes from step 3.
  out = loop.train_and_evaluate(_config(npy_dir, **{"train.num_steps": 6, "train.log_every": 5,
                                                    "checkpoint.keep": keep, "optim.lr": 5e-4}), str(workdir))
  assert out["step"] == 6 and _steps(workdir)[-1] == 6
  _assert_finite_checkpoint(workdir, 6)
  logged = _logged_steps(workdir)
  assert sorted(logged) == sorted(set(logged))


def test_skip_nonfinite_steps_skips_the_bad_batch_and_finishes(npy_dir, tmp_path, monkeypatch):
  _poison(monkeypatch, 3)
  workdir = tmp_path / "run"
  out = loop.train_and_evaluate(_config(npy_dir, **{"train.skip_nonfinite_steps": 1}), str(workdir))
  assert out["step"] == 4 and _steps(workdir) == [2, 3, 4]
  for s in (2, 3, 4):
    _assert_finite_checkpoint(workdir, s)
  # Step 3 was skipped: its parameters are those of step 2.
  a, b = ckpt_lib.read_arrays(str(workdir), 2), ckpt_lib.read_arrays(str(workdir), 3)
  jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])


def _cli(script, *args, env=None):
  cmd = [sys.executable, os.path.join(REPO, "launch", script), *args]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=TIMEOUT_S,
                        env={**os.environ, **(env or {})})


def _one_error_line(proc):
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "cannot schedule new futures" not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


def test_learning_rate_spike_exits_2_with_one_line_and_resume_from_an_earlier_step_completes(npy_dir, tmp_path):
  workdir = tmp_path / "spike"
  common = ["--config=" + os.path.join(REPO, "configs", "tiny.py"), f"--workdir={workdir}", *npy_cli_args(npy_dir),
            "--config.train.num_steps=6", "--config.train.log_every=5", "--config.checkpoint.every_steps=1"]
  spike = [f"--config.optim.{k}=1e6" for k in ("lr", "embedding_lr", "schedule_lr", "bounds_lr")]
  line = _one_error_line(_cli("train.py", *common, *spike))
  assert "non-finite loss or gradients at step" in line and "--resume_from_step" in line
  steps = _steps(workdir)
  for s in steps:
    _assert_finite_checkpoint(workdir, s)
  proc = _cli("train.py", *common, f"--resume_from_step={steps[0]}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "optim.lr: 1000000.0 -> 0.001" in proc.stderr  # the changed learning rate is listed
  assert _steps(workdir)[-1] == 6
  _assert_finite_checkpoint(workdir, 6)


# ---- damaged checkpoints.


def _data_file(step_dir, item):
  files = [os.path.join(root, n) for root, _, names in os.walk(step_dir / item) for n in names
           if os.sep + "d" + os.sep in os.path.join(root, n)]
  return max(files, key=os.path.getsize)


def _target(step_dir, kind):
  return {"state": lambda: _data_file(step_dir, "state"), "ema": lambda: _data_file(step_dir, "ema_params"),
          "metadata": lambda: str(step_dir / "metadata" / "metadata"),
          "data_iter": lambda: str(step_dir / "data_iter" / "process_0-of-1.json")}[kind]()


def _damage(step_dir, kind, how):
  if how == "empty_step":
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)
    return
  if how == "remove_item":
    shutil.rmtree(step_dir / {"state": "state", "ema": "ema_params", "metadata": "metadata",
                              "data_iter": "data_iter"}[kind])
    return
  path = _target(step_dir, kind)
  data = bytearray(open(path, "rb").read())
  if how == "flip":
    for i in (len(data) // 4, len(data) // 2, 3 * len(data) // 4):
      data[i] ^= 0x5A
  elif how == "truncate":
    data = data[:len(data) // 2]
  elif how == "overwrite":
    data = bytearray(b"garbage" * (len(data) // 7 + 1))[:len(data)]
  if how == "delete":
    os.remove(path)
  else:
    with open(path, "wb") as f:
      f.write(bytes(data))


DAMAGE = [(kind, how) for kind in ("state", "ema", "metadata", "data_iter")
          for how in ("flip", "truncate", "delete", "overwrite", "remove_item")] + [("step", "empty_step")]


@pytest.mark.parametrize("kind, how", DAMAGE)
def test_eval_and_sample_refuse_a_damaged_step_and_name_the_intact_one(trained, tmp_path, kind, how):
  workdir = _copy(trained, tmp_path)
  _damage(workdir / "checkpoints" / "4", kind, how)
  for fn in (lambda: eval_run.evaluate_checkpoint(str(workdir), timing=False),
             lambda: sample_run.sample_checkpoint(str(workdir), overrides={"num_samples": 1, "steps": 2})):
    with pytest.raises(errors.CheckpointError, match=r"step 4 .*(damaged|incomplete).*newest intact step is 3: "
                       r"pass --step=3"):
      fn()
  assert not os.path.exists(workdir / "eval" / "validation_validation_step4.json")
  assert not os.path.exists(workdir / "samples")


@pytest.mark.parametrize("kind, how", DAMAGE)
def test_train_resumes_from_the_newest_intact_step_with_one_line(trained, tmp_path, npy_dir, kind, how, caplog):
  workdir = _copy(trained, tmp_path)
  _damage(workdir / "checkpoints" / "4", kind, how)
  _damage(workdir / "checkpoints" / "3", "state", "flip")  # the newest intact step is 2
  caplog.set_level("WARNING")
  full = (kind, how) in (("state", "flip"), ("step", "empty_step"))  # the others stop after the resumed step
  out = loop.train_and_evaluate(_config(npy_dir, **{"train.num_steps": 5 if full else 3}), str(workdir))
  assert out["step"] == (5 if full else 3)
  notes = [r.getMessage() for r in caplog.records if "is set aside" in r.getMessage()]
  assert len(notes) == 2 and all("resuming from step 2" in n for n in notes), notes
  assert sorted(os.listdir(workdir / ckpt_lib.DAMAGED_DIR))[0].startswith("3-")
  assert _steps(workdir)[-1] == out["step"]
  logged = _logged_steps(workdir)
  assert sorted(logged) == sorted(set(logged)) == list(range(1, out["step"] + 1))  # redone steps logged once


def _nan_step(trained, tmp_path):
  """A copy of the run with a step 5 whose EMA, parameters and optimizer state hold NaN, as a run that diverged
  was saved by earlier versions (the train loop no longer writes such a step)."""
  workdir = _copy(trained, tmp_path)
  ck = ckpt_lib.Checkpointer(str(workdir))
  state = ckpt_lib.read_arrays(str(workdir), 4)
  ema = ckpt_lib.read_arrays(str(workdir), 4, "ema_params")
  nan = lambda t: jax.tree.map(lambda x: x * np.nan if np.issubdtype(x.dtype, np.floating) else x, t)

  class Saved:
    step = np.asarray(5, np.int32)
    params = nan(state["params"])
    opt_state = nan(state["opt_state"])
    loss_stats = state["loss_stats"]
    ema_params = nan(ema)

  meta = ck.metadata(4)
  ck.save(5, Saved, None, meta, force=True)
  ck.close()
  shutil.copytree(workdir / "checkpoints" / "4" / "data_iter", workdir / "checkpoints" / "5" / "data_iter")
  os.remove(workdir / "checkpoints" / "5" / ckpt_lib.MANIFEST)
  ckpt_lib.write_manifest(str(workdir / "checkpoints" / "5"))
  return workdir


def test_a_diverged_checkpoint_is_refused_by_eval_and_sample_and_skipped_by_train(trained, tmp_path, npy_dir):
  workdir = _nan_step(trained, tmp_path)
  with pytest.raises(errors.CheckpointError, match="step 5 .*non-finite EMA parameters.*pass --step=4"):
    eval_run.evaluate_checkpoint(str(workdir), timing=False)
  with pytest.raises(errors.CheckpointError, match="step 5 .*non-finite EMA parameters.*pass --step=4"):
    sample_run.sample_checkpoint(str(workdir), overrides={"num_samples": 1, "steps": 2})
  assert not os.path.exists(workdir / "eval") or not any("step5" in n for n in os.listdir(workdir / "eval"))
  out = loop.train_and_evaluate(_config(npy_dir, **{"train.num_steps": 6}), str(workdir))
  assert out["step"] == 6
  for s in _steps(workdir):
    _assert_finite_checkpoint(workdir, s)


def test_eval_and_sample_binaries_report_damage_in_one_line(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  _damage(workdir / "checkpoints" / "4", "ema", "flip")
  for script, extra in (("eval.py", ["--notiming"]), ("sample.py", ["--config.sample.num_samples=1"])):
    line = _one_error_line(_cli(script, f"--workdir={workdir}", *extra))
    assert "step 4" in line and "pass --step=3" in line, line


# ---- one trainer per workdir; no duplicated metrics after a kill.


def test_a_second_trainer_is_refused_and_a_killed_trainers_lock_is_stale(npy_dir, tmp_path):
  workdir = tmp_path / "run"
  args = ["--config=" + os.path.join(REPO, "configs", "tiny.py"), f"--workdir={workdir}", *npy_cli_args(npy_dir),
          "--config.train.num_steps=400", "--config.checkpoint.every_steps=3"]
  log = open(tmp_path / "first.txt", "w")
  first = subprocess.Popen([sys.executable, os.path.join(REPO, "launch", "train.py"), *args], stdout=log,
                           stderr=subprocess.STDOUT, cwd=REPO)
  try:
    deadline = time.time() + TIMEOUT_S
    while not os.path.exists(workdir / "train" / "metrics.jsonl") or max(_logged_steps(workdir), default=0) < 4:
      assert first.poll() is None and time.time() < deadline, open(tmp_path / "first.txt").read()[-3000:]
      time.sleep(0.1)
    owner = json.loads((workdir / workdir_lock.LOCK_NAME).read_text())
    assert owner["pid"] == first.pid
    line = _one_error_line(_cli("train.py", *args))
    assert "in use by another trainer" in line and f"process {first.pid}" in line
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
    log.close()
  killed_at = max(_logged_steps(workdir))
  # Rerun to two steps past the kill: the steps after the last checkpoint are trained again, logged once.
  proc = _cli("train.py", *args[:-2], f"--config.train.num_steps={killed_at + 2}",
              "--config.checkpoint.every_steps=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "removing the stale workdir lock" in proc.stderr
  assert not (workdir / workdir_lock.LOCK_NAME).exists()
  logged = _logged_steps(workdir)
  assert sorted(logged) == list(range(1, killed_at + 3)), (killed_at, logged)


def test_lock_refuses_a_live_owner_and_replaces_a_dead_one(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path)):
    with pytest.raises(errors.ConfigError, match="in use by another trainer"):
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert not (tmp_path / workdir_lock.LOCK_NAME).exists()
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  (tmp_path / workdir_lock.LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": gone.pid}))
  with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
    assert lock.held
  (tmp_path / workdir_lock.LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
  with pytest.raises(errors.ConfigError, match="host elsewhere"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()


# ---- counts, intervals, paths and configs on resume.


@pytest.mark.parametrize("key, value", [("checkpoint.keep", 0), ("train.num_steps", 0), ("train.num_steps", -5),
                                        ("checkpoint.every_steps", -1), ("train.log_every", 0),
                                        ("train.eval_every", -1), ("train.skip_nonfinite_steps", -1),
                                        ("eval.max_batches", -1), ("data.seq_len", 0)])
def test_bad_counts_and_intervals_are_refused_naming_the_key(key, value):
  cd = tiny.get_config()
  section, field = key.split(".")
  cd[section][field] = value
  with pytest.raises(errors.ConfigError, match=rf"{key}={value} is not allowed"):
    config_lib.from_config_dict(cd)


def test_log_every_0_and_a_workdir_that_is_a_file_end_with_one_line(tmp_path):
  proc = _cli("train.py", "--config=" + os.path.join(REPO, "configs", "tiny.py"), f"--workdir={tmp_path / 'w'}",
              "--config.train.log_every=0")
  assert "train.log_every=0 is not allowed" in _one_error_line(proc)
  (tmp_path / "file").write_text("x")
  with pytest.raises(errors.ConfigError, match="is a file"):
    loop.train_and_evaluate(tiny.get_config(), str(tmp_path / "file"))


def test_resume_lists_config_changes_and_refuses_those_that_change_the_run(trained, tmp_path, npy_dir, caplog):
  workdir = _copy(trained, tmp_path)
  with pytest.raises(errors.ConfigError, match=r"data.seq_len: 32 -> 16.*--allow_config_changes"):
    loop.train_and_evaluate(_config(npy_dir, **{"data.seq_len": 16}), str(workdir))
  with pytest.raises(errors.CheckpointError, match=r"optim.grad_clip: 1.0 -> 0.0"):
    loop.train_and_evaluate(_config(npy_dir, **{"optim.grad_clip": 0.0}), str(workdir))
  caplog.set_level("WARNING")
  out = loop.train_and_evaluate(_config(npy_dir, **{"optim.lr": 2e-3, "train.num_steps": 5}), str(workdir))
  assert out["step"] == 5
  assert any("optim.lr: 0.001 -> 0.002" in r.getMessage() and "train.num_steps: 4 -> 5" in r.getMessage()
             for r in caplog.records)
  out = loop.train_and_evaluate(_config(npy_dir, **{"data.seq_len": 16, "train.num_steps": 6}), str(workdir),
                                allow_config_changes=True)
  assert out["step"] == 6


def test_sampling_twice_writes_a_new_file_and_output_is_never_overwritten(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  kw = {"overrides": {"num_samples": 1, "batch_size": 1, "steps": 2, "print_samples": 0, "progress": False}}
  first = sample_run.sample_checkpoint(str(workdir), **kw)
  second = sample_run.sample_checkpoint(str(workdir), **kw)
  assert first["samples_file"].endswith("samples/step4.jsonl")
  assert second["samples_file"].endswith("samples/step4_2.jsonl")
  assert os.path.exists(workdir / "samples" / "step4.summary.json")
  assert os.path.exists(workdir / "samples" / "step4_2.summary.json")
  with pytest.raises(errors.ConfigError, match="exists"):
    sample_run.sample_checkpoint(str(workdir), output=first["samples_file"], **kw)
  mine = sample_run.sample_checkpoint(str(workdir), output=str(tmp_path / "mine.jsonl"), **kw)
  assert mine["samples_file"] == str(tmp_path / "mine.jsonl") and (tmp_path / "mine.summary.json").exists()
