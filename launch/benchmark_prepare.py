"""Measures launch/prepare_data.py's throughput on a synthetic corpus, and checks resumption.

  python launch/benchmark_prepare.py --size_mb=50 --check_resume

Writes --size_mb of jsonl in --num_files files under --work_dir: a
deterministic word salad (Zipf-distributed pseudo-words from a seeded RNG) or,
with --corpus=shakespeare, the embedded plays' scenes. Trains a SentencePiece
unigram model of --vocab_size pieces on a tenth of the documents, then times `prepare` (--repeats runs, median) and,
for comparison, SentencePiece's batch encoder alone on the same documents.
With --check_resume it also stops a run after --resume_units units, resumes it,
and checks that the shards equal the uninterrupted run's byte for byte and the
in-memory tokenisation + packing of the same documents.
"""

from replaid_jax import hostenv

hostenv.reexec_with_huge_pages()  # first, before JAX allocates anything: see replaid_jax/hostenv.py

import dataclasses
import json
import os
import re
import shutil
import statistics
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from replaid_jax import cli
from replaid_jax.data import arrayrecord
from replaid_jax.data import pipeline
from replaid_jax.data import prepare
from replaid_jax.data import sources
from replaid_jax.data import tokenizer as tokenizer_lib

_WORK_DIR = flags.DEFINE_string("work_dir", "/tmp/replaid-prepare-benchmark", "Scratch directory.")
_SIZE_MB = flags.DEFINE_float("size_mb", 50.0, "Corpus size in MB (10^6 bytes) of jsonl.")
_CORPUS = flags.DEFINE_enum("corpus", "salad", ["salad", "shakespeare"],
                            "salad: synthetic word salad; shakespeare: the embedded plays' scenes,"
                            " repeated (with a copy number) up to --size_mb.")
_NUM_FILES = flags.DEFINE_integer("num_files", 25, "Corpus files (one unit each).")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 4096, "SentencePiece pieces.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "Tokens per row.")
_ROWS_PER_SHARD = flags.DEFINE_integer("rows_per_shard", 2048, "Rows per shard.")
_NUM_THREADS = flags.DEFINE_integer("num_threads", 0, "Tokenizer threads; 0: all cores.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Tokenizer processes.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs of prepare (the median is reported).")
_CHECK_RESUME = flags.DEFINE_bool("check_resume", False, "Also interrupt, resume and compare.")
_RESUME_UNITS = flags.DEFINE_integer("resume_units", 7, "Units completed before the interruption.")


def word_salad(size_bytes: int, seed: int = 0) -> list[str]:
  """Documents of Zipf-distributed pseudo-words, in sentences and paragraphs."""
  rng = np.random.default_rng(seed)
  letters = np.array(list("aeioubcdfghklmnprstvwyz"))
  vocab = ["".join(rng.choice(letters, size=rng.integers(1, 11))) for _ in range(20_000)]
  probs = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
  probs /= probs.sum()
  docs, total = [], 0
  while total < size_bytes:
    n_sentences = int(rng.integers(3, 60))
    lengths = rng.integers(4, 26, size=n_sentences)
    words = rng.choice(len(vocab), size=int(lengths.sum()), p=probs)
    breaks = rng.random(n_sentences) < 0.2
    parts, pos = [], 0
    for length, brk in zip(lengths, breaks):
      sentence = " ".join(vocab[w] for w in words[pos:pos + length])
      pos += length
      parts.append(sentence[:1].upper() + sentence[1:] + (".\n\n" if brk else ". "))
    doc = "".join(parts).strip()
    docs.append(doc)
    total += len(doc.encode()) + 12  # the jsonl line's framing
  return docs


def shakespeare_scenes(size_bytes: int) -> list[str]:
  """The plays cut at scene headings, repeated with a copy number up to `size_bytes`."""
  scenes = []
  for text in sources.shakespeare_plays().values():
    scenes.extend(s for s in re.split(r"\n(?=SCENE )", text) if s.strip())
  docs, total, copy = [], 0, 0
  while total < size_bytes:
    for scene in scenes:
      doc = f"[{copy}] {scene}"
      docs.append(doc)
      total += len(doc.encode()) + 12
      if total >= size_bytes:
        break
    copy += 1
  return docs


def _write_corpus(directory: str, docs: list[str], num_files: int) -> list[str]:
  os.makedirs(directory, exist_ok=True)
  paths = []
  per_file = -(-len(docs) // num_files)
  for i in range(num_files):
    path = os.path.join(directory, f"part-{i:03d}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      for doc in docs[i * per_file:(i + 1) * per_file]:
        f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    paths.append(path)
  return paths


def _files(directory: str) -> dict[str, bytes]:
  out = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      out[name] = f.read()
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  work = _WORK_DIR.value
  t0 = time.monotonic()
  size = int(_SIZE_MB.value * 1e6)
  docs = word_salad(size) if _CORPUS.value == "salad" else shakespeare_scenes(size)
  corpus_dir = os.path.join(work, "corpus")
  if os.path.isdir(corpus_dir):
    shutil.rmtree(corpus_dir)
  paths = _write_corpus(corpus_dir, docs, _NUM_FILES.value)
  input_bytes = sum(os.path.getsize(p) for p in paths)
  text_bytes = sum(len(d.encode()) for d in docs)
  print(f"corpus: {len(docs)} docs, {input_bytes / 1e6:.1f} MB of jsonl, {text_bytes / 1e6:.1f} MB"
        f" of text in {len(paths)} files ({time.monotonic() - t0:.1f} s to write)")

  t0 = time.monotonic()
  tok = tokenizer_lib.train_or_load_tokenizer(
      docs[:len(docs) // 10], vocab_size=_VOCAB_SIZE.value, model_type="unigram",
      cache_dir=os.path.join(work, "tokenizer"))
  print(f"tokenizer: {tok.path} ({time.monotonic() - t0:.1f} s)")

  cfg = prepare.PrepareConfig(
      inputs=os.path.join(corpus_dir, "*.jsonl"), output_dir=os.path.join(work, "full"),
      tokenizer=tok.path, input_format="jsonl", seq_len=_SEQ_LEN.value,
      rows_per_shard=_ROWS_PER_SHARD.value, val_fraction=0.01, num_threads=_NUM_THREADS.value,
      num_workers=_NUM_WORKERS.value, overwrite=True, log_every_seconds=5.0)
  times = []
  for _ in range(_REPEATS.value):
    t0 = time.monotonic()
    meta = prepare.prepare(cfg)
    times.append(time.monotonic() - t0)
  seconds = statistics.median(times)
  tokens = sum(s["doc_tokens"] for s in meta["splits"].values())
  print(f"prepare: {', '.join(f'{t:.2f}' for t in times)} s; median {seconds:.2f} s ->"
        f" {input_bytes / 1e6 / seconds:.2f} MB/s of jsonl, {text_bytes / 1e6 / seconds:.2f} MB/s"
        f" of text, {tokens / seconds / 1e6:.2f} M tokens/s ({tokens} tokens,"
        f" {text_bytes / tokens:.2f} bytes/token)")

  threads = _NUM_THREADS.value or os.cpu_count()
  t0 = time.monotonic()
  encoded = tok.encode_batch(docs, num_threads=threads)
  alone = time.monotonic() - t0
  print(f"SentencePiece encode_batch alone ({threads} threads): {alone:.2f} s ->"
        f" {text_bytes / 1e6 / alone:.2f} MB/s of text, {tokens / alone / 1e6:.2f} M tokens/s")

  if _CHECK_RESUME.value:
    part = dataclasses.replace(cfg, output_dir=os.path.join(work, "resumed"))
    assert prepare.prepare(part, max_units=_RESUME_UNITS.value) is None
    # What a kill in the middle of the next unit can leave behind.
    with open(os.path.join(part.output_dir, ".train-99999.array_record.tmp"), "wb") as f:
      f.write(b"partial")
    prepare.prepare(part)
    same = _files(part.output_dir) == _files(cfg.output_dir)
    splits = {"train": [], "validation": []}
    for doc, ids in zip(docs, encoded):
      splits["validation" if prepare.is_validation(doc, val_fraction=0.01) else "train"].append(ids)
    matches = []
    for split, token_docs in splits.items():
      rows, _ = arrayrecord.read_split(part.output_dir, split)
      want, _ = pipeline.pack(token_docs, eos_id=tok.eos_id, seq_len=_SEQ_LEN.value)
      matches.append(np.array_equal(rows, want))
    print(f"resume after {_RESUME_UNITS.value} of {meta['units']} units: files identical to the"
          f" uninterrupted run: {same}; rows equal to in-memory tokenisation + pack:"
          f" {all(matches)} (train {meta['splits']['train']['rows']} rows, validation"
          f" {meta['splits']['validation']['rows']} rows)")
  logging.info("done")


if __name__ == "__main__":
  cli.run(main)
