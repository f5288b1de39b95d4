"""Reading the ArrayRecord shards written by `prepare` (launch/prepare_data.py).

`open_shards` returns a grain random-access source of int32 rows and the
directory's metadata; `train_iterator_from_shards` is `pipeline.train_iterator`
over such a source, without loading the split into memory; `read_split` loads a
small split whole (for `data.source="arrayrecord"`).
"""

import json
import os
from typing import Any

import grain
import numpy as np

from replaid_jax.data import batching
from replaid_jax.errors import ConfigError, DataError

METADATA = "metadata.json"
# Train rows read for the unigram counts when the train split is streamed.
UNIGRAM_SAMPLE_ROWS = 16384
_SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation"}


def read_metadata(directory: str) -> dict:
  """The metadata.json of a prepared directory, with DataErrors naming the fix."""
  directory = os.path.expanduser(directory)
  if not os.path.isdir(directory):
    raise DataError(
        f"No prepared data directory at '{directory}'. Prepare one with"
        " `python launch/prepare_data.py --inputs=... --tokenizer=... --output_dir="
        f"{directory}`, or fix the path.")
  path = os.path.join(directory, METADATA)
  if not os.path.isfile(path):
    unfinished = os.path.exists(os.path.join(directory, "progress.json"))
    raise DataError(
        f"'{directory}' has no {METADATA}"
        + (": its preparation is unfinished. Rerun the same launch/prepare_data.py command to"
           " complete it." if unfinished else
           ", so it is not a complete prepared directory. Point at the --output_dir of a"
           " finished launch/prepare_data.py run."))
  with open(path) as f:
    try:
      meta = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: not valid JSON ({e.msg}). Prepare the directory again.") from None
  if meta.get("format") != "replaid-arrayrecord":
    raise DataError(f"{path}: not written by launch/prepare_data.py (no format"
                    " 'replaid-arrayrecord').")
  return meta


def check_metadata(meta: dict, *, directory: str, seq_len: int | None = None,
                   tokenizer_sha256: str | None = None) -> None:
  """Raises DataError when the prepared data do not match the config."""
  if seq_len is not None and meta["seq_len"] != seq_len:
    raise DataError(
        f"'{directory}' holds rows of {meta['seq_len']} tokens but data.seq_len is {seq_len}."
        f" Set data.seq_len={meta['seq_len']}, or prepare the data again with"
        f" --seq_len={seq_len}.")
  recorded = (meta.get("tokenizer") or {}).get("sha256")
  if tokenizer_sha256 is not None and recorded != tokenizer_sha256:
    raise DataError(
        f"'{directory}' was tokenised with another tokenizer (sha256 {str(recorded)[:12]}...,"
        f" {meta.get('tokenizer', {}).get('path')}) than the configured one (sha256"
        f" {tokenizer_sha256[:12]}...). Use the tokenizer the data were prepared with, or"
        " prepare them again with yours.")


class ShardRows:
  """A grain random-access data source of int32 [seq_len] rows over ArrayRecord shards.

  Picklable (grain worker processes reopen the files).
  """

  def __init__(self, paths: list[str], *, seq_len: int, dtype: str):
    self._source = grain.sources.ArrayRecordDataSource(paths)
    self._seq_len = seq_len
    self._dtype = np.dtype(dtype).newbyteorder("<")
    self._paths = paths

  def __len__(self) -> int:
    return len(self._source)

  def _decode(self, record: bytes) -> np.ndarray:
    row = np.frombuffer(record, dtype=self._dtype)
    if row.size != self._seq_len:
      raise DataError(f"A record of {self._paths[0]}... holds {row.size} tokens, not"
                      f" seq_len={self._seq_len}: the shards are corrupt. Prepare them again.")
    return row.astype(np.int32)

  def __getitem__(self, index: int) -> np.ndarray:
    return self._decode(self._source[int(index)])

  def __getitems__(self, indices) -> list[np.ndarray]:
    return [self._decode(r) for r in self._source.__getitems__([int(i) for i in indices])]

  def read_rows(self, indices) -> np.ndarray:
    """int32 [len(indices), seq_len]."""
    if not len(indices):
      return np.zeros((0, self._seq_len), np.int32)
    return np.stack(self.__getitems__(indices))

  def __repr__(self) -> str:
    return f"ShardRows({len(self._paths)} files, {len(self)} rows of {self._seq_len})"


def open_shards(directory: str, split: str, *, seq_len: int | None = None,
                tokenizer_sha256: str | None = None) -> tuple[ShardRows, dict]:
  """A source of one split's rows and the directory's metadata.

  Args:
    directory: the --output_dir of launch/prepare_data.py (local).
    split: "train" or "validation" ("val" is accepted).
    seq_len: when given, must equal the prepared rows' length.
    tokenizer_sha256: when given, must equal the recorded tokenizer's sha256.
  """
  if split not in _SPLIT_NAMES:
    raise ValueError(f"split must be one of {sorted(_SPLIT_NAMES)}, got {split!r}.")
  split = _SPLIT_NAMES[split]
  directory = os.path.expanduser(directory)
  meta = read_metadata(directory)
  check_metadata(meta, directory=directory, seq_len=seq_len, tokenizer_sha256=tokenizer_sha256)
  info = meta["splits"][split]
  if not info["rows"]:
    raise DataError(
        f"'{directory}' has no {split} rows ({info['docs']} documents,"
        f" {info['tokens_dropped']} tokens, seq_len {meta['seq_len']})."
        + (" Prepare it again with --val_fraction > 0." if split == "validation" else
           " Prepare more text, or a shorter --seq_len."))
  paths = [os.path.join(directory, name) for name in info["files"]]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise DataError(f"'{directory}': {len(missing)} {split} shard(s) listed in {METADATA} are"
                    f" missing, e.g. {missing[0]}. Copy the whole directory, or prepare it again.")
  source = ShardRows(paths, seq_len=meta["seq_len"], dtype=meta["dtype"])
  if len(source) != info["rows"]:
    raise DataError(f"'{directory}': the {split} shards hold {len(source)} rows but {METADATA}"
                    f" records {info['rows']}. The directory is inconsistent; prepare it again.")
  return source, meta


def read_split(directory: str, split: str, *, seq_len: int | None = None,
               tokenizer_sha256: str | None = None,
               max_bytes: int = 4 << 30) -> tuple[np.ndarray, dict]:
  """Loads a whole split as int32 [rows, seq_len] (refused above `max_bytes`)."""
  source, meta = open_shards(directory, split, seq_len=seq_len, tokenizer_sha256=tokenizer_sha256)
  size = len(source) * meta["seq_len"] * 4
  if size > max_bytes:
    raise DataError(
        f"The {split} split of '{directory}' takes {size / 2**30:.1f} GiB as int32, more than"
        f" {max_bytes / 2**30:.1f} GiB to load into memory. Stream it with"
        " arrayrecord.train_iterator_from_shards instead.")
  rows = np.empty((len(source), meta["seq_len"]), np.int32)
  chunk = 4096
  for start in range(0, len(source), chunk):
    stop = min(start + chunk, len(source))
    rows[start:stop] = source.read_rows(range(start, stop))
  return rows, meta


class _ReadRows(grain.transforms.Map):
  """Maps a batch of row indices to {"tokens": rows}; picklable for workers."""

  def __init__(self, source: ShardRows):
    self.source = source

  def map(self, element: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": self.source.read_rows(element)}


def train_iterator_from_shards(directory: str, *, global_batch: int, seed: int,
                               process_index: int, process_count: int, num_workers: int,
                               seq_len: int | None = None,
                               tokenizer_sha256: str | None = None) -> grain.DatasetIterator:
  """`pipeline.train_iterator` over the train shards of `directory`.

  Same order, batches and state as `pipeline.train_iterator(rows, ...)` when
  `rows` is the whole train split in memory: rows are shuffled with `seed`,
  reshuffled every epoch, and process `p` receives rows [p * b, (p + 1) * b)
  of each global batch (b = global_batch // process_count) as
  {"tokens": int32 [b, seq_len]}, read from the shards on demand. Supports
  get_state() / set_state() and grain.checkpoint; a state is only valid for the
  same num_workers. With num_workers > 0, call close() when done.
  """
  batching.check_batching(global_batch=global_batch, process_index=process_index, process_count=process_count,
                          num_workers=num_workers)
  source, _ = open_shards(directory, "train", seq_len=seq_len, tokenizer_sha256=tokenizer_sha256)
  if len(source) < global_batch:
    raise DataError(
        f"The training split of '{directory}' has {len(source)} sequences, fewer than one"
        f" global batch of {global_batch}. Prepare more data, or lower train.batch_size.")

  return batching.batch_iterator(len(source), _ReadRows(source), global_batch=global_batch, seed=seed,
                                 process_index=process_index, process_count=process_count, num_workers=num_workers)


def sample_rows(source: ShardRows, max_rows: int) -> np.ndarray:
  """int32 [min(len, max_rows), seq_len]: evenly spaced rows of `source` (all of them when few)."""
  n = min(len(source), max_rows)
  return source.read_rows(np.linspace(0, len(source) - 1, n).round().astype(np.int64).tolist())


def load_splits(cfg: Any, *, stream_train: bool = False):
  """The `data.source="arrayrecord"` reader for `pipeline.load_corpus`.

  data.train_files names the prepared directory; data.val_files another
  prepared directory for validation, or empty for the same one. The tokenizer
  is data.tokenizer_path when set (its sha256 must match), else the recorded
  one when its file still exists. Both splits are loaded into memory, except
  with `stream_train`: then the train entry holds `sample_rows(train,
  UNIGRAM_SAMPLE_ROWS)` instead of the whole split.

  Returns:
    (tokenizer or None, vocab_size, {split: (rows, tokens dropped)},
     {split: docs}, {split: origin}), as pipeline's other sources.
  """
  from replaid_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  directory = cfg.train_files.strip()
  if not directory:
    raise ConfigError(
        "data.train_files is empty, but data.source='arrayrecord' reads a directory prepared"
        " by launch/prepare_data.py. Set data.train_files to that --output_dir.")
  val_dir = cfg.val_files.strip() or directory
  tokenizer = None
  if cfg.tokenizer_path:
    tokenizer = tokenizer_lib.load_tokenizer(cfg.tokenizer_path)
  else:
    recorded = read_metadata(directory).get("tokenizer") or {}
    path, what = recorded.get("path"), f"{directory}/{METADATA}"
    if path and os.path.isfile(path) and recorded.get("kind") == "bpe":
      from replaid_jax.data import bpe  # pylint: disable=g-import-not-at-top
      tokenizer = bpe.load_bpe_tokenizer(path, eos_token=recorded.get("eos_token", ""), what=what)
    elif path and os.path.isfile(path):
      tokenizer = tokenizer_lib.load_tokenizer(path, what=what)
  sha = tokenizer.identity()["sha256"] if tokenizer else None
  if stream_train:
    source, meta = open_shards(directory, "train", seq_len=cfg.seq_len, tokenizer_sha256=sha)
    train = sample_rows(source, UNIGRAM_SAMPLE_ROWS)
  else:
    train, meta = read_split(directory, "train", seq_len=cfg.seq_len, tokenizer_sha256=sha)
  val, val_meta = read_split(val_dir, "validation", seq_len=cfg.seq_len,
                             tokenizer_sha256=sha or meta["tokenizer"]["sha256"])
  packed = {"train": (train, meta["splits"]["train"]["tokens_dropped"]),
            "val": (val, val_meta["splits"]["validation"]["tokens_dropped"])}
  n_docs = {"train": meta["splits"]["train"]["docs"],
            "val": val_meta["splits"]["validation"]["docs"]}
  origins = {"train": f"{directory} (train)", "val": f"{val_dir} (validation)"}
  return tokenizer, int(meta["vocab_size"]), packed, n_docs, origins
