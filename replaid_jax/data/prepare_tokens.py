"""Tokenising for data preparation (`prepare.py`): the tokenizer and the document encoder.

`load_any_tokenizer` opens a SentencePiece model or a BPE tokenizer.json;
`Encoder` turns batches of documents into token streams, each document
followed by the end-of-sequence id, in this process or in worker processes.
"""

import collections
import multiprocessing
import os
from collections.abc import Callable

import numpy as np

from replaid_jax.data import sources
from replaid_jax.errors import ConfigError

TOKENIZER_KINDS = ("auto", "sentencepiece", "bpe")

# The tokenizer of a worker process, loaded once by `_worker_init`.
_WORKER_TOKENIZER = None


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


def _worker_init(path: str, kind: str, eos_token: str) -> None:
  global _WORKER_TOKENIZER
  _WORKER_TOKENIZER = load_any_tokenizer(path, kind=kind, eos_token=eos_token)


def _worker_encode(texts: list[str]) -> np.ndarray:
  tok = _WORKER_TOKENIZER
  return sources.join_documents(tok.encode_batch(texts, num_threads=1), tok.eos_id)


class Encoder:
  """Turns batches of documents into token streams (each doc followed by EOS), in order."""

  def __init__(self, tokenizer, *, num_threads: int, num_workers: int, kind: str, eos_token: str):
    """Starts the worker processes, if any.

    Args:
      tokenizer: the tokenizer, from `load_any_tokenizer`.
      num_threads: tokenizer threads in this process; 0: all cores.
      num_workers: tokenizer processes; 0 tokenises in this process.
      kind: the tokenizer kind, with which the workers reload `tokenizer.path`.
      eos_token: the end-of-sequence token with which the workers reload it.
    """
    self._tok = tokenizer
    self._threads = num_threads or os.cpu_count() or 1
    self._pool = None
    self._queue = collections.deque()
    if num_workers > 0:
      self._pool = multiprocessing.get_context("spawn").Pool(
          num_workers, initializer=_worker_init, initargs=(tokenizer.path, kind, eos_token))
      self._window = 2 * num_workers

  def submit(self, texts: list[str], done: Callable[[np.ndarray], None]) -> None:
    """Tokenises `texts`; `done(stream)` is called in submission order."""
    if self._pool is None:
      done(sources.join_documents(self._tok.encode_batch(texts, num_threads=self._threads), self._tok.eos_id))
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
