"""Tests of data preparation (raw text -> ArrayRecord shards) and of reading the shards."""

import dataclasses
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from configs import base
from replaid_jax.data import arrayrecord
from replaid_jax.data import pipeline
from replaid_jax.data import prepare
from replaid_jax.data import prepare_output
from replaid_jax.data import sources
from replaid_jax.data import tokenizer as tokenizer_lib
from replaid_jax.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORDS = ("the of and to in is was that for on with as by at from his her it an be this which"
          " river stone garden light window morning quiet letter north harbour song").split()


def _documents(n: int, seed: int) -> list[str]:
  """Deterministic documents of varied length, some with paragraphs and non-ASCII text."""
  rng = np.random.default_rng(seed)
  docs = []
  for i in range(n):
    paragraphs = []
    for _ in range(rng.integers(1, 4)):
      words = rng.choice(_WORDS, size=rng.integers(3, 60))
      paragraphs.append(" ".join(words).capitalize() + ".")
    if i % 7 == 3:
      paragraphs.append("Café — naïve ☃ façade.")
    docs.append("\n".join(paragraphs))
  return docs


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory) -> str:
  texts = [sources.shakespeare_plays()["macbeth"]] + _documents(50, seed=0)
  tok = tokenizer_lib.train_or_load_tokenizer(
      texts, vocab_size=400, model_type="bpe", cache_dir=str(tmp_path_factory.mktemp("tok")))
  return tok.path


def _cfg(inputs, out, tokenizer, **kw) -> prepare.PrepareConfig:
  kw.setdefault("seq_len", 16)
  kw.setdefault("rows_per_shard", 7)
  kw.setdefault("val_fraction", 0.2)
  return prepare.PrepareConfig(inputs=str(inputs), output_dir=str(out), tokenizer=tokenizer, **kw)


def _expected(docs: list[str], tok, *, val_fraction: float, seq_len: int, salt: str = ""):
  """In-memory reference: split by the documented hash rule, tokenise, pipeline.pack."""
  splits = {"train": [], "validation": []}
  for doc in docs:
    if not doc.strip():
      continue
    digest = hashlib.blake2b(doc.encode(), digest_size=8, key=salt.encode()).digest()
    u = int.from_bytes(digest, "little") / 2**64
    splits["validation" if u < val_fraction else "train"].append(doc)
  return {split: pipeline.pack(tok.encode_batch(d), eos_id=tok.eos_id, seq_len=seq_len)
          for split, d in splits.items()}, {s: len(d) for s, d in splits.items()}


def _check_output(out, docs, tok, cfg):
  expected, n_docs = _expected(docs, tok, val_fraction=cfg.val_fraction, seq_len=cfg.seq_len,
                               salt=cfg.val_salt)
  for split in prepare.SPLITS:
    rows, meta = arrayrecord.read_split(str(out), split)
    want, dropped = expected[split]
    assert rows.dtype == np.int32 and want.shape[0] > 0, split
    np.testing.assert_array_equal(rows, want)
    info = meta["splits"][split]
    assert info["docs"] == n_docs[split] and info["tokens_dropped"] == dropped
    assert info["rows"] == rows.shape[0] and info["tokens"] == rows.size
    assert all(n == cfg.rows_per_shard for n in info["rows_per_file"][:-1])
  return meta


def _files(directory) -> dict[str, bytes]:
  return {name: open(os.path.join(directory, name), "rb").read()
          for name in sorted(os.listdir(directory))}


# ---- (a) text and jsonl inputs reproduce in-memory tokenisation and packing.


def test_text_files_match_in_memory_packing(tmp_path, spm_path):
  docs = _documents(40, seed=1)
  paragraphs = []
  for i in range(8):
    blocks = docs[5 * i:5 * i + 5]
    (tmp_path / f"doc{i}.txt").write_text("\n\n\n".join(blocks) + "\n \n")
    paragraphs.extend(blocks)
  tok = tokenizer_lib.load_tokenizer(spm_path)
  cfg = _cfg(tmp_path / "*.txt", tmp_path / "out", spm_path, split_paragraphs=True,
             files_per_unit=3)
  meta = prepare.prepare(cfg)
  assert meta["dtype"] == "uint16" and meta["vocab_size"] == 400 and meta["units"] == 3
  assert meta["tokenizer"] == tok.identity()
  assert _check_output(tmp_path / "out", paragraphs, tok, cfg) == meta
  assert sorted(os.listdir(tmp_path / "out")) == ["metadata.json"] + sorted(
      meta["splits"]["train"]["files"] + meta["splits"]["validation"]["files"])
  # One document per file without --split_paragraphs.
  cfg = dataclasses.replace(cfg, split_paragraphs=False, output_dir=str(tmp_path / "whole"))
  prepare.prepare(cfg)
  whole = [(tmp_path / f"doc{i}.txt").read_text() for i in range(8)]
  expected, _ = _expected(whole, tok, val_fraction=0.2, seq_len=16)
  np.testing.assert_array_equal(arrayrecord.read_split(str(tmp_path / "whole"), "train")[0],
                                expected["train"][0])


def test_the_binary_reports_progress_in_the_common_words(tmp_path, spm_path):
  docs = _documents(30, seed=4)
  for i in range(3):
    (tmp_path / f"doc{i}.txt").write_text("\n\n".join(docs[10 * i:10 * i + 10]))
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "prepare_data.py"), f"--inputs={tmp_path / '*.txt'}",
       f"--output_dir={tmp_path / 'out'}", f"--tokenizer={spm_path}", "--seq_len=16", "--split_paragraphs",
       "--log_every_seconds=0", "--files_per_unit=1"], capture_output=True, text=True, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if "prepare: " in line]
  assert lines and all(re.search(r"prepare: [\d.]+/[\d.]+ MB \(\d+%\)", line) for line in lines)
  assert any(re.search(r"MB/s, ETA \d+:\d\d:\d\d read; [\d.]+ M chars/s, \d+ docs, \d+ tokens", line)
             for line in lines)


def test_jsonl_files_match_in_memory_packing(tmp_path, spm_path):
  docs = _documents(60, seed=2)
  for i in range(3):
    lines = [json.dumps({"body": d, "id": j}) for j, d in enumerate(docs[20 * i:20 * i + 20])]
    (tmp_path / f"part{i}.jsonl").write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]))
  cfg = _cfg(f"{tmp_path}/part*.jsonl", tmp_path / "out", spm_path, input_format="jsonl",
             jsonl_field="body", val_salt="s")
  meta = prepare.prepare(cfg)
  assert meta["units"] == 3 and meta["splits"]["validation"]["docs"] > 0
  _check_output(tmp_path / "out", docs, tokenizer_lib.load_tokenizer(spm_path), cfg)
  (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
  with pytest.raises(DataError, match=r"bad.jsonl:1: no field 'body' \(--jsonl_field\)"):
    prepare.prepare(dataclasses.replace(cfg, inputs=str(tmp_path / "bad.jsonl"),
                                        output_dir=str(tmp_path / "bad")))


def test_validation_rule_is_content_based():
  docs = _documents(2000, seed=3)
  held = [d for d in docs if prepare.is_validation(d, val_fraction=0.1)]
  assert 120 < len(held) < 280
  assert held == [d for d in reversed(docs) if prepare.is_validation(d, val_fraction=0.1)][::-1]
  assert not any(prepare.is_validation(d, val_fraction=0.0) for d in docs)
  assert all(prepare.is_validation(d, val_fraction=1.0) for d in docs)
  salted = [d for d in docs if prepare.is_validation(d, val_fraction=0.1, val_salt="x")]
  assert salted != held


# ---- (b), (c) resumption and kill safety.


def test_interrupted_run_resumes_to_identical_output(tmp_path, spm_path):
  docs = _documents(90, seed=4)
  for i in range(9):
    (tmp_path / f"p{i}.jsonl").write_text(
        "\n".join(json.dumps({"text": d}) for d in docs[10 * i:10 * i + 10]))
  inputs = f"{tmp_path}/p*.jsonl"
  full = _cfg(inputs, tmp_path / "full", spm_path, input_format="jsonl", files_per_unit=2,
              rows_per_shard=20)
  prepare.prepare(full)
  part = dataclasses.replace(full, output_dir=str(tmp_path / "part"))
  assert prepare.prepare(part, max_units=1) is None
  names = set(os.listdir(tmp_path / "part"))
  assert "metadata.json" not in names and "progress.json" in names
  with pytest.raises(DataError, match="unfinished.*Rerun"):
    arrayrecord.read_metadata(str(tmp_path / "part"))
  assert prepare.prepare(part, max_units=2) is None
  # A kill in the middle of a unit leaves a temporary file and maybe a shard
  # past the recorded counts; neither is kept.
  progress = json.loads((tmp_path / "part" / "progress.json").read_text())
  next_shard = prepare.shard_name("train", progress["splits"]["train"]["shards"])
  (tmp_path / "part" / f".{next_shard}.tmp").write_bytes(b"partial")
  (tmp_path / "part" / next_shard).write_bytes(b"from an unfinished unit")
  (tmp_path / "part" / "notes.txt").write_text("not ours")
  meta = prepare.prepare(part)
  assert meta["units"] == 5
  got = _files(tmp_path / "part")
  assert got.pop("notes.txt") == b"not ours"
  assert got == _files(tmp_path / "full")
  _check_output(tmp_path / "part", docs, tokenizer_lib.load_tokenizer(spm_path), full)
  # A finished directory is left as it is; other settings are refused.
  assert prepare.prepare(part) == meta
  with pytest.raises(DataError, match="other settings.*--overwrite"):
    prepare.prepare(dataclasses.replace(part, seq_len=32))
  assert prepare.prepare(dataclasses.replace(part, seq_len=32, overwrite=True))["seq_len"] == 32


def test_resume_refuses_changed_settings(tmp_path, spm_path):
  (tmp_path / "a.txt").write_text("one two three\n" * 40)
  (tmp_path / "b.txt").write_text("four five six\n" * 40)
  cfg = _cfg(tmp_path / "*.txt", tmp_path / "out", spm_path, files_per_unit=1)
  assert prepare.prepare(cfg, max_units=1) is None
  with pytest.raises(DataError, match="unfinished preparation with other settings"):
    prepare.prepare(dataclasses.replace(cfg, val_fraction=0.5))


def test_worker_processes_give_identical_shards(tmp_path, spm_path):
  docs = _documents(40, seed=11)
  (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
  cfg = _cfg(tmp_path / "a.jsonl", tmp_path / "main", spm_path, input_format="jsonl")
  prepare.prepare(cfg)
  prepare.prepare(dataclasses.replace(cfg, output_dir=str(tmp_path / "workers"), num_workers=1))
  assert _files(tmp_path / "workers") == _files(tmp_path / "main")


def test_bucket_output_is_staged_then_copied(tmp_path, spm_path, monkeypatch):
  (tmp_path / "a.txt").write_text("one two three four five six seven\n" * 30)
  copies = []
  monkeypatch.setattr(prepare_output, "publish", lambda *args: copies.append(args))
  meta = prepare.prepare(_cfg(tmp_path / "a.txt", "gs://bucket/data", spm_path,
                              staging_dir=str(tmp_path / "staging")))
  names = meta["splits"]["train"]["files"] + meta["splits"]["validation"]["files"]
  assert copies == [(str(tmp_path / "staging"), "gs://bucket/data", names)]
  monkeypatch.undo()
  prepare_output.publish(str(tmp_path / "staging"), str(tmp_path / "copy"), names)
  assert _files(tmp_path / "copy") == _files(tmp_path / "staging")


# ---- (d) the OpenWebText archive layout and SlimPajama's jsonl.zst.


def _tar_bytes(files: dict[str, bytes], mode: str) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode=mode) as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def test_openwebtext_archive(tmp_path, spm_path):
  docs = _documents(35, seed=5)
  members, order = {}, []
  for i in range(5):
    inner = {f"{i:04d}{j:03d}-{hashlib.md5(d.encode()).hexdigest()}.txt": d.encode()
             for j, d in enumerate(docs[7 * i:7 * i + 7])}
    order.extend(docs[7 * i:7 * i + 7])
    members[f"openwebtext/urlsf_subset0{i}-{i}_data.xz"] = _tar_bytes(inner, "w:xz")
  (tmp_path / "openwebtext.tar.xz").write_bytes(_tar_bytes(members, "w:xz"))
  cfg = _cfg(tmp_path / "openwebtext.tar.xz", tmp_path / "full", spm_path, input_format="owt",
             files_per_unit=2)
  meta = prepare.prepare(cfg)
  assert meta["units"] == 3
  _check_output(tmp_path / "full", order, tokenizer_lib.load_tokenizer(spm_path), cfg)
  # Resuming skips the completed members of the stream.
  part = dataclasses.replace(cfg, output_dir=str(tmp_path / "part"))
  assert prepare.prepare(part, max_units=1) is None
  assert prepare.prepare(part, max_units=1) is None
  prepare.prepare(part)
  assert _files(tmp_path / "part") == _files(tmp_path / "full")


def test_jsonl_zst(tmp_path, spm_path):
  try:
    import zstandard  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip("zstandard is not installed (pip install zstandard, or the `prepare` extra)")
  docs = _documents(30, seed=6)
  for i in range(2):
    data = "".join(json.dumps({"text": d, "meta": {"redpajama_set_name": "x"}}) + "\n"
                   for d in docs[15 * i:15 * i + 15]).encode()
    # Two frames per file, as concatenated zstd streams.
    comp = zstandard.ZstdCompressor()
    half = len(data) // 2
    (tmp_path / f"example_train_{i}.jsonl.zst").write_bytes(
        comp.compress(data[:half]) + comp.compress(data[half:]))
  cfg = _cfg(f"{tmp_path}/*.jsonl.zst", tmp_path / "out", spm_path, input_format="jsonl.zst")
  prepare.prepare(cfg)
  _check_output(tmp_path / "out", docs, tokenizer_lib.load_tokenizer(spm_path), cfg)


def test_jsonl_zst_without_zstandard(tmp_path, spm_path, monkeypatch):
  (tmp_path / "a.jsonl.zst").write_bytes(b"x")
  monkeypatch.setitem(sys.modules, "zstandard", None)
  with pytest.raises(DataError, match="pip install zstandard"):
    prepare.prepare(_cfg(tmp_path / "a.jsonl.zst", tmp_path / "out", spm_path,
                         input_format="jsonl.zst"))


# ---- (e) the BPE (tokenizer.json) backend.


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory) -> str:
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_documents(200, seed=7), trainer=trainer)
  path = str(tmp_path_factory.mktemp("bpe") / "tokenizer.json")
  tok.save(path)
  return path


def test_bpe_backend_matches_tokenizers(bpe_json):
  import tokenizers  # pylint: disable=g-import-not-at-top
  reference = tokenizers.Tokenizer.from_file(bpe_json)
  tok = prepare.load_any_tokenizer(bpe_json)
  same = tokenizer_lib.load_tokenizer(bpe_json)  # .json dispatch
  assert tok.identity() == same.identity()
  assert tok.identity()["kind"] == "bpe" and len(tok.identity()["sha256"]) == 64
  assert tok.eos_id == reference.token_to_id("<|endoftext|>")
  assert tok.vocab_size == reference.get_vocab_size()
  texts = _documents(5, seed=8) + ["  Spaces,\ttabs\nand ünïcödé ☃ 日本語 text.\n"]
  for text in texts:
    assert tok.encode(text) == reference.encode(text).ids
    assert tok.decode(tok.encode(text)) == text
  assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_prepare_with_bpe(tmp_path, bpe_json):
  docs = _documents(30, seed=9)
  (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
  cfg = _cfg(tmp_path / "a.jsonl", tmp_path / "out", bpe_json, input_format="jsonl")
  meta = prepare.prepare(cfg)
  assert meta["tokenizer"]["kind"] == "bpe" and meta["dtype"] == "uint16"
  _check_output(tmp_path / "out", docs, prepare.load_any_tokenizer(bpe_json), cfg)


def test_bpe_errors(tmp_path, bpe_json):
  with pytest.raises(DataError, match="no end-of-sequence token.*--eos_token"):
    prepare.load_any_tokenizer(bpe_json, eos_token="<|eos|>")
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(DataError, match="bad.json: not a Hugging Face tokenizer.json"):
    prepare.load_any_tokenizer(str(tmp_path / "bad.json"))


# ---- (f) reading the shards with grain.


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, spm_path) -> str:
  root = tmp_path_factory.mktemp("prepared")
  (root / "a.jsonl").write_text(
      "\n".join(json.dumps({"text": d}) for d in _documents(120, seed=10)))
  prepare.prepare(_cfg(root / "a.jsonl", root / "out", spm_path, input_format="jsonl",
                       val_fraction=0.1))
  return str(root / "out")


def _shard_iterator(directory, seed=0, **kw):
  kw = {"global_batch": 8, "process_index": 0, "process_count": 1, "num_workers": 0} | kw
  return arrayrecord.train_iterator_from_shards(directory, seed=seed, **kw)


def test_shard_iterator_equals_in_memory_iterator(prepared):
  rows, meta = arrayrecord.read_split(prepared, "train")
  assert rows.shape[0] >= 40
  it = _shard_iterator(prepared, seed=1, seq_len=16,
                       tokenizer_sha256=meta["tokenizer"]["sha256"])
  ref = pipeline.train_iterator(rows, global_batch=8, seed=1, process_index=0,
                                process_count=1, num_workers=0)
  for _ in range(rows.shape[0] // 8 + 3):  # past the end of an epoch
    batch = next(it)["tokens"]
    assert batch.shape == (8, 16) and batch.dtype == np.int32
    np.testing.assert_array_equal(batch, next(ref)["tokens"])


def test_shard_iterator_processes_and_state(prepared):
  rows, _ = arrayrecord.read_split(prepared, "train")
  p0 = _shard_iterator(prepared, seed=2, process_index=0, process_count=2)
  p1 = _shard_iterator(prepared, seed=2, process_index=1, process_count=2)
  whole = _shard_iterator(prepared, seed=2)
  for _ in range(3):
    a, b = next(p0)["tokens"], next(p1)["tokens"]
    assert a.shape == b.shape == (4, 16)
    np.testing.assert_array_equal(np.concatenate([a, b]), next(whole)["tokens"])
    ids_a = {r.tobytes() for r in a}
    assert not ids_a & {r.tobytes() for r in b}
  state = json.loads(json.dumps(p1.get_state()))
  expected = [next(p1)["tokens"] for _ in range(3)]
  fresh = _shard_iterator(prepared, seed=2, process_index=1, process_count=2)
  fresh.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(fresh)["tokens"], want)
  assert rows.shape[1] == 16


def test_load_corpus_arrayrecord(prepared, spm_path):
  values = dict(base.get_base_config().data)
  values.update(source="arrayrecord", train_files=prepared, seq_len=16)
  corpus = pipeline.load_corpus(pipeline.DataConfig(**values), workdir="unused")
  np.testing.assert_array_equal(corpus.train, arrayrecord.read_split(prepared, "train")[0])
  np.testing.assert_array_equal(corpus.val, arrayrecord.read_split(prepared, "val")[0])
  assert corpus.vocab_size == 400 and corpus.tokenizer.path == spm_path
  assert corpus.info["tokenizer"]["sha256"] == corpus.tokenizer.identity()["sha256"]


# ---- (g) errors.


def test_reader_errors(prepared, tmp_path, bpe_json):
  with pytest.raises(DataError, match="No prepared data directory at .*nowhere.*prepare_data.py"):
    arrayrecord.open_shards(str(tmp_path / "nowhere"), "train")
  with pytest.raises(DataError, match="has no metadata.json"):
    arrayrecord.open_shards(str(tmp_path), "train")
  with pytest.raises(DataError, match="rows of 16 tokens but data.seq_len is 32.*--seq_len=32"):
    arrayrecord.open_shards(prepared, "train", seq_len=32)
  sha = prepare.load_any_tokenizer(bpe_json).identity()["sha256"]
  with pytest.raises(DataError, match="another tokenizer"):
    arrayrecord.open_shards(prepared, "validation", tokenizer_sha256=sha)
  with pytest.raises(DataError, match="fewer than one global batch"):
    _shard_iterator(prepared, global_batch=100_000)


def test_prepare_input_errors(tmp_path, spm_path):
  with pytest.raises(DataError, match="--inputs: no file matches"):
    prepare.prepare(_cfg(tmp_path / "*.txt", tmp_path / "out", spm_path))
  (tmp_path / "latin.txt").write_bytes(b"ok\xff")
  with pytest.raises(DataError, match="latin.txt: not valid UTF-8"):
    prepare.prepare(_cfg(tmp_path / "latin.txt", tmp_path / "out", spm_path))
