"""SentencePiece tokenizers: loading, and training with an on-disk cache.

Trained models keep text exactly: identity normalisation, no whitespace
clean-up, no dummy prefix, byte fallback for unseen characters and "\\n" as a
piece of its own, so `decode(encode(text)) == text` for verse.

A trained model is cached per user, keyed by the corpus and the training
settings (the key is in the file name), so that a new run on the same corpus
does not train again: `data.cache_dir` if set, else $REPLAID_JAX_TOKENIZER_CACHE,
else $XDG_CACHE_HOME/replaid_jax/tokenizers (~/.cache/replaid_jax/tokenizers).
A run keeps its own copy in <workdir>/tokenizer/, which its checkpoints record.
"""

from collections.abc import Sequence
import hashlib
import io
import itertools
import json
import os
import re
import time

from absl import logging
import numpy as np
import sentencepiece as spm

from replaid_jax import paths
from replaid_jax.errors import ConfigError, DataError

MODEL_TYPES = ("unigram", "bpe")
# Ids reserved by a trained model: unk, bos, eos, "\n" and 256 byte pieces.
_RESERVED_PIECES = 260
# Training reads documents in chunks of about this many characters (whole
# lines, so that newlines are seen in context) ...
_CHUNK_CHARS = 1000
# ... and at most about this many characters in all: an evenly spaced,
# deterministic subset of the chunks, which keeps training a few seconds long.
_MAX_TRAIN_CHARS = 3_000_000
# Part of the cache key: bump when the training recipe changes.
_RECIPE_VERSION = 1
# Overrides the per-user cache directory of trained tokenizers (data.cache_dir overrides both).
CACHE_ENV = "REPLAID_JAX_TOKENIZER_CACHE"


def default_cache_dir() -> str:
  """$REPLAID_JAX_TOKENIZER_CACHE, else $XDG_CACHE_HOME/replaid_jax/tokenizers (default ~/.cache/...)."""
  if os.environ.get(CACHE_ENV):
    return os.path.expanduser(os.environ[CACHE_ENV])
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "replaid_jax", "tokenizers")


class Tokenizer:
  """A SentencePiece model with an end-of-sequence id.

  Build one with `load_tokenizer` or `train_or_load_tokenizer`.
  """

  def __init__(self, model_proto: bytes, *, path: str):
    self._proto = model_proto
    self._path = path
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    if self._sp.eos_id() < 0:
      raise DataError(
          f"{path}: the SentencePiece model has no end-of-sequence piece,"
          " which packing needs between documents. Train it with an eos id"
          " (e.g. --eos_id=2), or leave data.tokenizer_path empty to train"
          " one.")

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def bos_id(self) -> int:
    """The beginning-of-sequence id, or -1 if the model has none."""
    return self._sp.bos_id()

  @property
  def path(self) -> str:
    return self._path

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str], *,
                   num_threads: int | None = None) -> list[list[int]]:
    """Encodes many texts with SentencePiece's threaded batch encoder."""
    threads = num_threads or os.cpu_count() or 1
    return self._sp.encode(list(texts), num_threads=threads)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._sp.decode(np.asarray(ids, dtype=np.int64).reshape(-1).tolist())

  def display(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of `ids` for a terminal: bytes that form no UTF-8 character shown as \\xNN, control characters
    escaped (`printable`). `decode` stays the faithful text."""
    out = []
    ids = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()
    for is_byte, group in itertools.groupby(ids, key=self._sp.is_byte):
      group = list(group)
      if is_byte:  # byte-fallback pieces are named "<0xAB>"
        data = bytes(int(self._sp.id_to_piece(i)[1:-1], 16) for i in group)
        out.append(data.decode("utf-8", errors="backslashreplace"))
      else:
        out.append(self._sp.decode(group))
    return printable("".join(out))

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))

  def identity(self) -> dict:
    """What checkpoints record to check that the same tokenizer is used."""
    return {
        "kind": "sentencepiece",
        "path": self._path,
        "sha256": hashlib.sha256(self._proto).hexdigest(),
        "vocab_size": self.vocab_size,
    }

  def __repr__(self) -> str:
    return f"Tokenizer(path={self._path!r}, vocab_size={self.vocab_size})"


_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffd]")


def printable(text: str) -> str:
  """`text` safe to print: control characters other than newline and tab, and U+FFFD, escaped as \\xNN / \\uFFFD."""
  return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04X}", text)


def display_text(tok, ids: Sequence[int] | np.ndarray) -> str:
  """`Tokenizer.display`, or the printable decoded text for tokenizers without it."""
  return tok.display(ids) if hasattr(tok, "display") else printable(tok.decode(ids))


def load_tokenizer(path: str, *, what: str = "data.tokenizer_path") -> Tokenizer:
  """Loads a SentencePiece `.model` file; `what` names the config key in errors.

  A path ending in `.json` is read as a Hugging Face `tokenizer.json` and
  returns a `bpe.BPETokenizer`, which has the same interface.
  """
  path = os.path.expanduser(path)
  if path.lower().endswith(".json"):
    from replaid_jax.data import bpe  # pylint: disable=g-import-not-at-top
    return bpe.load_bpe_tokenizer(path, what=what)  # type: ignore[return-value]
  if not os.path.isfile(path):
    raise DataError(
        f"{what}: no file at '{path}'. Point {what} at a SentencePiece .model"
        " file, or leave data.tokenizer_path empty to train one on the"
        " training text.")
  with open(path, "rb") as f:
    proto = f.read()
  if not proto:
    raise DataError(
        f"{what}: '{path}' is empty, not a SentencePiece model. Point {what}"
        " at a complete .model file, or leave data.tokenizer_path empty to"
        " train one.")
  try:
    return Tokenizer(proto, path=path)
  except (RuntimeError, OSError, TypeError) as e:
    raise DataError(
        f"{what}: '{path}' is not a SentencePiece model ({e}). Point {what}"
        " at the .model file written by SentencePiece training (not the"
        " .vocab file), or leave data.tokenizer_path empty to train one.") from None


def _training_chunks(texts: Sequence[str]) -> list[str]:
  """Cuts documents into chunks of whole lines and keeps an evenly spaced subset."""
  chunks = []
  for text in texts:
    lines, size = [], 0
    for line in text.splitlines(keepends=True):
      lines.append(line)
      size += len(line)
      if size >= _CHUNK_CHARS:
        chunks.append("".join(lines))
        lines, size = [], 0
    if lines:
      chunks.append("".join(lines))
  total = sum(len(c) for c in chunks)
  stride = max(1, -(-total // _MAX_TRAIN_CHARS))
  return chunks[::stride]


def _trainer_options(vocab_size: int, model_type: str) -> dict:
  return dict(
      vocab_size=vocab_size,
      model_type=model_type,
      num_threads=2,
      character_coverage=1.0,
      byte_fallback=True,
      pad_id=-1,
      unk_id=0,
      bos_id=1,
      eos_id=2,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      user_defined_symbols=["\n"],
      input_sentence_size=0,
      shuffle_input_sentence=False,
      max_sentence_length=16 * _CHUNK_CHARS,
  )


def _cache_key(texts: Sequence[str], options: dict) -> str:
  h = hashlib.sha256()
  recipe = {"version": _RECIPE_VERSION, "chunk_chars": _CHUNK_CHARS,
            "max_train_chars": _MAX_TRAIN_CHARS, "options": options}
  h.update(json.dumps(recipe, sort_keys=True).encode())
  for text in texts:
    data = text.encode("utf-8")
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)
  return h.hexdigest()[:16]


def _train(chunks: list[str], options: dict) -> bytes:
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(chunks), model_writer=model, minloglevel=2,
        **options)
  except RuntimeError as e:
    raise DataError(
        f"SentencePiece training failed: {e}. Change"
        " data.tokenizer_vocab_size as the message says: it must cover the"
        f" {_RESERVED_PIECES} reserved ids plus every distinct character of"
        " the training text, and not exceed what the text supports (or train"
        " on more text).") from None
  return model.getvalue()


def train_or_load_tokenizer(texts: Sequence[str], *, vocab_size: int, model_type: str,
                            cache_dir: str, copy_to: str | None = None) -> Tokenizer:
  """Trains a SentencePiece model on `texts`, or loads it from `cache_dir`.

  The cache file is `spm_<model_type>_<vocab_size>_<key>.model`, where the key
  hashes the texts and the training options; equal inputs load the cached
  model without retraining. Training is deterministic.

  With `copy_to` (a run's <workdir>/tokenizer), the model is also copied there
  and loaded from there: a copy already in `copy_to` is used first, and a cache
  that cannot be written is only a warning.
  """
  _check_request(texts, vocab_size, model_type)
  options = _trainer_options(vocab_size, model_type)
  name = f"spm_{model_type}_{vocab_size}_{_cache_key(texts, options)}.model"
  cache_dir = os.path.expanduser(cache_dir)
  path = os.path.join(cache_dir, name)
  local = os.path.join(copy_to, name) if copy_to else None
  if local and os.path.isfile(local):
    return load_tokenizer(local, what="the run's tokenizer")
  cached = os.path.isfile(path)
  proto = None
  if cached:
    logging.info("tokenizer: %s from the cache", path)
  else:
    proto = _train_into_cache(texts, options, cache_dir, path, local)
  if not local:
    return load_tokenizer(path, what="data.cache_dir")
  return _load_run_copy(path, local, copy_to, cached, proto)


def _check_request(texts: Sequence[str], vocab_size: int, model_type: str) -> None:
  """Raises ConfigError for an unknown model type or too small a vocabulary, DataError for an empty corpus."""
  if model_type not in MODEL_TYPES:
    raise ConfigError(
        f"data.tokenizer_type='{model_type}' is not supported. Use one of"
        f" {', '.join(MODEL_TYPES)}.")
  if vocab_size <= _RESERVED_PIECES:
    raise ConfigError(
        f"data.tokenizer_vocab_size={vocab_size} is too small: a trained"
        f" tokenizer reserves {_RESERVED_PIECES} ids (special pieces and byte"
        " fallback). Use at least 384, e.g. 4096.")
  if not any(text.strip() for text in texts):
    raise DataError(
        "Cannot train a tokenizer on an empty corpus. Check the training"
        " files, or set data.tokenizer_path to an existing .model file.")


def _cache_access(cache_dir: str, local: str | None) -> tuple[bool, str]:
  """Whether `cache_dir` (created if missing) is writable, and why not.

  Raises:
    DataError: if it is not writable and there is no run copy (`local`) to keep the model in.
  """
  try:
    os.makedirs(cache_dir, exist_ok=True)
    writable = os.access(cache_dir, os.W_OK)
  except OSError as e:
    writable, reason = False, str(e)
  else:
    reason = "not writable"
  if not writable and not local:
    raise DataError(
        f"data.cache_dir: cannot create '{cache_dir}' ({reason}). Set"
        " data.cache_dir to a writable directory.")
  return writable, reason


def _train_into_cache(texts: Sequence[str], options: dict, cache_dir: str, path: str, local: str | None) -> bytes:
  """Trains the model and writes it to the cache at `path`, or warns when the cache is not writable."""
  writable, reason = _cache_access(cache_dir, local)
  chunks = _training_chunks(texts)
  logging.info("training a SentencePiece tokenizer (%s, %d pieces) on %s characters (cached afterwards at %s)",
               options["model_type"], options["vocab_size"], f"{sum(len(c) for c in chunks):,}",
               path if writable else local)
  t0 = time.monotonic()
  proto = _train(chunks, options)
  logging.info("trained the tokenizer in %.1fs", time.monotonic() - t0)
  if writable:
    paths.write_bytes_atomic(path, proto)
  else:
    logging.warning("data.cache_dir: cannot write to '%s' (%s); the tokenizer is kept in the run only. Set "
                    "data.cache_dir (or $%s) to a writable directory to reuse it.", cache_dir, reason, CACHE_ENV)
  return proto


def _load_run_copy(path: str, local: str, copy_to: str, cached: bool, proto: bytes | None) -> Tokenizer:
  """Writes the model to the run's copy `local` (from the cache file when there is one, else `proto`) and loads it."""
  os.makedirs(copy_to, exist_ok=True)
  if cached or os.path.isfile(path):
    with open(path, "rb") as f:
      proto = f.read()
  paths.write_bytes_atomic(local, proto)
  return load_tokenizer(local, what="the run's tokenizer")
