"""Tests of the data layer: sources, tokenizer, packing and the train iterator."""

import dataclasses
import json
import os
import re

import grain
import numpy as np
import pytest
import sentencepiece as spm

from configs import base
from replaid_jax.data import pipeline
from replaid_jax.data import sources
from replaid_jax.data import tokenizer as tokenizer_lib
from replaid_jax.errors import ConfigError, DataError

VAL_PLAYS = "hamlet,the-tempest,twelfth-night"


def _cfg(**overrides) -> pipeline.DataConfig:
  values = dict(base.get_base_config().data)
  values.update(overrides)
  return pipeline.DataConfig(**values)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pipeline.Corpus:
  """The embedded corpus with a small trained tokenizer, built once per module."""
  workdir = tmp_path_factory.mktemp("workdir")
  return pipeline.load_corpus(_cfg(tokenizer_vocab_size=512, seq_len=64),
                              workdir=str(workdir))


# ---- sources: the embedded plays.


def test_strip_markdown():
  md = ("# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n\n\n**BERNARDO**  \n"
        "Who's there?  \nNay, answer me.\n__\\[Aside]_  \n\\--odours sweet\n")
  assert sources.strip_markdown(md) == (
      "Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO\nWho's there?\n"
      "Nay, answer me.\n[Aside]\n--odours sweet\n")


def test_plays_are_plain_text():
  plays = sources.shakespeare_plays()
  assert len(plays) == 38
  assert list(plays) == sorted(plays)
  assert {"hamlet", "the-tempest", "twelfth-night", "macbeth"} <= set(plays)
  for name, text in plays.items():
    assert not set("*_#\\") & set(text), name
    assert "  \n" not in text and "\n\n\n" not in text, name
  assert plays["hamlet"].startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore.")


def test_shakespeare_split_holds_out_whole_plays():
  plays = sources.shakespeare_plays()
  train, val = sources.shakespeare_split(VAL_PLAYS.split(","))
  assert len(train) == 35 and len(val) == 3
  assert sorted(train + val) == sorted(plays.values())
  assert not set(train) & set(val)
  assert plays["hamlet"] in val and plays["macbeth"] in train


def test_shakespeare_split_unknown_play():
  with pytest.raises(DataError, match="data.val_plays.*hamlet"):
    sources.shakespeare_split(["hamlet", "hamlett"])


# ---- sources: files.


def test_read_text_files_txt_and_jsonl(tmp_path):
  (tmp_path / "a.txt").write_text("first doc\nline two\n")
  (tmp_path / "b.txt").write_text("  \n")  # blank: dropped
  (tmp_path / "c.jsonl").write_text(
      json.dumps({"text": "third", "id": 1}) + "\n\n" + json.dumps({"text": "fourth"}) + "\n")
  docs = sources.read_text_files(f"{tmp_path}/*.txt, {tmp_path}/c.jsonl",
                                 jsonl_field="text", what="data.train_files")
  assert docs == ["first doc\nline two\n", "third", "fourth"]


def test_missing_file(tmp_path):
  with pytest.raises(DataError, match="data.train_files.*nope.txt"):
    sources.read_text_files(str(tmp_path / "nope.txt"), jsonl_field="text",
                            what="data.train_files")
  with pytest.raises(DataError, match="data.val_files: no file matches"):
    sources.read_text_files(f"{tmp_path}/*.txt", jsonl_field="text", what="data.val_files")


def test_unsupported_suffix(tmp_path):
  (tmp_path / "a.csv").write_text("x")
  with pytest.raises(DataError, match="a.csv.*suffix"):
    sources.read_text_files(str(tmp_path / "a.csv"), jsonl_field="text",
                            what="data.train_files")


def test_empty_corpus(tmp_path):
  (tmp_path / "a.txt").write_text(" \n\n")
  with pytest.raises(DataError, match="data.train_files: empty corpus"):
    sources.read_text_files(str(tmp_path / "a.txt"), jsonl_field="text",
                            what="data.train_files")


def test_non_utf8_file(tmp_path):
  (tmp_path / "latin.txt").write_bytes(b"ok\xff\xfe")
  with pytest.raises(DataError, match=r"latin.txt.*byte offset 2.*iconv"):
    sources.read_text_files(str(tmp_path / "latin.txt"), jsonl_field="text",
                            what="data.train_files")


def test_jsonl_missing_field(tmp_path):
  (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
  with pytest.raises(DataError, match=r"d.jsonl:2: no field 'text' \(data.jsonl_field\)"):
    sources.read_text_files(str(tmp_path / "d.jsonl"), jsonl_field="text",
                            what="data.train_files")


def test_read_token_arrays(tmp_path):
  np.save(tmp_path / "a.npy", np.array([1, 2, 3], np.uint16))
  np.save(tmp_path / "b.npy", np.array([[4, 5], [6, 7]], np.int64))
  tokens = sources.read_token_arrays(f"{tmp_path}/a.npy,{tmp_path}/b.npy",
                                     vocab_size=8, what="data.train_files")
  assert tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens, [1, 2, 3, 4, 5, 6, 7])


def test_token_array_errors(tmp_path):
  np.save(tmp_path / "a.npy", np.array([1, 9, 3]))
  np.save(tmp_path / "f.npy", np.array([1.0, 2.0]))
  with pytest.raises(DataError, match="data.npy_vocab_size"):
    sources.read_token_arrays(str(tmp_path / "a.npy"), vocab_size=None, what="data.train_files")
  with pytest.raises(DataError, match=r"a.npy: token id 9 .*data.npy_vocab_size"):
    sources.read_token_arrays(str(tmp_path / "a.npy"), vocab_size=8, what="data.train_files")
  with pytest.raises(DataError, match=r"f.npy: dtype float64"):
    sources.read_token_arrays(str(tmp_path / "f.npy"), vocab_size=8, what="data.train_files")


# ---- packing.


def test_pack_exact():
  # Stream: 5 6 7 EOS 8 EOS 9 10 EOS.
  rows, dropped = pipeline.pack([[5, 6, 7], [8], [9, 10]], eos_id=2, seq_len=4)
  np.testing.assert_array_equal(rows, [[5, 6, 7, 2], [8, 2, 9, 10]])
  assert rows.dtype == np.int32
  assert dropped == 1  # the final EOS
  rows, dropped = pipeline.pack([[1]], eos_id=2, seq_len=4)
  assert rows.shape == (0, 4) and dropped == 2


# ---- tokenizer.


def test_tokenizer_round_trip(corpus):
  tok = corpus.tokenizer
  text = ("BERNARDO\nWho's there?\n\n  Nay, answer me:  stand,\nand unfold"
          " yourself.\n\n\nLong live the king! [Aside] & c.\n")
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.decode(np.array(ids, np.int32)) == text
  assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]
  assert tok.eos_id == 2 and tok.bos_id == 1 and tok.vocab_size == 512
  hamlet = sources.shakespeare_plays()["hamlet"]
  assert tok.decode(tok.encode(hamlet)) == hamlet


def test_display_escapes_control_characters_and_stray_bytes_and_decode_stays_exact(corpus):
  tok = corpus.tokenizer
  byte_id = {tok.id_to_piece(i): i for i in range(tok.vocab_size)}["<0xE2>"]  # a UTF-8 lead byte, alone
  ids = tok.encode("King\x16 é") + [byte_id] + tok.encode("\x0e end\n\tnext")
  assert tok.decode(ids) == "King\x16 é\ufffd\x0e end\n\tnext"  # exact (the stray byte as SentencePiece decodes it)
  shown = tok.display(ids)
  assert shown == "King\\x16 é\\xe2\\x0e end\n\tnext"
  assert tokenizer_lib.printable("a\x7f\ufffd\tb") == "a\\x7f\\uFFFD\tb"


def test_tokenizer_cache_reuse(corpus, monkeypatch):
  tok = corpus.tokenizer
  mtime = os.stat(tok.path).st_mtime_ns

  def no_training(*args, **kwargs):
    raise AssertionError("the cached tokenizer should have been loaded")

  monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_training)
  train, _ = sources.shakespeare_split(VAL_PLAYS.split(","))
  again = tokenizer_lib.train_or_load_tokenizer(
      train, vocab_size=512, model_type="unigram", cache_dir=os.path.dirname(tok.path))
  assert again.path == tok.path
  assert again.identity() == tok.identity()
  assert os.stat(tok.path).st_mtime_ns == mtime
  assert os.path.basename(tok.path).startswith("spm_unigram_512_")


def test_tokenizer_cache_key_and_atomic_write(tmp_path, caplog):
  texts = [sources.shakespeare_plays()["macbeth"]]
  caplog.set_level("INFO")
  a = tokenizer_lib.train_or_load_tokenizer(texts, vocab_size=400, model_type="bpe",
                                            cache_dir=str(tmp_path))
  said = [r.getMessage() for r in caplog.records]  # training says that it runs, then how long it took
  assert any(m.startswith("training a SentencePiece tokenizer (bpe, 400 pieces)") for m in said)
  assert any(re.fullmatch(r"trained the tokenizer in \d+\.\ds", m) for m in said)
  b = tokenizer_lib.train_or_load_tokenizer(texts, vocab_size=420, model_type="bpe",
                                            cache_dir=str(tmp_path))
  c = tokenizer_lib.train_or_load_tokenizer(texts + ["more"], vocab_size=400,
                                            model_type="bpe", cache_dir=str(tmp_path))
  assert len({a.path, b.path, c.path}) == 3
  assert sorted(os.listdir(tmp_path)) == sorted(
      os.path.basename(t.path) for t in (a, b, c))  # no temp files left
  identity = a.identity()
  assert identity["kind"] == "sentencepiece" and identity["vocab_size"] == 400
  assert len(identity["sha256"]) == 64


def test_a_new_run_on_the_same_corpus_takes_the_tokenizer_from_the_user_cache(tmp_path, monkeypatch):
  (tmp_path / "train.txt").write_text(sources.shakespeare_plays()["macbeth"][:60_000])
  (tmp_path / "val.txt").write_text(sources.shakespeare_plays()["hamlet"][:5_000])
  cfg = _cfg(source="text", train_files=str(tmp_path / "train.txt"), val_files=str(tmp_path / "val.txt"),
             val_plays="", tokenizer_vocab_size=384, seq_len=32)
  cache = tmp_path / "user_cache"
  monkeypatch.setenv(tokenizer_lib.CACHE_ENV, str(cache))
  assert tokenizer_lib.default_cache_dir() == str(cache)
  trained = []
  real_train = spm.SentencePieceTrainer.train
  monkeypatch.setattr(spm.SentencePieceTrainer, "train", lambda *a, **k: trained.append(1) or real_train(*a, **k))
  first = pipeline.load_corpus(cfg, workdir=str(tmp_path / "run1"))
  second = pipeline.load_corpus(cfg, workdir=str(tmp_path / "run2"))
  assert len(trained) == 1  # the second run found the model in the cache
  name = os.path.basename(first.tokenizer.path)
  assert os.listdir(cache) == [name]  # written atomically: no temporary file left
  # Each run records its own copy, which resumption and evaluation read.
  assert first.tokenizer.path == str(tmp_path / "run1" / "tokenizer" / name)
  assert second.tokenizer.path == str(tmp_path / "run2" / "tokenizer" / name)
  assert first.tokenizer.identity()["sha256"] == second.tokenizer.identity()["sha256"]
  np.testing.assert_array_equal(first.val, second.val)
  # Other settings train again; data.cache_dir overrides the user cache.
  pipeline.load_corpus(dataclasses.replace(cfg, tokenizer_vocab_size=400, cache_dir=str(tmp_path / "mine")),
                       workdir=str(tmp_path / "run3"))
  assert len(trained) == 2 and len(os.listdir(tmp_path / "mine")) == 1 and len(os.listdir(cache)) == 1
  monkeypatch.delenv(tokenizer_lib.CACHE_ENV)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert tokenizer_lib.default_cache_dir() == str(tmp_path / "xdg" / "replaid_jax" / "tokenizers")


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(DataError, match="data.tokenizer_path.*missing.model"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "missing.model"))
  (tmp_path / "bad.model").write_bytes(b"\x00\x01 not a model" * 4)
  with pytest.raises(DataError, match="bad.model.*not a SentencePiece model"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "bad.model"))


def test_tokenizer_without_eos(tmp_path):
  model = tmp_path / "no_eos.model"
  with open(model, "wb") as f:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sources.shakespeare_plays()["macbeth"].splitlines()),
        model_writer=f, vocab_size=300, model_type="bpe", eos_id=-1, minloglevel=2)
  with pytest.raises(DataError, match="no_eos.model.*end-of-sequence"):
    tokenizer_lib.load_tokenizer(str(model))


def test_tokenizer_settings_errors(tmp_path):
  with pytest.raises(ConfigError, match="data.tokenizer_type"):
    tokenizer_lib.train_or_load_tokenizer(["a"], vocab_size=512, model_type="wordpiece",
                                          cache_dir=str(tmp_path))
  with pytest.raises(ConfigError, match="data.tokenizer_vocab_size"):
    tokenizer_lib.train_or_load_tokenizer(["a"], vocab_size=100, model_type="bpe",
                                          cache_dir=str(tmp_path))
  with pytest.raises(DataError, match="data.tokenizer_vocab_size"):
    tokenizer_lib.train_or_load_tokenizer(["tiny text\n"], vocab_size=2000,
                                          model_type="unigram", cache_dir=str(tmp_path))


# ---- load_corpus.


def test_data_config_matches_base_config():
  fields = {f.name for f in dataclasses.fields(pipeline.DataConfig)}
  assert fields == set(base.get_base_config().data.keys())


def test_load_corpus_shakespeare(corpus):
  assert corpus.train.dtype == np.int32 and corpus.val.dtype == np.int32
  assert corpus.train.shape[1] == 64 and corpus.val.shape[1] == 64
  assert corpus.train.shape[0] > 10 * corpus.val.shape[0] > 0
  assert corpus.vocab_size == 512
  assert corpus.unigram_counts.dtype == np.float64
  assert corpus.unigram_counts.shape == (512,)
  assert corpus.unigram_counts.sum() == corpus.train.size
  assert corpus.unigram_counts[corpus.tokenizer.eos_id] >= 35 - 1
  info = json.loads(json.dumps(corpus.info))
  assert info["train_docs"] == 35 and info["val_docs"] == 3
  assert info["train_tokens"] == corpus.train.size
  assert 0 <= info["train_tokens_dropped"] < 64
  assert info["tokenizer"] == corpus.tokenizer.identity()
  assert os.path.basename(os.path.dirname(corpus.tokenizer.path)) == "tokenizer"


def test_load_corpus_text(corpus, tmp_path):
  (tmp_path / "train.txt").write_text(sources.shakespeare_plays()["macbeth"])
  (tmp_path / "val.jsonl").write_text(
      "\n".join(json.dumps({"body": "To be, or not to be: that is the question.\n" * 20})
                for _ in range(3)))
  cfg = _cfg(source="text", train_files=str(tmp_path / "train.txt"),
             val_files=str(tmp_path / "*.jsonl"), jsonl_field="body",
             tokenizer_path=corpus.tokenizer.path, seq_len=32)
  got = pipeline.load_corpus(cfg, workdir=str(tmp_path))
  assert got.train.shape[1] == got.val.shape[1] == 32
  assert got.info["val_docs"] == 3 and got.vocab_size == 512
  assert got.tokenizer.decode(got.val[0]).startswith("To be, or not to be")


def test_load_corpus_npy(tmp_path):
  np.save(tmp_path / "train.npy", np.arange(100) % 7)
  np.save(tmp_path / "val.npy", (np.arange(30) % 7).reshape(3, 10))
  cfg = _cfg(source="npy", train_files=str(tmp_path / "train.npy"),
             val_files=str(tmp_path / "val.npy"), npy_vocab_size=7, seq_len=8)
  got = pipeline.load_corpus(cfg, workdir=str(tmp_path))
  assert got.train.shape == (12, 8) and got.val.shape == (3, 8)
  np.testing.assert_array_equal(got.train.reshape(-1), np.arange(96) % 7)
  assert got.tokenizer is None and got.vocab_size == 7
  assert got.info["train_tokens_dropped"] == 4 and got.info["val_tokens_dropped"] == 6
  assert got.unigram_counts.sum() == 96


def test_load_corpus_errors(corpus, tmp_path):
  with pytest.raises(ConfigError, match="data.source='wiki'.*shakespeare, text, npy"):
    pipeline.load_corpus(_cfg(source="wiki"), workdir=str(tmp_path))
  with pytest.raises(DataError, match="data.seq_len"):
    pipeline.load_corpus(_cfg(seq_len=1), workdir=str(tmp_path))
  (tmp_path / "train.txt").write_text("some training text\n" * 50)
  with pytest.raises(ConfigError, match="data.val_files is empty"):
    pipeline.load_corpus(_cfg(source="text", train_files=str(tmp_path / "train.txt")),
                         workdir=str(tmp_path))
  with pytest.raises(ConfigError, match="data.train_files is set"):
    pipeline.load_corpus(_cfg(train_files=str(tmp_path / "train.txt")), workdir=str(tmp_path))
  (tmp_path / "val.txt").write_text("short\n")
  with pytest.raises(DataError, match="val split.*data.seq_len=128"):
    pipeline.load_corpus(
        _cfg(source="text", train_files=str(tmp_path / "train.txt"),
             val_files=str(tmp_path / "val.txt"), tokenizer_path=corpus.tokenizer.path),
        workdir=str(tmp_path))
  np.save(tmp_path / "t.npy", np.arange(600) % 600)
  with pytest.raises(DataError, match="data.tokenizer_path.*512 pieces.*600"):
    pipeline.load_corpus(
        _cfg(source="npy", train_files=str(tmp_path / "t.npy"), val_files=str(tmp_path / "t.npy"),
             npy_vocab_size=600, tokenizer_path=corpus.tokenizer.path),
        workdir=str(tmp_path))


# ---- train iterator.

_ROWS, _LEN = 40, 3
_TOKENS = np.arange(_ROWS * _LEN, dtype=np.int32).reshape(_ROWS, _LEN)


def _iterator(seed=0, *, global_batch=8, process_index=0, process_count=1, num_workers=0):
  return pipeline.train_iterator(_TOKENS, global_batch=global_batch, seed=seed,
                                 process_index=process_index, process_count=process_count,
                                 num_workers=num_workers)


def _row_ids(it, steps: int) -> list[list[int]]:
  """Row index of every sequence of the next `steps` batches."""
  out = []
  for _ in range(steps):
    tokens = next(it)["tokens"]
    assert tokens.dtype == np.int32
    out.append((tokens[:, 0] // _LEN).tolist())
  return out


def test_iterator_batches_and_epochs():
  batches = _row_ids(_iterator(), 10)  # two epochs of 5 batches
  assert all(len(b) == 8 for b in batches)
  first, second = sum(batches[:5], []), sum(batches[5:], [])
  assert sorted(first) == sorted(second) == list(range(_ROWS))
  assert first != second  # each epoch is shuffled afresh
  assert first != list(range(_ROWS))


def test_iterator_determinism():
  assert _row_ids(_iterator(seed=1), 6) == _row_ids(_iterator(seed=1), 6)
  assert _row_ids(_iterator(seed=1), 6) != _row_ids(_iterator(seed=2), 6)


def test_iterator_state_restores_following_batches():
  it = _iterator(seed=3)
  _row_ids(it, 7)
  state = json.loads(json.dumps(it.get_state()))
  expected = _row_ids(it, 6)
  fresh = _iterator(seed=3)
  fresh.set_state(state)
  assert _row_ids(fresh, 6) == expected


def test_iterator_orbax_checkpoint(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  it = _iterator(seed=4)
  _row_ids(it, 3)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = _row_ids(it, 4)
  fresh = _iterator(seed=4)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert _row_ids(fresh, 4) == expected


def test_process_shares_partition_the_global_batch():
  single = _row_ids(_iterator(seed=5), 8)
  p0 = _row_ids(_iterator(seed=5, process_index=0, process_count=2), 8)
  p1 = _row_ids(_iterator(seed=5, process_index=1, process_count=2), 8)
  for whole, a, b in zip(single, p0, p1):
    assert len(a) == len(b) == 4
    assert not set(a) & set(b)
    assert a + b == whole


def test_worker_processes_give_the_same_batches():
  it = _iterator(seed=6, num_workers=1)
  try:
    assert _row_ids(it, 5) == _row_ids(_iterator(seed=6), 5)
  finally:
    it.close()


def test_iterator_errors():
  with pytest.raises(ConfigError, match="divide by the 3 processes"):
    _iterator(global_batch=8, process_count=3)
  with pytest.raises(DataError, match="40 sequences.*train.batch_size"):
    _iterator(global_batch=64)
