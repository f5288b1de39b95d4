"""The shards of data preparation (`prepare.py`): token streams packed into rows and written.

`SplitWriter` cuts one split's token stream into rows of `seq_len` tokens and
writes them `rows_per_shard` to an ArrayRecord file, one record per row; each
file is written to a temporary name and renamed into place when complete.
"""

import os

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id fits in it, else int32 (both little-endian)."""
  return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<i4")


def shard_name(split: str, index: int) -> str:
  return f"{split}-{index:05d}.array_record"


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def fsync_dir(path: str) -> None:
  """Makes the renames in directory `path` durable."""
  fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _write_shard(path: str, rows: np.ndarray, dtype: np.dtype, options: str) -> None:
  """Writes one record per row to a temporary file, then renames it to `path`."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
  writer = array_record_module.ArrayRecordWriter(tmp, options)
  for row in rows.astype(dtype, copy=False):
    writer.write(row.tobytes())
  writer.close()
  _fsync(tmp)
  os.replace(tmp, path)


class SplitWriter:
  """Packs one split's token stream into rows and writes full shards as they fill."""

  def __init__(self, out_dir: str, split: str, *, seq_len: int, rows_per_shard: int, options: str,
               dtype: np.dtype, state: dict | None, arrays: dict[str, np.ndarray] | None):
    """Starts the split afresh, or continues it from a saved state.

    Args:
      out_dir: the directory that receives the shards.
      split: the split's name, the prefix of its file names.
      seq_len: tokens per row.
      rows_per_shard: rows per file (the last file of the split holds the rest).
      options: ArrayRecordWriter options.
      dtype: the dtype of the stored tokens (`token_dtype`).
      state: the saved `stats`; None starts afresh.
      arrays: the saved `state_arrays()` of every split, with `state`.
    """
    self._dir, self._split, self._dtype = out_dir, split, dtype
    self._seq_len, self._rows_per_shard, self._options = seq_len, rows_per_shard, options
    self._pending: list[np.ndarray] = []
    self._pending_rows = 0
    if state is None:
      self.stats = {"docs": 0, "doc_tokens": 0, "shards": 0, "rows_per_shard_file": []}
      self._carry = np.zeros(0, np.int32)
    else:
      self.stats = state
      self._carry = arrays[f"{split}_carry"].astype(np.int32)
      rows = arrays[f"{split}_pending"].astype(np.int32).reshape(-1, seq_len)
      if rows.shape[0]:
        self._pending, self._pending_rows = [rows], rows.shape[0]

  def add(self, stream: np.ndarray, n_docs: int) -> None:
    self.stats["docs"] += n_docs
    self.stats["doc_tokens"] += int(stream.size)
    stream = np.concatenate([self._carry, stream]) if self._carry.size else stream
    seq_len = self._seq_len
    n_rows = stream.size // seq_len
    self._carry = stream[n_rows * seq_len:].copy()
    if n_rows:
      self._pending.append(stream[:n_rows * seq_len].reshape(n_rows, seq_len))
      self._pending_rows += n_rows
    per_shard = self._rows_per_shard
    if self._pending_rows >= per_shard:
      rows = np.concatenate(self._pending)
      full = rows.shape[0] // per_shard * per_shard
      for start in range(0, full, per_shard):
        self._write(rows[start:start + per_shard])
      rest = rows[full:]
      self._pending = [rest] if rest.shape[0] else []
      self._pending_rows = rest.shape[0]

  def _write(self, rows: np.ndarray) -> None:
    index = self.stats["shards"]
    _write_shard(os.path.join(self._dir, shard_name(self._split, index)), rows, self._dtype, self._options)
    self.stats["shards"] += 1
    self.stats["rows_per_shard_file"].append(int(rows.shape[0]))

  def state_arrays(self) -> dict[str, np.ndarray]:
    pending = (np.concatenate(self._pending) if self._pending
               else np.zeros((0, self._seq_len), np.int32))
    return {f"{self._split}_carry": self._carry, f"{self._split}_pending": pending}

  def finish(self) -> dict:
    """Writes the last, partial shard; returns the split's metadata."""
    if self._pending_rows:
      self._write(np.concatenate(self._pending))
      self._pending, self._pending_rows = [], 0
    rows = int(sum(self.stats["rows_per_shard_file"]))
    return {
        "files": [shard_name(self._split, i) for i in range(self.stats["shards"])],
        "rows_per_file": list(self.stats["rows_per_shard_file"]),
        "rows": rows,
        "docs": self.stats["docs"],
        "tokens": rows * self._seq_len,
        "doc_tokens": self.stats["doc_tokens"],
        "tokens_dropped": int(self._carry.size),
    }
