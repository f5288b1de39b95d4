"""The output directory of data preparation (`prepare.py`): its files, progress and publishing.

A bucket output is written to a local staging directory first and copied to
the bucket once complete. While preparation is unfinished, the directory holds
`progress.json` and the packing state of the last completed unit.
"""

import hashlib
import io
import json
import os
import re
import tempfile

import numpy as np

from replaid_jax import paths
from replaid_jax.data import prepare_shards
from replaid_jax.errors import DataError

METADATA = "metadata.json"
PROGRESS = "progress.json"

_OUR_FILES = re.compile(r"^(?:(?:train|validation)-\d{5}\.array_record|metadata\.json|progress\.json"
                        r"|progress-state-\d{6}\.npz)$")
_OUR_TEMP_FILES = re.compile(r"^\.(?:(?:train|validation)-\d{5}\.array_record|metadata\.json"
                             r"|progress\.json|progress-state-\d{6}\.npz)\.tmp$")


def is_remote(path: str) -> bool:
  return "://" in path


def local_dir(output_dir: str, staging_dir: str) -> str:
  """Where the output is written: `output_dir`, or for a bucket path the staging directory."""
  if not is_remote(output_dir):
    return os.path.expanduser(output_dir)
  if staging_dir:
    return os.path.expanduser(staging_dir)
  key = hashlib.sha256(output_dir.encode()).hexdigest()[:16]
  return os.path.join(tempfile.gettempdir(), f"replaid-prepare-{key}")


def holds_our_files(out_dir: str) -> bool:
  """Whether `out_dir` holds shards, metadata or progress files."""
  return any(_OUR_FILES.match(n) for n in os.listdir(out_dir))


def clean(out_dir: str, *, everything: bool) -> None:
  """Deletes temporary files (and, if `everything`, all of our files) in `out_dir`."""
  for name in os.listdir(out_dir):
    if _OUR_TEMP_FILES.match(name) or (everything and _OUR_FILES.match(name)):
      os.remove(os.path.join(out_dir, name))


def remove_shards_past(out_dir: str, shards: dict[str, int]) -> None:
  """Deletes the shards of each split past its first `shards[split]`."""
  for name in os.listdir(out_dir):
    m = re.match(r"^(train|validation)-(\d{5})\.array_record$", name)
    if m and int(m.group(2)) >= shards[m.group(1)]:
      os.remove(os.path.join(out_dir, name))


def save_progress(out_dir: str, settings: dict, units_done: int, chain: str,
                  writers: dict[str, prepare_shards.SplitWriter]) -> None:
  """Records the completed units: the writers' packing state, then progress.json."""
  state_name = f"progress-state-{units_done:06d}.npz"
  arrays = {}
  for writer in writers.values():
    arrays.update(writer.state_arrays())
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  paths.write_bytes_atomic(os.path.join(out_dir, state_name), buf.getvalue())
  prepare_shards.fsync_dir(out_dir)  # the unit's shards and state are in place before progress.json counts them
  progress = {"settings": settings, "units_done": units_done, "chain": chain,
              "state_file": state_name,
              "splits": {split: w.stats for split, w in writers.items()}}
  paths.write_bytes_atomic(os.path.join(out_dir, PROGRESS), json.dumps(progress).encode())
  for name in os.listdir(out_dir):
    if name.startswith("progress-state-") and name.endswith(".npz") and name != state_name:
      os.remove(os.path.join(out_dir, name))


def remove_progress(out_dir: str) -> None:
  """Deletes progress.json and the packing state, once metadata.json is in place."""
  for name in os.listdir(out_dir):
    if name == PROGRESS or name.startswith("progress-state-"):
      os.remove(os.path.join(out_dir, name))


def publish(local: str, remote: str, names: list[str]) -> None:
  """Copies the finished output to a bucket path; metadata.json goes last."""
  try:
    from etils import epath  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError(f"Writing to '{remote}' needs `etils[epath]` (pip install etils[epath]);"
                    f" the finished shards are in '{local}': copy them yourself.") from None
  dest = epath.Path(remote)
  dest.mkdir(parents=True, exist_ok=True)
  for name in names + [METADATA]:
    with open(os.path.join(local, name), "rb") as f:
      (dest / name).write_bytes(f.read())
