"""Training across processes: two CPU processes (gloo) against one process with two devices.

Each multi-process case runs launch/train.py in two local processes of one CPU
device each, joined through --coordinator_address on a free port, with the
mesh (-1, 1, 1) spanning both; the reference is one process with two fake CPU
devices and the same global batch. Also here: the split of every global batch
between processes, and training from ArrayRecord shards without loading them.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from conftest import npy_cli_args
from replaid_jax import checkpoint as ckpt_lib
from replaid_jax.data import arrayrecord
from replaid_jax.data import pipeline
from replaid_jax.data import prepare
from replaid_jax.data import sources
from replaid_jax.data import tokenizer as tokenizer_lib
from replaid_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 420  # per launch; a cold compile on a busy 2-core machine takes about a minute


def _gloo_available() -> bool:
  try:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
    return hasattr(_jax, "make_gloo_tcp_collectives")
  except Exception:  # pylint: disable=broad-except
    return False


needs_gloo = pytest.mark.skipif(not _gloo_available(),
                                reason="this jaxlib has no gloo CPU collectives, which multi-process CPU runs need")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices_per_process: int) -> dict:
  env = dict(os.environ)
  # Not the 8 fake devices of conftest: one process's device count.
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


@pytest.fixture(scope="module")
def npy_args(tmp_path_factory):
  return [*npy_cli_args(tmp_path_factory.mktemp("npy")), "--config.train.num_steps=5", "--config.mesh.shape=(-1,1,1)"]


def _command(workdir, args):
  return [sys.executable, os.path.join(REPO, "launch", "train.py"), "--config=" + os.path.join(REPO, "configs", "tiny.py"),
          f"--workdir={workdir}", *args]


def _start(workdir, args, *, num_processes: int, devices_per_process: int = 1):
  """Starts the processes of one run; returns [(Popen, log path)]."""
  os.makedirs(workdir, exist_ok=True)
  extra = []
  port = _free_port()
  procs = []
  for i in range(num_processes):
    if num_processes > 1:
      extra = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}", f"--process_id={i}"]
    log = os.path.join(workdir, f"log_process{i}_{time.time_ns()}.txt")
    with open(log, "w") as f:
      procs.append((subprocess.Popen(_command(workdir, [*args, *extra]), stdout=f, stderr=subprocess.STDOUT,
                                     cwd=REPO, env=_env(devices_per_process)), log))
  return procs


def _finish(procs) -> list[str]:
  """Waits for every process (killing all on timeout); returns their logs, asserting exit status 0."""
  deadline = time.time() + TIMEOUT_S
  try:
    for p, _ in procs:
      p.wait(timeout=max(deadline - time.time(), 1))
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs = [open(log).read() for _, log in procs]
  for (p, _), text in zip(procs, logs):
    assert p.returncode == 0, text[-4000:]
  return logs


def _launch(workdir, args, **kw) -> list[str]:
  return _finish(_start(workdir, args, **kw))


def _losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "train", "metrics.jsonl")) as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


@pytest.fixture(scope="module")
def runs(npy_args, tmp_path_factory):
  """An uninterrupted two-process run and the one-process, two-device reference (5 steps and the final bound)."""
  root = tmp_path_factory.mktemp("runs")
  args = [*npy_args, "--config.eval.final_num_times=2"]
  two_logs = _launch(root / "two", args, num_processes=2)
  one_logs = _launch(root / "one", args, num_processes=1, devices_per_process=2)
  return {"two": str(root / "two"), "one": str(root / "one"), "two_logs": two_logs, "one_logs": one_logs}


@pytest.mark.slow
@needs_gloo
def test_two_processes_train_like_one_process_with_two_devices(runs):
  assert "process 0 of 2, 1 local / 2 global device(s)" in runs["two_logs"][0]
  assert "1 process(es), 2 device(s)" in runs["one_logs"][0]
  # Process 1 logs warnings only, and process 0 alone writes metrics.
  assert "train: 3/5 steps" in runs["two_logs"][0]
  assert "train: 3/5 steps" not in runs["two_logs"][1] and "compiled train step" not in runs["two_logs"][1]
  two, one = _losses(runs["two"]), _losses(runs["one"])
  assert sorted(two) == sorted(one) == [1, 2, 3, 4, 5]
  loss_diff = max(abs(two[s] - one[s]) for s in one)
  print(f"max |loss(2 processes) - loss(1 process, 2 devices)| over 5 steps: {loss_diff:.3g}")
  np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-5)
  a = ckpt_lib.read_arrays(runs["two"], 5)
  b = ckpt_lib.read_arrays(runs["one"], 5)
  assert int(a["step"]) == int(b["step"]) == 5
  rel = max(float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12))
            for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])))
  print(f"max relative parameter difference after 5 steps: {rel:.3g}")
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a["params"], b["params"])
  # The final validation bound, batches split over the processes, is the one-process bound.
  finals = [json.load(open(os.path.join(runs[k], "eval", "final.json"))) for k in ("two", "one")]
  assert finals[0]["num_sequences"] == finals[1]["num_sequences"] > 0
  np.testing.assert_allclose(finals[0]["nats_per_token"], finals[1]["nats_per_token"], rtol=1e-6)
  print(f"final bound: {finals[0]['nats_per_token']:.6f} (2 processes), {finals[1]['nats_per_token']:.6f} "
        f"(1 process) nats/token over {finals[0]['num_sequences']} sequences")
  steps_dir = os.path.join(runs["two"], "checkpoints", "5", "data_iter")
  assert sorted(os.listdir(steps_dir)) == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.slow
@needs_gloo
def test_two_process_run_stopped_and_resumed_equals_the_uninterrupted_one(runs, npy_args, tmp_path):
  workdir = tmp_path / "resumed"
  logs = _launch(workdir, [*npy_args, "--stop_after=3"], num_processes=2)
  assert "stopped at step 3 of 5" in logs[0]
  data_iter = workdir / "checkpoints" / "3" / "data_iter"
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_iter))
  logs = _launch(workdir, npy_args, num_processes=2)
  assert "at step 3" in logs[0] and "resumed from" in logs[0]
  assert _losses(workdir) == _losses(runs["two"])
  for item in ("state", "ema_params"):
    jax.tree.map(np.testing.assert_array_equal, ckpt_lib.read_arrays(str(workdir), 5, item),
                 ckpt_lib.read_arrays(runs["two"], 5, item))
  for name in ("process_0-of-2.json", "process_1-of-2.json"):
    straight = os.path.join(runs["two"], "checkpoints", "5", "data_iter", name)
    assert (workdir / "checkpoints" / "5" / "data_iter" / name).read_text() == open(straight).read()


@pytest.mark.slow
@needs_gloo
def test_sigterm_to_one_process_stops_both_at_the_same_step(npy_args, tmp_path):
  workdir = tmp_path / "preempted"
  args = [*npy_args, "--config.train.num_steps=400", "--config.checkpoint.every_steps=1000"]
  procs = _start(workdir, args, num_processes=2)
  metrics = workdir / "train" / "metrics.jsonl"
  deadline = time.time() + TIMEOUT_S
  while not (metrics.exists() and len(_losses(workdir)) >= 3):
    assert time.time() < deadline and all(p.poll() is None for p, _ in procs), "the run ended before step 3"
    time.sleep(0.1)
  seen = max(_losses(workdir))
  procs[1][0].send_signal(signal.SIGTERM)  # process 1 only: jax's preemption sync tells process 0
  logs = _finish(procs)
  step = int(re.search(r"preempted at step (\d+)", logs[0]).group(1))
  assert seen < step < 400
  assert ckpt_lib.Checkpointer(str(workdir), read_only=True).all_steps() == [step]
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(workdir / "checkpoints" / str(step) /
                                                                           "data_iter"))
  assert int(ckpt_lib.read_arrays(str(workdir), step)["step"]) == step
  assert max(_losses(workdir)) == step
  print(f"SIGTERM to process 1 once step {seen} was logged: both processes saved step {step} and exited 0")


def test_each_process_reads_its_own_rows_of_every_global_batch():
  rows = np.arange(64 * 4, dtype=np.int32).reshape(64, 4)  # row i holds 4i..4i+3: rows identify themselves
  kw = dict(global_batch=8, seed=3, num_workers=0)
  single = pipeline.train_iterator(rows, process_index=0, process_count=1, **kw)
  parts = [pipeline.train_iterator(rows, process_index=p, process_count=2, **kw) for p in (0, 1)]
  for _ in range(10):  # past the first epoch (8 batches), into the reshuffled second
    whole = next(single)["tokens"]
    local = [next(it)["tokens"] for it in parts]
    ids = [set(x[:, 0] // 4) for x in local]
    assert len(ids[0]) == len(ids[1]) == 4 and not ids[0] & ids[1]
    np.testing.assert_array_equal(np.concatenate(local), whole)  # process p holds rows [4p, 4p + 4)


def _prepared_shards(tmp_path):
  """A tiny prepared ArrayRecord directory (SentencePiece BPE of 400 pieces, rows of 32 tokens)."""
  words = "the river stone garden light window morning quiet letter north harbour song of and to in".split()
  rng = np.random.default_rng(0)
  docs = [" ".join(rng.choice(words, size=rng.integers(20, 80))) for _ in range(300)]
  src = tmp_path / "corpus.txt"
  src.write_text("\n\n".join(docs))
  tok = tokenizer_lib.train_or_load_tokenizer([sources.shakespeare_plays()["macbeth"], *docs], vocab_size=400,
                                              model_type="bpe",
                                              cache_dir=str(tmp_path / "tok"))
  out = tmp_path / "prepared"
  prepare.prepare(prepare.PrepareConfig(inputs=str(src), output_dir=str(out), tokenizer=tok.path, seq_len=32,
                                        rows_per_shard=50, val_fraction=0.1, split_paragraphs=True))
  return str(out)


def test_arrayrecord_training_streams_the_shards_and_matches_the_in_memory_path(tmp_path, monkeypatch):
  shards = _prepared_shards(tmp_path)
  train_rows, meta = arrayrecord.read_split(shards, "train")
  val_rows, _ = arrayrecord.read_split(shards, "validation")
  assert train_rows.shape[0] >= 16 and val_rows.shape[0] >= 1

  def cd(**kw):
    c = tiny.get_config()
    c.data.val_plays = ""
    c.data.seq_len = 32
    c.train.num_steps = 2
    c.checkpoint.every_steps = 0
    c.eval.num_samples = 0
    c.eval.final_num_times = 0
    for key, value in kw.items():
      setattr(c.data, key, value)
    return c

  # The whole train split is never read into memory: read_split is not called for it.
  calls = []
  real_read_split = arrayrecord.read_split
  monkeypatch.setattr(arrayrecord, "read_split", lambda d, split, **kw: (calls.append(split),
                                                                         real_read_split(d, split, **kw))[1])
  streamed = cd(source="arrayrecord", train_files=shards)
  corpus = pipeline.load_corpus(loop.config_lib.from_config_dict(streamed).data, workdir=str(tmp_path),
                                stream_train=True)
  assert corpus.train is None and corpus.train_shards == shards and "train" not in calls
  assert corpus.info["train_rows"] == train_rows.shape[0] == meta["splits"]["train"]["rows"]
  np.testing.assert_array_equal(corpus.val, val_rows)
  np.testing.assert_array_equal(corpus.unigram_counts,  # every row is in the sample of a small split
                                np.bincount(train_rows.reshape(-1), minlength=meta["vocab_size"]))
  loop.train_and_evaluate(streamed, str(tmp_path / "streamed"))
  assert "train" not in calls

  # The same rows as .npy token streams: the in-memory path of the same data.
  np.save(tmp_path / "train.npy", train_rows.reshape(-1))
  np.save(tmp_path / "val.npy", val_rows.reshape(-1))
  in_memory = cd(source="npy", train_files=str(tmp_path / "train.npy"), val_files=str(tmp_path / "val.npy"),
                 npy_vocab_size=meta["vocab_size"])
  loop.train_and_evaluate(in_memory, str(tmp_path / "in_memory"))

  a, b = _losses(str(tmp_path / "streamed")), _losses(str(tmp_path / "in_memory"))
  assert sorted(a) == [1, 2] and a == b
  jax.tree.map(np.testing.assert_array_equal, ckpt_lib.read_arrays(str(tmp_path / "streamed"), 2),
               ckpt_lib.read_arrays(str(tmp_path / "in_memory"), 2))
  # The batches themselves: the streamed iterator yields the in-memory iterator's rows.
  kw = dict(global_batch=8, seed=streamed.seed, process_index=0, process_count=1, num_workers=0)
  from_shards = arrayrecord.train_iterator_from_shards(shards, **kw)
  from_memory = pipeline.train_iterator(train_rows, **kw)
  for _ in range(3):
    np.testing.assert_array_equal(next(from_shards)["tokens"], next(from_memory)["tokens"])


def test_tpu_chips_are_counted_from_pci_ids_and_mark_a_tpu_host(tmp_path, monkeypatch):
  """Google's NIC and disks share its vendor id and are not chips; a known TPU id, or a Google device of another
  class (a generation newer than the list), is one; other vendors are not; unreadable entries are skipped."""
  from replaid_jax import distributed  # pylint: disable=g-import-not-at-top
  devices = {
      "0000:00:04.0": ("0x1ae0", "0x0042", "0x020000"),  # Google virtual NIC
      "0000:00:05.0": ("0x1ae0", "0x001f", "0x010802"),  # Google NVMe disk
      "0000:00:06.0": ("0x1ae0", "0x005e", "0x120000"),  # TPU v4
      "0000:00:07.0": ("0x1ae0", "0x0063", "0x020000"),  # a listed TPU id counts whatever its class
      "0000:00:08.0": ("0x1ae0", "0x0099", "0x120000"),  # unknown Google device, not storage or network
      "0000:00:09.0": ("0x10de", "0x2335", "0x030200"),  # an NVIDIA GPU
  }
  for name, (vendor, device, pci_class) in devices.items():
    d = tmp_path / name
    d.mkdir()
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")
    (d / "class").write_text(pci_class + "\n")
  (tmp_path / "0000:00:0a.0").mkdir()
  (tmp_path / "0000:00:0a.0" / "vendor").write_text("0x1ae0\n")  # no device file: skipped
  for name in (*distributed._TPU_ENV, "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID",  # pylint: disable=protected-access
               "OMPI_MCA_orte_hnp_uri"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(distributed, "_PCI_DEVICES", str(tmp_path))
  assert distributed._tpu_chips() == 3  # pylint: disable=protected-access
  assert distributed.detect_cluster() == "tpu"
  monkeypatch.setattr(distributed, "_PCI_DEVICES", str(tmp_path / "none"))
  assert distributed._tpu_chips() == 0 and distributed.detect_cluster() is None  # pylint: disable=protected-access
