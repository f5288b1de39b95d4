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

This module checks the configuration and runs the steps; `prepare_inputs` reads
the inputs, `prepare_tokens` tokenises, `prepare_shards` packs and writes the
shards and `prepare_output` keeps the output directory.
"""

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any

from absl import logging
import numpy as np

from replaid_jax import paths
from replaid_jax import progress as progress_lib
from replaid_jax.data import prepare_inputs
from replaid_jax.data import prepare_output
from replaid_jax.data import prepare_shards
from replaid_jax.data import prepare_tokens
from replaid_jax.errors import ConfigError, DataError

FORMAT_VERSION = 1
INPUT_FORMATS = ("text", "jsonl", "jsonl.zst", "owt")
SPLITS = ("train", "validation")
# Default number of input files (archive members for owt) per unit.
DEFAULT_FILES_PER_UNIT = {"text": 256, "jsonl": 1, "jsonl.zst": 1, "owt": 64}
# Documents are tokenised in batches of about this many characters.
_BATCH_CHARS = 4_000_000
VAL_RULE = ("A non-blank document goes to validation iff u < val_fraction, where"
            " u = int.from_bytes(blake2b(utf8(text), digest_size=8,"
            " key=utf8(val_salt)).digest(), 'little') / 2**64.")

# The tokenizer, the output files and the shard layout, part of this module's interface.
TOKENIZER_KINDS = prepare_tokens.TOKENIZER_KINDS
load_any_tokenizer = prepare_tokens.load_any_tokenizer
METADATA = prepare_output.METADATA
PROGRESS = prepare_output.PROGRESS
token_dtype = prepare_shards.token_dtype
shard_name = prepare_shards.shard_name


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


# ---- the settings of a run.


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


# ---- preparing: set up, run the units, finish.


@dataclasses.dataclass
class _Run:
  """One call of `prepare`: its inputs, its output and how far it got."""
  cfg: PrepareConfig
  tokenizer: Any
  files: list[str]
  total_bytes: int  # of the files
  settings: dict  # see _settings
  out_dir: str  # the local output directory
  dtype: np.dtype
  writers: dict[str, prepare_shards.SplitWriter]
  units_done: int = 0
  chain: str = ""  # sha256 chain over the unit keys, recomputed over the skipped units
  saved_chain: str = ""  # the chain that progress.json recorded for its completed units
  reading: prepare_inputs.Reading = dataclasses.field(default_factory=prepare_inputs.Reading)
  start_time: float = 0.0
  start_bytes: int | None = None  # where this call's first unit began; None before it
  reporter: progress_lib.Progress | None = None
  last_log: float = 0.0
  run_chars: int = 0  # characters of documents read by this call


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
  files = prepare_inputs.input_files(cfg.inputs, cfg.input_format)
  if cfg.input_format == "jsonl.zst":
    prepare_inputs.zstd_module()
  settings = _settings(cfg, tokenizer, files)
  out_dir = prepare_output.local_dir(cfg.output_dir, cfg.staging_dir)
  meta = _open_output(cfg, out_dir, settings)
  if meta is not None:
    return meta
  run = _resume(cfg, tokenizer, files, settings, out_dir)
  if not _run_units(run, max_units):
    return None
  return _finish(run)


def _open_output(cfg: PrepareConfig, out_dir: str, settings: dict) -> dict | None:
  """Creates `out_dir` and clears what a new run must not keep; returns its metadata if complete."""
  os.makedirs(out_dir, exist_ok=True)
  if cfg.overwrite:
    prepare_output.clean(out_dir, everything=True)
  meta_path = os.path.join(out_dir, METADATA)
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    if meta.get("settings") != settings:
      raise DataError(f"{cfg.output_dir} already holds data prepared with other settings or inputs."
                      " Use another --output_dir, or --overwrite to replace it.")
    prepare_output.remove_progress(out_dir)  # left by a kill right after metadata.json was written
    logging.info("%s is already complete; nothing to do.", cfg.output_dir)
    return meta
  prepare_output.clean(out_dir, everything=False)
  return None


def _resume(cfg: PrepareConfig, tokenizer, files: list[str], settings: dict, out_dir: str) -> _Run:
  """The run, continuing the interrupted one in `out_dir` if there is one."""
  progress = None
  if os.path.exists(os.path.join(out_dir, PROGRESS)):
    with open(os.path.join(out_dir, PROGRESS)) as f:
      progress = json.load(f)
    if progress.get("settings") != settings:
      raise DataError(f"{cfg.output_dir} holds an unfinished preparation with other settings or"
                      " inputs. Rerun it with the same flags, use another --output_dir, or pass"
                      " --overwrite to start again.")
  elif prepare_output.holds_our_files(out_dir):
    logging.info("Deleting the shards of a run that completed no unit in %s.", cfg.output_dir)
    prepare_output.clean(out_dir, everything=True)
  dtype = token_dtype(tokenizer.vocab_size)
  writers = _open_writers(cfg, out_dir, dtype, progress)
  run = _Run(cfg=cfg, tokenizer=tokenizer, files=files, total_bytes=sum(os.path.getsize(p) for p in files),
             settings=settings, out_dir=out_dir, dtype=dtype, writers=writers)
  if progress:
    run.units_done, run.saved_chain = progress["units_done"], progress["chain"]
    logging.info("Resuming %s after %d completed units.", cfg.output_dir, run.units_done)
  return run


def _open_writers(cfg: PrepareConfig, out_dir: str, dtype: np.dtype,
                  progress: dict | None) -> dict[str, prepare_shards.SplitWriter]:
  """The split writers, at the state that `progress` recorded (None: empty)."""
  arrays = None
  if progress:
    with np.load(os.path.join(out_dir, progress["state_file"])) as npz:
      arrays = {k: npz[k] for k in npz.files}
  writers = {}
  for split in SPLITS:
    writers[split] = prepare_shards.SplitWriter(
        out_dir, split, seq_len=cfg.seq_len, rows_per_shard=cfg.rows_per_shard,
        options=cfg.array_record_options, dtype=dtype,
        state=progress["splits"][split] if progress else None, arrays=arrays)
  # Shards past the recorded counts come from a unit that did not complete.
  prepare_output.remove_shards_past(out_dir, {split: w.stats["shards"] for split, w in writers.items()})
  return writers


def _run_units(run: _Run, max_units: int | None) -> bool:
  """Writes the units that are not done yet, saving the progress after each.

  Returns:
    True when every unit is done, False when stopped by `max_units`.
  """
  cfg = run.cfg
  units = prepare_inputs.units(run.files, run.reading, input_format=cfg.input_format,
                               per_unit=cfg.files_per_unit or DEFAULT_FILES_PER_UNIT[cfg.input_format],
                               jsonl_field=cfg.jsonl_field, split_paragraphs=cfg.split_paragraphs)
  encoder = prepare_tokens.Encoder(run.tokenizer, num_threads=cfg.num_threads, num_workers=cfg.num_workers,
                                   kind=cfg.tokenizer_kind, eos_token=cfg.eos_token)
  run.start_time = run.last_log = time.monotonic()
  run_units = 0
  try:
    index = -1
    for index, unit in enumerate(units):
      unit_chain = hashlib.sha256(f"{run.chain}\n{unit.key}".encode()).hexdigest()
      if index < run.units_done:
        unit.skip()
        run.chain = unit_chain
        if index == run.units_done - 1 and run.chain != run.saved_chain:
          raise DataError(f"The inputs of {cfg.output_dir} changed since the interrupted run"
                          " (its completed units differ). Pass --overwrite to start again.")
        continue
      if max_units is not None and run_units >= max_units:
        return False
      if run.start_bytes is None:
        run.start_bytes, run.start_time = run.reading.position(), time.monotonic()
        run.reporter = progress_lib.Progress(run.total_bytes, unit="MB", label="prepare", scale=1e6,
                                             start=run.start_bytes)
        run.reporter.update(run.start_bytes, run.start_time)  # no compilation here: the rate counts from the start
      _write_unit(run, unit, encoder)
      run.chain = unit_chain
      run.units_done = index + 1
      run_units += 1
      prepare_output.save_progress(run.out_dir, run.settings, run.units_done, run.chain, run.writers)
    if index + 1 < run.units_done:
      raise DataError(f"The inputs of {cfg.output_dir} changed since the interrupted run (fewer"
                      " units than completed before). Pass --overwrite to start again.")
  finally:
    encoder.close()
  return True


def _write_unit(run: _Run, unit: prepare_inputs.Unit, encoder: prepare_tokens.Encoder) -> None:
  """Sends the unit's documents, in batches per split, through `encoder` into the split writers."""
  cfg, writers = run.cfg, run.writers
  batches = {split: ([], 0) for split in SPLITS}
  for doc in unit.documents():
    if not doc.strip():
      continue
    split = SPLITS[is_validation(doc, val_fraction=cfg.val_fraction, val_salt=cfg.val_salt)]
    texts, chars = batches[split]
    texts.append(doc)
    chars += len(doc)
    run.run_chars += len(doc)
    if chars >= _BATCH_CHARS:
      encoder.submit(texts, functools.partial(writers[split].add, n_docs=len(texts)))
      texts, chars = [], 0
    batches[split] = (texts, chars)
    now = time.monotonic()
    if now - run.last_log >= cfg.log_every_seconds:
      run.last_log = now
      _log_progress(run.reporter, run.reading.position(), now, now - run.start_time, run.run_chars, writers)
  for split, (texts, _) in batches.items():
    if texts:
      encoder.submit(texts, functools.partial(writers[split].add, n_docs=len(texts)))
  encoder.drain()


def _finish(run: _Run) -> dict:
  """Writes the last shards and metadata.json, publishes a remote output; returns the metadata."""
  cfg = run.cfg
  meta = _metadata(run)
  paths.write_bytes_atomic(os.path.join(run.out_dir, METADATA), (json.dumps(meta, indent=1) + "\n").encode())
  prepare_output.remove_progress(run.out_dir)
  if prepare_output.is_remote(cfg.output_dir):
    prepare_output.publish(run.out_dir, cfg.output_dir, [f for s in SPLITS for f in meta["splits"][s]["files"]])
  elapsed = max(time.monotonic() - run.start_time, 1e-9)
  for split in SPLITS:
    s = meta["splits"][split]
    logging.info("%s: %d docs, %d rows in %d files, %d tokens (%d dropped).", split, s["docs"],
                 s["rows"], len(s["files"]), s["tokens"], s["tokens_dropped"])
  read = run.reading.position() - (run.start_bytes or 0)
  logging.info("Done in %.1f s (this run: %.2f MB/s read, %.2f M chars/s): %s", elapsed,
               read / 1e6 / elapsed, run.run_chars / 1e6 / elapsed, cfg.output_dir)
  return meta


def _metadata(run: _Run) -> dict:
  """The contents of metadata.json; writes the last, partial shard of each split."""
  cfg, tokenizer, files = run.cfg, run.tokenizer, run.files
  return {
      "format": "replaid-arrayrecord",
      "version": FORMAT_VERSION,
      "seq_len": cfg.seq_len,
      "dtype": run.dtype.name,
      "vocab_size": int(tokenizer.vocab_size),
      "eos_id": int(tokenizer.eos_id),
      "tokenizer": tokenizer.identity(),
      "input_format": cfg.input_format,
      "source_files": [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)}
                       for p in files[:10_000]],
      "num_source_files": len(files),
      "source_bytes": run.total_bytes,
      "units": run.units_done,
      "val_fraction": cfg.val_fraction,
      "val_salt": cfg.val_salt,
      "val_rule": VAL_RULE,
      "packing": ("Per split, documents (each followed by eos_id) form one stream cut into rows"
                  " of seq_len across units and shards; only the last partial row is dropped."),
      "rows_per_shard": cfg.rows_per_shard,
      "settings": run.settings,
      "splits": {split: run.writers[split].finish() for split in SPLITS},
  }


def _log_progress(progress: progress_lib.Progress, position: int, now: float, elapsed: float,
                  chars: int, writers: dict) -> None:
  progress.update(position, now)
  docs = sum(w.stats["docs"] for w in writers.values())
  tokens = sum(w.stats["doc_tokens"] for w in writers.values())
  logging.info("%s read; %.2f M chars/s, %d docs, %d tokens", progress.line(now=now),
               chars / 1e6 / max(elapsed, 1e-9), docs, tokens)

