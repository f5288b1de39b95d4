"""From the `data` config to packed token rows and a checkpointable batch iterator."""

import dataclasses
import os
from typing import Any

import grain
import numpy as np

from replaid_jax.data import arrayrecord
from replaid_jax.data import batching
from replaid_jax.data import sources
from replaid_jax.data.tokenizer import Tokenizer, default_cache_dir, load_tokenizer, train_or_load_tokenizer
from replaid_jax.errors import ConfigError, DataError

SOURCES = ("shakespeare", "text", "npy", "arrayrecord")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The `data` section of the config (see replaid_jax/base_config.py for each field)."""
  source: str
  train_files: str
  val_files: str
  jsonl_field: str
  val_plays: str
  tokenizer_path: str
  tokenizer_type: str
  tokenizer_vocab_size: int
  npy_vocab_size: int | None
  cache_dir: str
  seq_len: int
  num_workers: int


@dataclasses.dataclass
class Corpus:
  """Both splits packed into rows, with what the model and the logs need."""
  train: np.ndarray | None  # int32 [N_train, seq_len]; None when streamed from train_shards
  val: np.ndarray  # int32 [N_val, seq_len]
  vocab_size: int
  tokenizer: Tokenizer | None  # None for npy data without data.tokenizer_path
  unigram_counts: np.ndarray  # float64 [vocab_size], counts of the train rows' tokens
  # JSON-able summary: source, seq_len, vocab_size, tokenizer (identity or
  # None) and per split: <split>_docs (None for npy), <split>_rows,
  # <split>_tokens (in rows) and <split>_tokens_dropped (by packing).
  info: dict
  # The prepared ArrayRecord directory whose train split is read on demand
  # (arrayrecord.train_iterator_from_shards) instead of held in `train`.
  train_shards: str | None = None


def pack(token_docs: list[list[int]], *, eos_id: int, seq_len: int) -> tuple[np.ndarray, int]:
  """Concatenates documents, each followed by `eos_id`, into rows of `seq_len`.

  Returns:
    (rows, n_dropped): int32 [n_rows, seq_len] and the number of tokens left
    over at the end, which do not fill a row and are dropped.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be positive, got {seq_len}.")
  return _cut(sources.join_documents(token_docs, eos_id), seq_len)


def _cut(stream: np.ndarray, seq_len: int) -> tuple[np.ndarray, int]:
  n_rows = stream.size // seq_len
  rows = stream[:n_rows * seq_len].reshape(n_rows, seq_len).astype(np.int32)
  return rows, int(stream.size - rows.size)


def _split_names(spec: str) -> list[str]:
  return [name.strip() for name in spec.split(",") if name.strip()]


def _text_tokenizer(cfg: DataConfig, train_docs: list[str], workdir: str) -> Tokenizer:
  if cfg.tokenizer_path:
    return load_tokenizer(cfg.tokenizer_path)
  # Trained once per corpus and settings in the user's cache; each run keeps its own copy in its workdir.
  return train_or_load_tokenizer(
      train_docs, vocab_size=cfg.tokenizer_vocab_size,
      model_type=cfg.tokenizer_type, cache_dir=cfg.cache_dir or default_cache_dir(),
      # A bucket workdir records the cached model's path and sha256 instead of a copy.
      copy_to=os.path.join(workdir, "tokenizer") if workdir and "://" not in workdir else None)


def _require_files(cfg: DataConfig) -> None:
  for key in ("train_files", "val_files"):
    if not getattr(cfg, key).strip():
      raise ConfigError(
          f"data.{key} is empty, but data.source='{cfg.source}' reads files."
          f" Set data.{key} to comma-separated paths or globs; {cfg.source}"
          " sources need both data.train_files and data.val_files (the"
          " validation split is never carved out of the training files).")


def _check_rows(rows: np.ndarray, dropped: int, *, split: str, origin: str,
                seq_len: int) -> None:
  if not rows.shape[0]:
    raise DataError(
        f"The {split} split ({origin}) has {dropped} tokens, fewer than"
        f" data.seq_len={seq_len}, so it yields no sequence. Add more"
        f" {split} text or lower data.seq_len.")


# What each source hands to `load_corpus`: the tokenizer (or None), the vocab
# size and, per split, (rows, tokens dropped), the document count and where the
# split comes from (for error messages).
_Splits = tuple[Tokenizer | None, int, dict[str, tuple[np.ndarray, int]],
                dict[str, int | None], dict[str, str]]


def _load_npy(cfg: DataConfig) -> _Splits:
  _require_files(cfg)
  streams = {split: sources.read_token_arrays(getattr(cfg, f"{split}_files"),
                                              vocab_size=cfg.npy_vocab_size,
                                              what=f"data.{split}_files")
             for split in ("train", "val")}
  vocab_size = cfg.npy_vocab_size
  assert vocab_size is not None  # read_token_arrays checked it.
  tokenizer = None
  if cfg.tokenizer_path:
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    if tokenizer.vocab_size != vocab_size:
      raise DataError(
          f"data.tokenizer_path: '{cfg.tokenizer_path}' has"
          f" {tokenizer.vocab_size} pieces but data.npy_vocab_size is"
          f" {vocab_size}. Use the tokenizer that produced the .npy files,"
          " or set data.npy_vocab_size to match it.")
  packed = {split: _cut(stream, cfg.seq_len) for split, stream in streams.items()}
  n_docs = {"train": None, "val": None}  # token streams have no documents
  origins = {"train": "data.train_files", "val": "data.val_files"}
  return tokenizer, vocab_size, packed, n_docs, origins


def _load_text(cfg: DataConfig, workdir: str) -> _Splits:
  if cfg.source == "shakespeare":
    for key in ("train_files", "val_files"):
      if getattr(cfg, key).strip():
        raise ConfigError(
            f"data.{key} is set but data.source='shakespeare' uses the"
            " embedded plays. Set data.source='text' (or 'npy') to read"
            f" files, or clear data.{key}.")
    train_docs, val_docs = sources.shakespeare_split(_split_names(cfg.val_plays))
    origins = {"train": "the plays not in data.val_plays", "val": "data.val_plays"}
  else:
    _require_files(cfg)
    train_docs = sources.read_text_files(
        cfg.train_files, jsonl_field=cfg.jsonl_field, what="data.train_files")
    val_docs = sources.read_text_files(
        cfg.val_files, jsonl_field=cfg.jsonl_field, what="data.val_files")
    origins = {"train": "data.train_files", "val": "data.val_files"}
  tokenizer = _text_tokenizer(cfg, train_docs, workdir)
  packed = {split: pack(tokenizer.encode_batch(docs), eos_id=tokenizer.eos_id,
                        seq_len=cfg.seq_len)
            for split, docs in (("train", train_docs), ("val", val_docs))}
  n_docs = {"train": len(train_docs), "val": len(val_docs)}
  return tokenizer, tokenizer.vocab_size, packed, n_docs, origins


def load_corpus(cfg: DataConfig, *, workdir: str, stream_train: bool = False) -> Corpus:
  """Reads, tokenises and packs the train and validation splits named by `cfg`.

  With `stream_train` and data.source="arrayrecord", the train split stays in
  its shards: `train` is None, `train_shards` names the directory, and the
  unigram counts come from an evenly spaced sample of at most
  arrayrecord.UNIGRAM_SAMPLE_ROWS train rows (all rows of a smaller split),
  scaled to the split's size. Other sources ignore it.
  """
  if cfg.source not in SOURCES:
    raise ConfigError(
        f"data.source='{cfg.source}' is unknown. Use one of:"
        f" {', '.join(SOURCES)}.")
  if cfg.seq_len < 2:
    raise DataError(
        f"data.seq_len={cfg.seq_len} is too short: a sequence needs at least"
        " 2 tokens. Set data.seq_len >= 2 (e.g. 128).")
  if cfg.source == "npy":
    tokenizer, vocab_size, packed, n_docs, origins = _load_npy(cfg)
  elif cfg.source == "arrayrecord":
    # Shards written by launch/prepare_data.py: loaded whole, or (stream_train) a sample of the train rows.
    tokenizer, vocab_size, packed, n_docs, origins = arrayrecord.load_splits(cfg, stream_train=stream_train)
  else:
    tokenizer, vocab_size, packed, n_docs, origins = _load_text(cfg, workdir)

  info: dict[str, Any] = {"source": cfg.source, "seq_len": cfg.seq_len,
                          "vocab_size": vocab_size}
  for split, (rows, dropped) in packed.items():
    _check_rows(rows, dropped, split=split, origin=origins[split], seq_len=cfg.seq_len)
    info[f"{split}_docs"] = n_docs[split]
    info[f"{split}_rows"] = int(rows.shape[0])
    info[f"{split}_tokens"] = int(rows.size)
    info[f"{split}_tokens_dropped"] = dropped
  info["tokenizer"] = tokenizer.identity() if tokenizer else None
  train, val = packed["train"][0], packed["val"][0]
  counts = np.bincount(train.reshape(-1), minlength=vocab_size).astype(np.float64)
  train_shards = None
  if cfg.source == "arrayrecord" and stream_train:
    train_shards = cfg.train_files.strip()
    split = arrayrecord.read_metadata(train_shards)["splits"]["train"]
    counts *= split["rows"] / train.shape[0]
    info.update(train_rows=int(split["rows"]), train_tokens=int(split["tokens"]),
                train_unigram_sample_rows=int(train.shape[0]))
    train = None
  return Corpus(train=train, val=val, vocab_size=vocab_size, tokenizer=tokenizer,
                unigram_counts=counts, info=info, train_shards=train_shards)


class _GatherRows(grain.transforms.Map):
  """Maps a batch of row indices to {"tokens": rows}; picklable for workers."""

  def __init__(self, tokens: np.ndarray):
    self.tokens = tokens

  def map(self, element: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": self.tokens[element]}


def train_iterator(tokens: np.ndarray, *, global_batch: int, seed: int, process_index: int,
                   process_count: int, num_workers: int) -> grain.DatasetIterator:
  """An endless, checkpointable iterator over shuffled training rows.

  Rows are shuffled with `seed`, reshuffled every epoch, and streamed as
  global batches of `global_batch` rows; process `p` receives rows
  [p * b, (p + 1) * b) of each global batch, b = global_batch // process_count,
  as {"tokens": int32 [b, seq_len]}. The iterator supports get_state() /
  set_state() and grain.checkpoint.CheckpointSave / CheckpointRestore. A state
  is only valid for the same num_workers. With num_workers > 0, call close()
  when done to stop the worker processes.
  """
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [rows, seq_len], got shape {tokens.shape}.")
  batching.check_batching(global_batch=global_batch, process_index=process_index, process_count=process_count,
                          num_workers=num_workers)
  if tokens.shape[0] < global_batch:
    raise DataError(
        f"The training split has {tokens.shape[0]} sequences, fewer than one"
        f" global batch of {global_batch}. Add training data, lower"
        " data.seq_len, or lower train.batch_size.")

  return batching.batch_iterator(
      tokens.shape[0], _GatherRows(np.ascontiguousarray(tokens, dtype=np.int32)), global_batch=global_batch,
      seed=seed, process_index=process_index, process_count=process_count, num_workers=num_workers)
