"""Evaluation sets by name, tokenised with the checkpoint's tokenizer and packed like the training data.

Names:
  validation, train        the training run's own splits, rebuilt from the saved `data` config
  text:<paths or globs>    the user's .txt (one document per file) / .jsonl (one per line) files
  npy:<paths or globs>     pre-tokenised token streams (ids of the checkpoint's vocabulary)
  wikitext2, wikitext103, ptb, lm1b, lambada, ag_news, pubmed, arxiv
                           zero-shot sets (zero_shot.py), read from a local copy under `eval.data_dir`, or from a
                           tensorflow-datasets builder prepared there with file_format="array_record"
                           (read with tfds.data_source, no TensorFlow) when that package is installed

Wrapping rule, the same as training (`pipeline.pack`): documents, each followed by
EOS, are concatenated and cut into rows of `data.seq_len` tokens; no BOS; the
remainder that does not fill a row is dropped and counted. Nothing is downloaded:
a set that cannot be found offline raises a DataError naming the files to supply
and the config key that points at them.
"""

import dataclasses
import os
import re

import numpy as np

from replaid_jax import errors
from replaid_jax.data import pipeline
from replaid_jax.data import sources
from replaid_jax.data import tokenizer as tokenizer_lib
from replaid_jax.eval import zero_shot

SPLITS = ("test", "validation", "train")
WRAPPING = ("documents joined in order, each followed by EOS (no BOS), cut into rows of seq_len tokens; "
            "the remainder that does not fill a row is dropped")


@dataclasses.dataclass
class EvalSet:
  """Packed rows of one split and how they were made."""

  name: str  # safe for file names: "validation", "wikitext2", "text-mybook", ...
  split: str
  tokens: np.ndarray  # int32 [N, seq_len]
  protocol: dict  # JSON-able: source, detokeniser, wrapping rule, counts
  unigram_counts: np.ndarray | None = None  # training-token counts (the run's own splits only)


NAMES = ("validation", "train", "text:<paths>", "npy:<paths>") + tuple(zero_shot.ZERO_SHOT)


# ---- loading.


def _pack_docs(docs: list[str], tok: tokenizer_lib.Tokenizer, seq_len: int) -> tuple[np.ndarray, int, int]:
  ids = tok.encode_batch(docs)
  rows, dropped = pipeline.pack(ids, eos_id=tok.eos_id, seq_len=seq_len)
  return rows, dropped, sum(len(x) for x in ids) + len(ids)


def _finish(name: str, split: str, rows: np.ndarray, dropped: int, seq_len: int, protocol: dict) -> EvalSet:
  if not rows.shape[0]:
    raise errors.DataError(
        f"{name} ({split}) holds {dropped} tokens, fewer than one sequence of seq_len={seq_len}; "
        "supply more text.")
  protocol.update({"dataset": name, "split": split, "seq_len": seq_len, "wrapping": WRAPPING, "bos": False,
                   "eos_after_each_document": True, "num_rows": int(rows.shape[0]), "tokens_in_rows": int(rows.size),
                   "tokens_dropped": int(dropped)})
  return EvalSet(name, split, rows, protocol)


def _text_protocol(docs_orig: list[str], total_tokens: int, word_level: bool) -> dict:
  words = sum(len(d.split()) for d in docs_orig)
  return {"num_documents": len(docs_orig), "words": words, "words_per_token": words / max(total_tokens, 1),
          "word_level": word_level,
          "words_rule": "whitespace-separated items of the original (pre-detokenisation) text"}


def _run_split(name: str, data_cfg: pipeline.DataConfig, tok, workdir: str) -> EvalSet:
  """The run's own validation or training split: `load_corpus` on the saved data config."""
  if tok is not None:
    data_cfg = dataclasses.replace(data_cfg, tokenizer_path=tok.path)  # never retrain, never write
  key = "val" if name == "validation" else "train"
  try:
    corpus = pipeline.load_corpus(data_cfg, workdir=workdir)
  except errors.DataError as e:
    raise errors.DataError(
        f"{e} (The data paths come from the checkpoint's saved config and cannot be changed at evaluation; if the "
        f"files moved, evaluate them where they are now with --dataset=text:<paths> or --dataset=npy:<paths>, "
        "which pack them by the same rule.)") from None
  info = corpus.info
  protocol = {
      "source": f"the run's {name} split (data.source={data_cfg.source}"
                + (f", data.{key}_files={getattr(data_cfg, key + '_files')}" if data_cfg.source != "shakespeare"
                   else f", data.val_plays={data_cfg.val_plays}") + ")",
      "detokenizer": "none", "num_documents": info.get(f"{key}_docs"),
  }
  out = _finish(name, name, getattr(corpus, key), info[f"{key}_tokens_dropped"], data_cfg.seq_len, protocol)
  out.unigram_counts = corpus.unigram_counts
  return out


def _need_tokenizer(tok, what: str):
  if tok is None:
    raise errors.DataError(
        f"{what} is text, but this checkpoint was trained on pre-tokenised .npy data without a tokenizer; "
        "evaluate --dataset=validation, or pre-tokenised files with --dataset=npy:<paths>.")
  return tok


def _safe(s: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-.")[:60] or "files"


def _text_files(spec: str, tok, seq_len: int, jsonl_field: str) -> EvalSet:
  tok = _need_tokenizer(tok, f"--dataset=text:{spec}")
  docs = sources.read_text_files(spec, jsonl_field=jsonl_field, what="--dataset=text:")
  rows, dropped, total = _pack_docs(docs, tok, seq_len)
  protocol = {"source": f"text files {spec}", "detokenizer": "none", **_text_protocol(docs, total, False)}
  return _finish(*set_name(f"text:{spec}", ""), rows, dropped, seq_len, protocol)


def _npy_files(spec: str, vocab_size: int, seq_len: int) -> EvalSet:
  stream = sources.read_token_arrays(spec, vocab_size=vocab_size, what="--dataset=npy:")
  n = stream.size // seq_len
  rows = np.asarray(stream[:n * seq_len], np.int32).reshape(n, seq_len)
  protocol = {"source": f"token arrays {spec}", "detokenizer": "none (pre-tokenised)",
              "wrapping_note": "the token stream is cut as stored (EOS placement is the file's)"}
  return _finish(*set_name(f"npy:{spec}", ""), rows, int(stream.size - rows.size), seq_len, protocol)


def _zero_shot(name: str, split: str, data_dir: str, tok, seq_len: int) -> EvalSet:
  spec = zero_shot.ZERO_SHOT[name]
  if split not in spec.files and split not in spec.tfds_splits:
    have = sorted(set(spec.files) | set(spec.tfds_splits))
    raise errors.ConfigError(f"{name} has no '{split}' split; set --config.eval.split to one of {have}.")
  tok = _need_tokenizer(tok, f"--dataset={name}")
  docs, source = zero_shot.documents(name, split, data_dir)
  text = [spec.detokenizer(d) for d in docs]
  rows, dropped, total = _pack_docs(text, tok, seq_len)
  protocol = {"source": source, "title": spec.title,
              "detokenizer": f"{spec.detokenizer.__name__}: {spec.detokenizer.__doc__.strip()}",
              **_text_protocol(docs, total, spec.word_level)}
  return _finish(name, split, rows, dropped, seq_len, protocol)


def display_name(name: str, split: str) -> str:
  """How a set is named to a person: "validation" for the run's own split, "wikitext2/test" for others."""
  return name if name == split else f"{name}/{split}"


def set_name(dataset: str, split: str) -> tuple[str, str]:
  """(name, split) of the results file <name>_<split>_step<N>.json, known before anything is loaded."""
  if dataset in ("validation", "train"):
    return dataset, dataset
  for prefix in ("text", "npy"):
    if dataset.startswith(prefix + ":"):
      first = os.path.splitext(os.path.basename(dataset[len(prefix) + 1:].split(",")[0].strip()))[0]
      return f"{prefix}-{_safe(first)}", prefix
  return dataset, split


def load(dataset: str, *, split: str, data_cfg: pipeline.DataConfig, vocab_size: int,
         tok: tokenizer_lib.Tokenizer | None, workdir: str, data_dir: str = "") -> EvalSet:
  """The evaluation set `dataset` (see the module docstring), packed to data_cfg.seq_len rows."""
  seq_len = data_cfg.seq_len
  if dataset in ("validation", "train"):
    return _run_split(dataset, data_cfg, tok, workdir)
  if dataset.startswith("text:"):
    return _text_files(dataset[len("text:"):], tok, seq_len, data_cfg.jsonl_field)
  if dataset.startswith("npy:"):
    return _npy_files(dataset[len("npy:"):], vocab_size, seq_len)
  if dataset in zero_shot.ZERO_SHOT:
    if split not in SPLITS:
      raise errors.ConfigError(f"eval.split={split!r} is not one of {SPLITS}.")
    return _zero_shot(dataset, split, data_dir, tok, seq_len)
  raise errors.ConfigError(f"--dataset={dataset!r} is unknown; use one of {', '.join(NAMES)}.")
