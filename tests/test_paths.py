"""Workdirs given as bucket URIs (gs://...) go through etils.epath, never into a local directory named 'gs:'.

No bucket is reachable here, so fsspec's "gcs" protocol is served by a stand-in: the local file system under a
temporary root, reached through the very same epath code path (epath -> fsspec -> filesystem) that gcsfs serves
on a TPU VM. Orbax's arrays go through tensorstore's own GCS driver, which the stand-in cannot serve; the
checkpoint files themselves are checked here through the manifest code, on files copied into the stand-in.
"""

import json
import os
import shutil

import fsspec
from fsspec.implementations import local
import pytest

from replaid_jax import checkpoint as ckpt_lib
from replaid_jax import errors
from replaid_jax import metrics as metrics_lib
from replaid_jax import paths
from replaid_jax import workdir_lock
from replaid_jax.sample import run as sample_run


class _BucketStandIn(local.LocalFileSystem):
  """gs://bucket/key -> <root>/bucket/key."""

  protocol = ("gcs", "gs")
  root = ""

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path) if not isinstance(path, str) else path
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        return os.path.join(cls.root, path[len(prefix):]).rstrip("/")
    return super()._strip_protocol(path)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  _BucketStandIn.root = str(tmp_path / "bucket_root")
  os.makedirs(_BucketStandIn.root)
  fsspec.register_implementation("gcs", _BucketStandIn, clobber=True)
  fsspec.register_implementation("gs", _BucketStandIn, clobber=True)
  monkeypatch.chdir(tmp_path)  # a 'gs:' directory would appear here if a URI were taken for a local path
  yield tmp_path / "bucket_root"
  assert not os.path.exists(tmp_path / "gs:")


def test_uri_workdirs_stay_uris():
  assert paths.absolute("gs://b/run/") == "gs://b/run"
  assert paths.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"
  assert ckpt_lib.checkpoint_dir("gs://b/run") == "gs://b/run/checkpoints"
  assert paths.absolute("rel") == os.path.abspath("rel")


def test_metrics_lock_samples_and_plots_reach_the_bucket(bucket):
  writer = metrics_lib.MetricWriter("gs://b/run/train", tensorboard=False)
  for step in (1, 2, 3):
    writer.write(step, {"loss": 1.0 / step}, prefix="train/", console=False)
  writer.write_json("config.json", {"a": 1})
  writer.close()
  rows = [json.loads(line) for line in open(bucket / "b" / "run" / "train" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert json.loads((bucket / "b" / "run" / "train" / "config.json").read_text()) == {"a": 1}
  # A resumed run drops the rows logged after its checkpoint.
  metrics_lib.MetricWriter("gs://b/run/train", tensorboard=False, resume_step=2).close()
  rows = [json.loads(line) for line in open(bucket / "b" / "run" / "train" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2]

  with workdir_lock.WorkdirLock("gs://b/run"):
    assert (bucket / "b" / "run" / workdir_lock.LOCK_NAME).exists()
    with pytest.raises(errors.ConfigError, match="in use by another trainer"):
      workdir_lock.WorkdirLock("gs://b/run").acquire()
  assert not (bucket / "b" / "run" / workdir_lock.LOCK_NAME).exists()

  assert sample_run.output_path("gs://b/run", 7) == "gs://b/run/samples/step7.jsonl"
  paths.makedirs("gs://b/run/samples")
  paths.write_text_atomic("gs://b/run/samples/step7.jsonl", "{}\n")
  assert sample_run.output_path("gs://b/run", 7) == "gs://b/run/samples/step7_2.jsonl"

  from replaid_jax.train import plots  # pylint: disable=g-import-not-at-top
  plots.save_bound_curve({"run": plots.read_validation_curve("gs://b/run")}, "gs://b/run/plots/curve.png")
  assert (bucket / "b" / "run" / "plots" / "curve.png").stat().st_size > 1000


def test_checksum_manifests_on_a_bucket(bucket, tmp_path):
  step = tmp_path / "local_step"
  (step / "state" / "d").mkdir(parents=True)
  (step / "state" / "d" / "data").write_bytes(bytes(range(256)) * 10)
  (step / "metadata").mkdir()
  (step / "metadata" / "metadata").write_text('{"config": {}}')
  shutil.copytree(step, bucket / "b" / "run" / "checkpoints" / "5")
  uri = "gs://b/run/checkpoints/5"
  assert ckpt_lib.verify(uri)[0] == ckpt_lib.UNVERIFIED
  ckpt_lib.write_manifest(uri)
  assert ckpt_lib.verify(uri) == (ckpt_lib.OK, "")
  manifest = json.loads((bucket / "b" / "run" / "checkpoints" / "5" / ckpt_lib.MANIFEST).read_text())
  assert sorted(manifest["files"]) == ["metadata/metadata", "state/d/data"]
  data = bucket / "b" / "run" / "checkpoints" / "5" / "state" / "d" / "data"
  raw = bytearray(data.read_bytes())
  raw[100] ^= 1
  data.write_bytes(bytes(raw))
  status, why = ckpt_lib.verify(uri)
  assert status == ckpt_lib.DAMAGED and "state/d/data does not match its checksum" in why


def test_training_data_read_from_a_bucket(bucket, tmp_path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from replaid_jax.train import loop  # pylint: disable=g-import-not-at-top
  data = bucket / "b" / "data"
  data.mkdir(parents=True)
  rng = np.random.default_rng(1)
  np.save(data / "train_0.npy", rng.integers(0, 40, 3000, dtype=np.int32))
  np.save(data / "train_1.npy", rng.integers(0, 40, 2000, dtype=np.int32))
  np.save(data / "val.npy", rng.integers(0, 40, 600, dtype=np.int32))
  cd = tiny.get_config()
  cd.data.source, cd.data.val_plays, cd.data.npy_vocab_size = "npy", "", 40
  cd.data.train_files, cd.data.val_files = "gs://b/data/train_*.npy", "gs://b/data/val.npy"
  cd.eval.num_samples, cd.eval.final_num_times, cd.train.num_steps = 0, 0, 2
  out = loop.train_and_evaluate(cd, str(tmp_path / "run"))
  assert out["step"] == 2
  config = json.loads((tmp_path / "run" / "train" / "config.json").read_text())
  assert config["config"]["data"]["train_files"] == "gs://b/data/train_*.npy"
  cd.data.train_files = "gs://b/data/missing_*.npy"
  with pytest.raises(errors.DataError, match="no file at or matching 'gs://b/data/missing_"):
    loop.train_and_evaluate(cd, str(tmp_path / "run2"))
