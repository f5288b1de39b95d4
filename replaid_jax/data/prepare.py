"""Raw corpora to tokenised, packed ArrayRecord shards (see docs/data_preparation.md).

The inputs are read in a fixed order, cut into *units* (groups of consecutive
input files, or of members of an OpenWebText archive). Each non-blank document
goes to the validation split when the hash of its text falls below
`val_fraction` (`is_validation`), else to the training split. Per split, the
documents, each followed by the tokenizer's end-of-sequence id, form one token
stream that is cut into rows of `seq_len` tokens, exactly as `pipeline.pack`
does for the same documents in the same order: the stream continues across
units and shards, and only the last partial row of each split is dropped.
Rows are stored `rows_per_shard` to a file (the last file of a split holds the
rest), one ArrayRecord record per row of little-endian uint16 (vocabularies of
at most 65,536 ids) or int32.

Output directory:
  train-00000.array_record, train-00001.array_record, ...
  validation-00000.array_record, ...
  metadata.json        written last; its presence marks the output complete.
  progress.json, progress-state-*.npz   only while preparation is unfinished.

Resuming: after each unit, its full shards are in place (each written to a
temporary name, then renamed), then the packing state (the unfinished row and
the rows of the unfinished shard) and `progress.json` are written atomically.
A rerun skips the units `progress.json` counts, deletes any shard past its
counts and any temporary file, and carries on, so the result is identical to an
uninterrupted run.
"""

import collections
import dataclasses
import functools
import hashlib
import io
import json
import multiprocessing
import os
import re
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import logging
import numpy as np

from replaid_jax import paths
from replaid_jax import progress as progress_lib
from replaid_jax.data import sources
from replaid_jax.errors import ConfigError, DataError

FORMAT_VERSION = 1
INPUT_FORMATS = ("text", "jsonl", "jsonl.zst", "owt")
TOKENIZER_KINDS = ("auto", "sentencepiece", "bpe")
SPLITS = ("train", "validation")
METADATA = "metadata.json"
PROGRESS = "progress.json"
# Default number of input files (archive members for owt) per unit.
DEFAULT_FILES_PER_UNIT = {"text": 256, "jsonl": 1, "jsonl.zst": 1, "owt": 64}
_SUFFIXES = {"text": (".txt",), "jsonl": (".jsonl",), "jsonl.zst": (".jsonl.zst", ".zst"),
             "owt": (".tar.xz", ".tar")}
# Documents are tokenised in batches of about this many characters.
_BATCH_CHARS = 4_000_000
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")
VAL_RULE = ("A non-blank document goes to validation iff u < val_fraction, where"
            " u = int.from_bytes(blake2b(utf8(text), digest_size=8,"
            " key=utf8(val_salt)).digest(), 'little') / 2**64.")


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  """What to prepare; each field is the flag of the same name in launch/prepare_data.py."""
  inputs: str  # comma-separated paths or globs
  output_dir: str  # local directory, or gs://... (written locally, then copied)
  tokenizer: str  # SentencePiece .model or Hugging Face tokenizer.json
  input_format: str = "text"  # one of INPUT_FORMATS
  tokenizer_kind: str = "auto"  # "auto" (by file suffix), "sentencepiece" or "bpe"
  eos_token: str = ""  # BPE only: end-of-sequence token; empty: <|endoftext|>, </s>, ...
  jsonl_field: str = "text"  # field holding the document in jsonl records
  split_paragraphs: bool = False  # text: one document per blank-line-separated block
  val_fraction: float = 0.005  # expected share of documents in the validation split
  val_salt: str = ""  # changes which documents are held out (the blake2b key)
  seq_len: int = 1024  # tokens per row
  rows_per_shard: int = 8192  # rows per ArrayRecord file
  files_per_unit: int = 0  # files (owt: archive members) per resumable unit; 0: format default
  array_record_options: str = "group_size:1"  # ArrayRecordWriter options (group_size:1 for random access)
  num_threads: int = 0  # tokenizer threads (SentencePiece); 0: all cores
  num_workers: int = 0  # tokenizer processes; 0 tokenises in this process
  log_every_seconds: float = 30.0  # period of progress log lines
  staging_dir: str = ""  # local directory for a gs://... output_dir; empty: under the temp dir
  overwrite: bool = False  # delete an existing or unfinished output in output_dir first


# ---- tokenizers.


def load_any_tokenizer(path: str, *, kind: str = "auto", eos_token: str = "",
                       what: str = "--tokenizer"):
  """Loads a SentencePiece `.model` or a BPE `tokenizer.json` (kind "auto": by suffix)."""
  if kind not in TOKENIZER_KINDS:
    raise ConfigError(f"--tokenizer_kind={kind!r} is unknown. Use one of {', '.join(TOKENIZER_KINDS)}.")
  if kind == "auto":
    kind = "bpe" if path.lower().endswith(".json") else "sentencepiece"
  if kind == "bpe":
    from replaid_jax.data import bpe  # pylint: disable=g-import-not-at-top
    return bpe.load_bpe_tokenizer(path, eos_token=eos_token, what=what)
  from replaid_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  if path.lower().endswith(".json"):
    raise ConfigError(f"{what}: '{path}' is a .json file but --tokenizer_kind=sentencepiece."
                      " Use --tokenizer_kind=bpe (or auto).")
  return tokenizer_lib.load_tokenizer(path, what=what)


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id fits in it, else int32 (both little-endian)."""
  return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<i4")


# ---- the validation rule.


def is_validation(text: str, *, val_fraction: float, val_salt: str = "") -> bool:
  """Whether a document belongs to the validation split (see VAL_RULE).

  The rule depends on the document's text only, so it is independent of the
  input order and sharding, and duplicates land in the same split.
  """
  if val_fraction <= 0.0:
    return False
  digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8,
                           key=val_salt.encode("utf-8")).digest()
  return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


# ---- input units.


@dataclasses.dataclass
class _Reading:
  """Bytes of the inputs consumed so far: finished files plus the open one's position."""
  done: int = 0
  current: Any = None

  def position(self) -> int:
    try:
      return self.done + (self.current.tell() if self.current is not None else 0)
    except (OSError, ValueError):
      return self.done


@dataclasses.dataclass
class _Unit:
  key: str  # identifies the unit's inputs (paths, member names)
  documents: Callable[[], Iterator[str]]  # its documents, in order
  skip: Callable[[], None]  # consumes the unit without reading it (owt)


def _decode(data: bytes, where: str) -> str:
  try:
    return data.decode("utf-8").removeprefix("\ufeff")
  except UnicodeDecodeError as e:
    raise DataError(
        f"{where}: not valid UTF-8 (first bad byte 0x{data[e.start]:02x} at byte offset"
        f" {e.start}). Re-encode it as UTF-8 or leave it out of --inputs.") from None


def _text_documents(text: str, split_paragraphs: bool) -> list[str]:
  if not split_paragraphs:
    return [text]
  return _PARAGRAPH_BREAK.split(text)


def _jsonl_documents(lines, where: str, field: str) -> Iterator[str]:
  for lineno, raw in enumerate(lines, start=1):
    if not raw.strip():
      continue
    line = _decode(raw, f"{where}:{lineno}")
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{where}:{lineno}: not valid JSON ({e.msg}). Each line must be one JSON"
                      " object; fix or remove the line.") from None
    if not isinstance(record, dict) or field not in record:
      present = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise DataError(f"{where}:{lineno}: no field '{field}' (--jsonl_field); found {present}."
                      " Set --jsonl_field to the field that holds the document text.")
    value = record[field]
    if not isinstance(value, str):
      raise DataError(f"{where}:{lineno}: field '{field}' (--jsonl_field) holds a"
                      f" {type(value).__name__}, not a string.")
    yield value


def _zstd_module():
  try:
    import zstandard  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError(
        "--input_format=jsonl.zst needs the `zstandard` package, which is not installed."
        " Install it with `pip install zstandard` (or `pip install -e .[prepare]`).") from None
  return zstandard


def _file_documents(path: str, cfg: PrepareConfig, reading: _Reading) -> Iterator[str]:
  """The documents of one text, jsonl or jsonl.zst file."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    reading.current = f
    if cfg.input_format == "text":
      yield from _text_documents(_decode(f.read(), path), cfg.split_paragraphs)
    elif cfg.input_format == "jsonl":
      yield from _jsonl_documents(f, path, cfg.jsonl_field)
    else:
      zstd = _zstd_module()
      reader = zstd.ZstdDecompressor().stream_reader(f, read_across_frames=True)
      try:
        yield from _jsonl_documents(io.BufferedReader(reader, 1 << 20), path, cfg.jsonl_field)
      except zstd.ZstdError as e:
        raise DataError(f"{path}: not a readable zstd file ({e}).") from None
  reading.current = None
  reading.done += size


def _owt_member_documents(data: bytes, where: str) -> Iterator[str]:
  """The .txt documents of one `urlsf_subset*.xz` member (an xz-compressed tar)."""
  try:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|xz") as inner:
      for member in inner:
        if member.isfile() and member.name.endswith(".txt"):
          yield _decode(inner.extractfile(member).read(), f"{where}:{member.name}")
  except (tarfile.TarError, EOFError, OSError) as e:  # lzma.LZMAError is an OSError
    raise DataError(f"{where}: not an xz-compressed tar of .txt files ({e}).") from None


def _owt_units(path: str, per_unit: int, reading: _Reading) -> Iterator[_Unit]:
  """Units of `per_unit` consecutive `*.xz` members of an OpenWebText archive, streamed."""
  size = os.path.getsize(path)
  mode = "r|xz" if path.lower().endswith(".xz") else "r|"
  with open(path, "rb") as f:
    reading.current = f
    try:
      with tarfile.open(fileobj=f, mode=mode) as outer:
        members = (m for m in outer if m.isfile() and m.name.endswith(".xz"))
        head = next(members, None)  # the next member not yet handed out
        if head is None:
          raise DataError(f"{path}: no *.xz member. --input_format=owt reads the released"
                          " openwebtext.tar.xz (openwebtext/urlsf_subset*.xz).")
        index = 0
        while head is not None:

          def unit_members():
            nonlocal head
            for _ in range(per_unit):
              if head is None:
                return
              # The archive is streamed: a member's data must be read (or is
              # skipped) before the next header is read.
              yield head
              head = next(members, None)

          taken = unit_members()

          def documents(taken=taken):
            for member in taken:
              data = outer.extractfile(member).read()
              yield from _owt_member_documents(data, f"{path}:{member.name}")

          def skip(taken=taken):
            for _ in taken:
              pass

          yield _Unit(key=f"{path}#{index}:{head.name}", documents=documents, skip=skip)
          skip()  # whatever the consumer left of this unit
          index += 1
    except (tarfile.TarError, EOFError) as e:
      raise DataError(f"{path}: not a readable tar archive ({e}).") from None
  reading.current = None
  reading.done += size


def _units(files: list[str], cfg: PrepareConfig, reading: _Reading) -> Iterator[_Unit]:
  per_unit = cfg.files_per_unit or DEFAULT_FILES_PER_UNIT[cfg.input_format]
  if cfg.input_format == "owt":
    for path in files:
      yield from _owt_units(path, per_unit, reading)
    return
  for start in range(0, len(files), per_unit):
    group = files[start:start + per_unit]

    def documents(group=group):
      for path in group:
        yield from _file_documents(path, cfg, reading)

    def skip(group=group):
      reading.done += sum(os.path.getsize(p) for p in group)

    yield _Unit(key="\n".join(group), documents=documents, skip=skip)


# ---- tokenising (in this process or in worker processes).

_WORKER_TOKENIZER = None


def _flatten(token_docs: Sequence[Sequence[int]], eos_id: int) -> np.ndarray:
  stream = np.empty(sum(len(d) for d in token_docs) + len(token_docs), np.int32)
  pos = 0
  for doc in token_docs:
    stream[pos:pos + len(doc)] = doc
    pos += len(doc)
    stream[pos] = eos_id
    pos += 1
  return stream


def _worker_init(path: str, kind: str, eos_token: str) -> None:
  global _WORKER_TOKENIZER
  _WORKER_TOKENIZER = load_any_tokenizer(path, kind=kind, eos_token=eos_token)


def _worker_encode(texts: list[str]) -> np.ndarray:
  tok = _WORKER_TOKENIZER
  return _flatten(tok.encode_batch(texts, num_threads=1), tok.eos_id)


class _Encoder:
  """Turns batches of documents into token streams (each doc followed by EOS), in order."""

  def __init__(self, tokenizer, cfg: PrepareConfig):
    self._tok = tokenizer
    self._threads = cfg.num_threads or os.cpu_count() or 1
    self._pool = None
    self._queue = collections.deque()
    if cfg.num_workers > 0:
      self._pool = multiprocessing.get_context("spawn").Pool(
          cfg.num_workers, initializer=_worker_init,
          initargs=(tokenizer.path, cfg.tokenizer_kind, cfg.eos_token))
      self._window = 2 * cfg.num_workers

  def submit(self, texts: list[str], done: Callable[[np.ndarray], None]) -> None:
    """Tokenises `texts`; `done(stream)` is called in submission order."""
    if self._pool is None:
      done(_flatten(self._tok.encode_batch(texts, num_threads=self._threads), self._tok.eos_id))
      return
    self._queue.append((self._pool.apply_async(_worker_encode, (texts,)), done))
    while len(self._queue) > self._window:
      result, callback = self._queue.popleft()
      callback(result.get())

  def drain(self) -> None:
    while self._queue:
      result, callback = self._queue.popleft()
      callback(result.get())

  def close(self) -> None:
    if self._pool is not None:
      self._pool.terminate()
      self._pool.join()
      self._pool = None


# ---- writing shards.


def shard_name(split: str, index: int) -> str:
  return f"{split}-{index:05d}.array_record"


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _fsync_dir(path: str) -> None:
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


class _SplitWriter:
  """Packs one split's token stream into rows and writes full shards as they fill."""

  def __init__(self, out_dir: str, split: str, cfg: PrepareConfig, dtype: np.dtype,
               state: dict | None, arrays: dict[str, np.ndarray] | None):
    self._dir, self._split, self._cfg, self._dtype = out_dir, split, cfg, dtype
    self._pending: list[np.ndarray] = []
    self._pending_rows = 0
    if state is None:
      self.stats = {"docs": 0, "doc_tokens": 0, "shards": 0, "rows_per_shard_file": []}
      self._carry = np.zeros(0, np.int32)
    else:
      self.stats = state
      self._carry = arrays[f"{split}_carry"].astype(np.int32)
      rows = arrays[f"{split}_pending"].astype(np.int32).reshape(-1, cfg.seq_len)
      if rows.shape[0]:
        self._pending, self._pending_rows = [rows], rows.shape[0]

  def add(self, stream: np.ndarray, n_docs: int) -> None:
    self.stats["docs"] += n_docs
    self.stats["doc_tokens"] += int(stream.size)
    stream = np.concatenate([self._carry, stream]) if self._carry.size else stream
    seq_len = self._cfg.seq_len
    n_rows = stream.size // seq_len
    self._carry = stream[n_rows * seq_len:].copy()
    if n_rows:
      self._pending.append(stream[:n_rows * seq_len].reshape(n_rows, seq_len))
      self._pending_rows += n_rows
    per_shard = self._cfg.rows_per_shard
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
    _write_shard(os.path.join(self._dir, shard_name(self._split, index)), rows, self._dtype,
                 self._cfg.array_record_options)
    self.stats["shards"] += 1
    self.stats["rows_per_shard_file"].append(int(rows.shape[0]))

  def state_arrays(self) -> dict[str, np.ndarray]:
    pending = (np.concatenate(self._pending) if self._pending
               else np.zeros((0, self._cfg.seq_len), np.int32))
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
        "tokens": rows * self._cfg.seq_len,
        "doc_tokens": self.stats["doc_tokens"],
        "tokens_dropped": int(self._carry.size),
    }


# ---- the output directory.

_OUR_FILES = re.compile(r"^(?:(?:train|validation)-\d{5}\.array_record|metadata\.json|progress\.json"
                        r"|progress-state-\d{6}\.npz)$")
_OUR_TEMP_FILES = re.compile(r"^\.(?:(?:train|validation)-\d{5}\.array_record|metadata\.json"
                             r"|progress\.json|progress-state-\d{6}\.npz)\.tmp$")


def _is_remote(path: str) -> bool:
  return "://" in path


def _local_dir(cfg: PrepareConfig) -> str:
  if not _is_remote(cfg.output_dir):
    return os.path.expanduser(cfg.output_dir)
  if cfg.staging_dir:
    return os.path.expanduser(cfg.staging_dir)
  key = hashlib.sha256(cfg.output_dir.encode()).hexdigest()[:16]
  return os.path.join(tempfile.gettempdir(), f"replaid-prepare-{key}")


def _clean(out_dir: str, *, everything: bool) -> None:
  """Deletes temporary files (and, if `everything`, all of our files) in `out_dir`."""
  for name in os.listdir(out_dir):
    if _OUR_TEMP_FILES.match(name) or (everything and _OUR_FILES.match(name)):
      os.remove(os.path.join(out_dir, name))


def _settings(cfg: PrepareConfig, tokenizer, files: list[str]) -> dict:
  """What must not change between an interrupted run and its resumption."""
  h = hashlib.sha256()
  for path in files:
    h.update(f"{os.path.abspath(path)}\0{os.path.getsize(path)}\n".encode())
  return {
      "version": FORMAT_VERSION,
      "input_format": cfg.input_format,
      "inputs_sha256": h.hexdigest(),
      "tokenizer_sha256": tokenizer.identity()["sha256"],
      "eos_id": int(tokenizer.eos_id),
      "jsonl_field": cfg.jsonl_field if cfg.input_format in ("jsonl", "jsonl.zst") else None,
      "split_paragraphs": cfg.split_paragraphs if cfg.input_format == "text" else None,
      "val_fraction": cfg.val_fraction,
      "val_salt": cfg.val_salt,
      "seq_len": cfg.seq_len,
      "rows_per_shard": cfg.rows_per_shard,
      "files_per_unit": cfg.files_per_unit or DEFAULT_FILES_PER_UNIT[cfg.input_format],
      "array_record_options": cfg.array_record_options,
  }


def _check_config(cfg: PrepareConfig) -> None:
  if cfg.input_format not in INPUT_FORMATS:
    raise ConfigError(f"--input_format={cfg.input_format!r} is unknown. Use one of"
                      f" {', '.join(INPUT_FORMATS)}.")
  if cfg.seq_len < 2:
    raise ConfigError(f"--seq_len={cfg.seq_len} is too short; use at least 2 (e.g. 1024).")
  if cfg.rows_per_shard < 1:
    raise ConfigError(f"--rows_per_shard={cfg.rows_per_shard} must be positive (e.g. 8192).")
  if not 0.0 <= cfg.val_fraction <= 1.0:
    raise ConfigError(f"--val_fraction={cfg.val_fraction} must lie in [0, 1] (0: no validation"
                      " split; 1: everything is validation, for a held-out corpus of its own).")
  if cfg.files_per_unit < 0 or cfg.num_workers < 0 or cfg.num_threads < 0:
    raise ConfigError("--files_per_unit, --num_workers and --num_threads must not be negative.")
  if not cfg.output_dir:
    raise ConfigError("--output_dir is empty. Name the directory that receives the shards.")
  if len(cfg.val_salt.encode()) > 64:
    raise ConfigError("--val_salt is longer than 64 bytes (the blake2b key limit); shorten it.")


def _publish(local: str, remote: str, names: list[str]) -> None:
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


def prepare(cfg: PrepareConfig, *, max_units: int | None = None) -> dict | None:
  """Tokenises, splits and packs `cfg.inputs` into shards under `cfg.output_dir`.

  Args:
    cfg: what to prepare.
    max_units: stop after completing this many units in this call (to test
      resumption); None runs to the end.

  Returns:
    The metadata (also in metadata.json), or None when stopped by `max_units`.
  """
  _check_config(cfg)
  tokenizer = load_any_tokenizer(cfg.tokenizer, kind=cfg.tokenizer_kind, eos_token=cfg.eos_token)
  files = sources._expand(cfg.inputs, what="--inputs", suffixes=_SUFFIXES[cfg.input_format])  # pylint: disable=protected-access
  if cfg.input_format == "jsonl.zst":
    _zstd_module()
  settings = _settings(cfg, tokenizer, files)
  out_dir = _local_dir(cfg)
  os.makedirs(out_dir, exist_ok=True)
  if cfg.overwrite:
    _clean(out_dir, everything=True)
  meta_path, progress_path = os.path.join(out_dir, METADATA), os.path.join(out_dir, PROGRESS)
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    if meta.get("settings") != settings:
      raise DataError(f"{cfg.output_dir} already holds data prepared with other settings or inputs."
                      " Use another --output_dir, or --overwrite to replace it.")
    for name in os.listdir(out_dir):  # left by a kill right after metadata.json was written
      if name == PROGRESS or name.startswith("progress-state-"):
        os.remove(os.path.join(out_dir, name))
    logging.info("%s is already complete; nothing to do.", cfg.output_dir)
    return meta
  _clean(out_dir, everything=False)

  progress = None
  if os.path.exists(progress_path):
    with open(progress_path) as f:
      progress = json.load(f)
    if progress.get("settings") != settings:
      raise DataError(f"{cfg.output_dir} holds an unfinished preparation with other settings or"
                      " inputs. Rerun it with the same flags, use another --output_dir, or pass"
                      " --overwrite to start again.")
  elif any(_OUR_FILES.match(n) for n in os.listdir(out_dir)):
    logging.info("Deleting the shards of a run that completed no unit in %s.", cfg.output_dir)
    _clean(out_dir, everything=True)
  dtype = token_dtype(tokenizer.vocab_size)
  arrays = None
  if progress:
    with np.load(os.path.join(out_dir, progress["state_file"])) as npz:
      arrays = {k: npz[k] for k in npz.files}
  writers = {split: _SplitWriter(out_dir, split, cfg, dtype,
                                 progress["splits"][split] if progress else None, arrays)
             for split in SPLITS}
  # Shards past the recorded counts come from a unit that did not complete.
  for name in os.listdir(out_dir):
    m = re.match(r"^(train|validation)-(\d{5})\.array_record$", name)
    if m and int(m.group(2)) >= writers[m.group(1)].stats["shards"]:
      os.remove(os.path.join(out_dir, name))
  units_done = progress["units_done"] if progress else 0
  chain = ""  # sha256 chain over the unit keys, recomputed over the skipped units
  total_bytes = sum(os.path.getsize(p) for p in files)
  if progress:
    logging.info("Resuming %s after %d completed units.", cfg.output_dir, units_done)

  reading = _Reading()
  encoder = _Encoder(tokenizer, cfg)
  start_time = last_log = time.monotonic()
  start_bytes = None
  run_units = run_chars = 0
  try:
    index = -1
    for index, unit in enumerate(_units(files, cfg, reading)):
      unit_chain = hashlib.sha256(f"{chain}\n{unit.key}".encode()).hexdigest()
      if index < units_done:
        unit.skip()
        chain = unit_chain
        if index == units_done - 1 and chain != progress["chain"]:
          raise DataError(f"The inputs of {cfg.output_dir} changed since the interrupted run"
                          " (its completed units differ). Pass --overwrite to start again.")
        continue
      if max_units is not None and run_units >= max_units:
        return None
      if start_bytes is None:
        start_bytes, start_time = reading.position(), time.monotonic()
        reporter = progress_lib.Progress(total_bytes, unit="MB", label="prepare", scale=1e6, start=start_bytes)
        reporter.update(start_bytes, start_time)  # no compilation here: the rate counts from the start
      batches = {split: ([], 0) for split in SPLITS}
      for doc in unit.documents():
        if not doc.strip():
          continue
        split = SPLITS[is_validation(doc, val_fraction=cfg.val_fraction, val_salt=cfg.val_salt)]
        texts, chars = batches[split]
        texts.append(doc)
        chars += len(doc)
        run_chars += len(doc)
        if chars >= _BATCH_CHARS:
          encoder.submit(texts, functools.partial(writers[split].add, n_docs=len(texts)))
          texts, chars = [], 0
        batches[split] = (texts, chars)
        now = time.monotonic()
        if now - last_log >= cfg.log_every_seconds:
          last_log = now
          _log_progress(reporter, reading.position(), now, now - start_time, run_chars, writers)
      for split, (texts, _) in batches.items():
        if texts:
          encoder.submit(texts, functools.partial(writers[split].add, n_docs=len(texts)))
      encoder.drain()
      chain = unit_chain
      units_done = index + 1
      run_units += 1
      _save_progress(out_dir, settings, units_done, chain, writers)
    if index + 1 < units_done:
      raise DataError(f"The inputs of {cfg.output_dir} changed since the interrupted run (fewer"
                      " units than completed before). Pass --overwrite to start again.")
  finally:
    encoder.close()

  meta = {
      "format": "replaid-arrayrecord",
      "version": FORMAT_VERSION,
      "seq_len": cfg.seq_len,
      "dtype": dtype.name,
      "vocab_size": int(tokenizer.vocab_size),
      "eos_id": int(tokenizer.eos_id),
      "tokenizer": tokenizer.identity(),
      "input_format": cfg.input_format,
      "source_files": [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)}
                       for p in files[:10_000]],
      "num_source_files": len(files),
      "source_bytes": total_bytes,
      "units": units_done,
      "val_fraction": cfg.val_fraction,
      "val_salt": cfg.val_salt,
      "val_rule": VAL_RULE,
      "packing": ("Per split, documents (each followed by eos_id) form one stream cut into rows"
                  " of seq_len across units and shards; only the last partial row is dropped."),
      "rows_per_shard": cfg.rows_per_shard,
      "settings": settings,
      "splits": {split: writers[split].finish() for split in SPLITS},
  }
  paths.write_bytes_atomic(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
  for name in os.listdir(out_dir):
    if name == PROGRESS or name.startswith("progress-state-"):
      os.remove(os.path.join(out_dir, name))
  if _is_remote(cfg.output_dir):
    _publish(out_dir, cfg.output_dir, [f for s in SPLITS for f in meta["splits"][s]["files"]])
  elapsed = max(time.monotonic() - start_time, 1e-9)
  for split in SPLITS:
    s = meta["splits"][split]
    logging.info("%s: %d docs, %d rows in %d files, %d tokens (%d dropped).", split, s["docs"],
                 s["rows"], len(s["files"]), s["tokens"], s["tokens_dropped"])
  read = reading.position() - (start_bytes or 0)
  logging.info("Done in %.1f s (this run: %.2f MB/s read, %.2f M chars/s): %s", elapsed,
               read / 1e6 / elapsed, run_chars / 1e6 / elapsed, cfg.output_dir)
  return meta


def _log_progress(progress: progress_lib.Progress, position: int, now: float, elapsed: float,
                  chars: int, writers: dict) -> None:
  progress.update(position, now)
  docs = sum(w.stats["docs"] for w in writers.values())
  tokens = sum(w.stats["doc_tokens"] for w in writers.values())
  logging.info("%s read; %.2f M chars/s, %d docs, %d tokens", progress.line(now=now),
               chars / 1e6 / max(elapsed, 1e-9), docs, tokens)


def _save_progress(out_dir: str, settings: dict, units_done: int, chain: str,
                   writers: dict) -> None:
  state_name = f"progress-state-{units_done:06d}.npz"
  arrays = {}
  for writer in writers.values():
    arrays.update(writer.state_arrays())
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  paths.write_bytes_atomic(os.path.join(out_dir, state_name), buf.getvalue())
  _fsync_dir(out_dir)  # the unit's shards and state are in place before progress.json counts them
  progress = {"settings": settings, "units_done": units_done, "chain": chain,
              "state_file": state_name,
              "splits": {split: w.stats for split, w in writers.items()}}
  paths.write_bytes_atomic(os.path.join(out_dir, PROGRESS), json.dumps(progress).encode())
  for name in os.listdir(out_dir):
    if name.startswith("progress-state-") and name.endswith(".npz") and name != state_name:
      os.remove(os.path.join(out_dir, name))
