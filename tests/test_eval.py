"""The eval binary: the bound against brute force, its validity on a known source, its error bars, loading errors,
datasets, curves, geometry, and a whole run through launch/eval.py."""

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from conftest import TINY_DIFFUSION, TINY_MODEL, perturbed_params
from replaid_jax import checkpoint as ckpt_lib
from replaid_jax import config_lib
from replaid_jax import errors
from replaid_jax.data import pipeline
from replaid_jax.data import sources
from replaid_jax.data import tokenizer as tokenizer_lib
from replaid_jax.diffusion import elbo
from replaid_jax.diffusion import time_sampling
from replaid_jax.eval import analyses
from replaid_jax.eval import bound as bound_lib
from replaid_jax.eval import curves as curves_lib
from replaid_jax.eval import datasets
from replaid_jax.eval import geometry as geometry_lib
from replaid_jax.eval import run
from replaid_jax.eval import zero_shot
from replaid_jax.models import embedding
from replaid_jax.objectives import base
from replaid_jax.objectives import replaid
from replaid_jax.train import loop
from replaid_jax.train import build as build_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- a known source: a Markov chain with an exact entropy rate.

V, L = 32, 32


def _markov(seed: int = 0):
  """Transition matrix with two likely successors per token, its stationary law and the exact entropy per token
  of a length-L sequence started from the stationary law."""
  rng = np.random.default_rng(seed)
  p = np.full((V, V), 1e-3)
  for i in range(V):
    p[i, rng.choice(V, 2, replace=False)] += [0.7, 0.3]
  p /= p.sum(1, keepdims=True)
  w, vecs = np.linalg.eig(p.T)
  pi = np.abs(np.real(vecs[:, np.argmax(np.real(w))]))
  pi /= pi.sum()
  h_row = -(p * np.log(p)).sum(1)
  entropy = (-(pi * np.log(pi)).sum() + (L - 1) * pi @ h_row) / L
  return p, pi, float(entropy)


def _sample_chain(p, pi, n, rng):
  out = np.zeros((n, L), np.int32)
  out[:, 0] = rng.choice(V, n, p=pi)
  for t in range(1, L):
    out[:, t] = np.minimum((rng.random((n, 1)) > np.cumsum(p[out[:, t - 1]], axis=1)).sum(1), V - 1)
  return out


@pytest.fixture(scope="module")
def markov_run():
  """A width-64, 2-layer model trained on the chain; parameters saved at steps 0, 250 and 600."""
  p, pi, entropy = _markov()
  rng = np.random.default_rng(1)
  train, val = _sample_chain(p, pi, 4096, rng), _sample_chain(p, pi, 128, rng)
  corpus = pipeline.Corpus(train=train, val=val, vocab_size=V, tokenizer=None, info={},
                           unigram_counts=np.bincount(train.reshape(-1), minlength=V).astype(np.float64))
  cd = tiny.get_config()
  cd.model.width, cd.model.num_heads, cd.model.cond_dim = 64, 2, 64
  cd.model.output_bias_init = "unigram"
  cd.train.batch_size, cd.train.num_steps = 32, 600
  cd.optim.lr, cd.optim.warmup_steps = 3e-3, 20
  c = build_lib.resolve_vocab(config_lib.from_config_dict(cd), corpus)
  r = build_lib.build(c, corpus, devices=jax.devices()[:1])
  step_fn = build_lib.compile_step(r)
  state, key = r.state, jax.random.key(0)
  saved = {}
  for i in range(c.train.num_steps + 1):
    if i in (0, 250, 600):
      saved[i] = jax.device_get(state.params)
    if i < c.train.num_steps:
      state, _ = step_fn(state, jnp.asarray(train[rng.integers(0, len(train), 32)]), key)
  return {"config": c, "val": val, "entropy": entropy, "params": saved, "unigram_counts": corpus.unigram_counts}


@functools.lru_cache(maxsize=None)
def _bound_fn(k, model_cfg, cfg):
  return bound_lib.make_bound_fn(replaid.RePlaid(base.Sections(model_cfg, cfg)), num_times=k)


def _bound(params, tokens, *, k, model_cfg, cfg, seed=7, batch_size=64):
  return analyses.bound_report(_bound_fn(k, model_cfg, cfg), params, tokens, jax.random.key(seed),
                               batch_size=batch_size)


@pytest.mark.slow
def test_bound_is_valid_on_a_markov_source_and_its_gap_shrinks_with_training(markov_run):
  """Never below the exact entropy beyond 3 standard errors; the gap shrinks from step 0 to 250 to 600."""
  c, val, entropy = markov_run["config"], markov_run["val"], markov_run["entropy"]
  unigram = bound_lib.unigram_cross_entropy(markov_run["unigram_counts"], val)
  gaps = []
  for step in (0, 250, 600):
    res, _ = _bound(markov_run["params"][step], val, k=8, model_cfg=c.model, cfg=c.diffusion)
    assert res["nats_per_token"] > entropy - 3 * res["stderr"], (step, res["nats_per_token"], entropy)
    gaps.append(res["nats_per_token"] - entropy)
    print(f"step {step}: bound {res['nats_per_token']:.4f} ± {res['stderr']:.4f}, true entropy {entropy:.4f}, "
          f"gap {gaps[-1]:.4f}, unigram {unigram:.4f}")
  assert gaps[0] > gaps[1] > gaps[2] > 0
  assert gaps[2] < 0.5 * (unigram - entropy)  # training closed more than half of the unigram model's gap


def _brute_force_bound(params, tokens, *, model_cfg, cfg, num_t=96, recon_draws=6, seed=11):
  """The same ELBO per sequence by a different route: CE at t = 0 averaged over noise draws, the diffusion
  integral by the midpoint rule on `num_t` points, the prior KL in closed form in float64 numpy."""
  fn = jax.jit(functools.partial(curves_lib.terms_at, model_cfg=model_cfg, cfg=cfg))
  n = tokens.shape[0]
  tok = jnp.asarray(tokens)
  key = jax.random.key(seed)
  recon = np.mean([np.asarray(fn(params, tok, jnp.zeros((n,)), jax.random.fold_in(key, i))["ce"], np.float64)
                   for i in range(recon_draws)], axis=0)
  grid = (np.arange(num_t) + 0.5) / num_t
  diff = np.mean([np.asarray(fn(params, tok, jnp.full((n,), t, jnp.float32), jax.random.fold_in(key, 1000 + j))
                             ["diffusion"], np.float64) for j, t in enumerate(grid)], axis=0)
  g1 = float(params["bounds"]["gamma_1"])
  alpha2 = 1.0 / (1.0 + math.exp(g1))
  log_sigma2 = -math.log1p(math.exp(-g1))
  e = np.asarray(embedding.lookup(embedding.normalized(params["embedding"]), tok), np.float64)
  d = e.shape[-1]
  prior = np.mean(0.5 * (-d * log_sigma2 - d * alpha2 + alpha2 * np.sum(e * e, -1)), axis=-1)
  return recon + diff + prior


@pytest.mark.slow
@pytest.mark.parametrize("which", ["perturbed_init", "trained"])
def test_eval_bound_equals_a_brute_force_elbo_within_its_standard_error(markov_run, which):
  if which == "trained":
    params, model_cfg, cfg = markov_run["params"][600], markov_run["config"].model, markov_run["config"].diffusion
    tokens = markov_run["val"][:64]
  else:
    params, model_cfg, cfg = perturbed_params(jax.random.key(3)), TINY_MODEL, TINY_DIFFUSION
    tokens = np.asarray(jax.random.randint(jax.random.key(4), (64, 16), 0, TINY_MODEL.vocab_size), np.int32)
  res, per = _bound(params, tokens, k=8, model_cfg=model_cfg, cfg=cfg)
  brute = _brute_force_bound(params, tokens, model_cfg=model_cfg, cfg=cfg)
  diff = res["nats_per_token"] - brute.mean()
  paired_se = np.std(per["total"] - brute, ddof=1) / math.sqrt(len(brute))
  print(f"{which}: eval {res['nats_per_token']:.4f} ± {res['stderr']:.4f} (K=8), brute force {brute.mean():.4f}, "
        f"difference {diff:+.4f} = {diff / res['stderr']:+.2f} SE, paired MC SE {paired_se:.4f}")
  assert abs(diff) < 2 * res["stderr"]  # measured: 0.8 SE (perturbed init), 0.9 SE (trained)
  assert abs(diff) < 3 * paired_se


@pytest.mark.parametrize("rows, batch, limit", [(10, 4, None), (8, 4, None), (3, 4, None), (10, 4, 2)])
def test_padded_batches_have_one_shape_and_give_every_row_once(rows, batch, limit):
  tokens = np.arange(rows * 2).reshape(rows, 2)
  seen = []
  for b, chunk, valid in bound_lib.padded_batches(tokens, batch, limit):
    assert chunk.shape == (batch, 2) and 0 < valid <= batch
    np.testing.assert_array_equal(chunk[valid:], np.repeat(chunk[:1], batch - valid, axis=0))
    seen.append(chunk[:valid])
    assert b == len(seen) - 1
  expected = tokens if limit is None else tokens[:limit * batch]
  np.testing.assert_array_equal(np.concatenate(seen), expected)


@pytest.mark.slow
def test_standard_error_falls_like_one_over_sqrt_sequences_times_k():
  """SE * sqrt(N K) stays within a factor 2 as N grows 4x and K grows 4x and 16x."""
  params = perturbed_params(jax.random.key(5))
  tokens = np.asarray(jax.random.randint(jax.random.key(6), (256, 16), 0, TINY_MODEL.vocab_size), np.int32)
  scaled = {}
  for n, k in ((64, 1), (256, 1), (64, 4), (64, 16)):
    res, _ = _bound(params, tokens[:n], k=k, model_cfg=TINY_MODEL, cfg=TINY_DIFFUSION)
    scaled[(n, k)] = res["stderr"] * math.sqrt(n * k)
  print("SE * sqrt(N K):", {f"N={n},K={k}": round(v, 4) for (n, k), v in scaled.items()})
  assert max(scaled.values()) / min(scaled.values()) < 2.0
  exponent_k = math.log(scaled[(64, 16)] / scaled[(64, 1)]) / math.log(16) - 0.5
  exponent_n = math.log(scaled[(256, 1)] / scaled[(64, 1)]) / math.log(4) - 0.5
  print(f"fitted exponents: SE ~ K^{exponent_k:.3f}, SE ~ N^{exponent_n:.3f}")


def test_curves_terms_match_the_elbo_terms_at_the_same_noise():
  params = perturbed_params(jax.random.key(8))
  tokens = jax.random.randint(jax.random.key(9), (8, 16), 0, TINY_MODEL.vocab_size)
  t = jnp.linspace(0.05, 0.95, 8)
  key = jax.random.key(10)
  ours = jax.jit(functools.partial(curves_lib.terms_at, model_cfg=TINY_MODEL, cfg=TINY_DIFFUSION))(
      params, tokens, t, key)
  noise = jax.random.normal(key, tokens.shape + (TINY_MODEL.embed_dim,), jnp.float32)
  from replaid_jax.models import noise_schedule  # pylint: disable=g-import-not-at-top
  gt, dgt = noise_schedule.gamma_tilde_and_deriv(params["schedule"], t, TINY_DIFFUSION.schedule)
  for recon, name, ours_name in ((False, "diffusion", "diffusion"), (True, "recon", "ce")):
    terms = jax.jit(functools.partial(elbo.per_example_terms, model_cfg=TINY_MODEL, cfg=TINY_DIFFUSION))(
        params, gt, dgt, tokens, time_sampling.eval_plan(t, recon=recon), key, pscale=jnp.float32(1.0), noise=noise)
    np.testing.assert_allclose(ours[ours_name], getattr(terms, name), rtol=1e-4, atol=1e-5)
  assert np.all((np.asarray(ours["error"]) >= 0) & (np.asarray(ours["error"]) <= 1))


def test_curves_and_linear_fit():
  params = perturbed_params(jax.random.key(12))
  tokens = np.asarray(jax.random.randint(jax.random.key(13), (24, 16), 0, TINY_MODEL.vocab_size), np.int32)
  fn = curves_lib.make_terms_fn(model_cfg=TINY_MODEL, cfg=TINY_DIFFUSION)
  out = curves_lib.compute(fn, params, tokens, jax.random.key(14), num_points=5, batch_size=16)
  assert out["t"] == [0.0, 0.25, 0.5, 0.75, 1.0] and out["num_sequences"] == 24
  ce = np.asarray(out["ce"]["mean"])
  assert ce[-1] > ce[0]  # less is known about x at t = 1 than at t = 0
  fit = curves_lib.linear_fit(np.arange(5.0), 2.0 + 3.0 * np.arange(5.0))
  assert fit["r2"] == pytest.approx(1.0) and fit["slope"] == pytest.approx(3.0)


def test_geometry_finds_the_rank_of_a_low_rank_embedding(tmp_path):
  rng = np.random.default_rng(0)
  basis = rng.normal(size=(3, 16))
  table = rng.normal(size=(40, 3)) @ basis
  params = {"embedding": {"table": jnp.asarray(table, jnp.float32)}}
  counts = np.arange(40, dtype=np.float64)
  result = geometry_lib.analyse(params, counts, top_tokens=5, k=3)
  assert result["all_rows"]["components_for_90pct"] <= 3
  assert sum(result["all_rows"]["explained_variance_ratio"][3:]) < 1e-6
  assert [row["id"] for row in result["neighbours"]] == [39, 38, 37, 36, 35]
  assert all(len(row["neighbours"]) == 3 and row["id"] not in [n["id"] for n in row["neighbours"]]
             for row in result["neighbours"])
  assert os.path.getsize(geometry_lib.save_scree(result, str(tmp_path / "scree.png"), "t")) > 1000


# ---- datasets.


def test_detokenisers_and_document_splitting(tmp_path):
  assert (zero_shot.detok_wikitext(" The 1 @,@ 000 @-@ year war , in 1 @.@ 5 days . ")
          == "The 1,000-year war, in 1.5 days.")
  assert zero_shot.detok_wikitext(" = = Early life = = ") == "== Early life =="
  assert zero_shot.detok_ptb("the company 's shares ca n't fall <unk> N \\/ share") == \
      "the company's shares can't fall <unk> N / share"
  wiki = tmp_path / "wiki.test.raw"
  wiki.write_text(" \n = Alpha = \n \n Alpha is a letter . \n \n = = History = = \n \n Old . \n"
                  " = Beta = \n \n Beta follows . \n")
  docs = zero_shot.read_wikitext(str(wiki))
  assert len(docs) == 2 and docs[0].startswith(" = Alpha = ") and "History" in docs[0] and "Beta" in docs[1]


def test_a_missing_zero_shot_set_names_the_files_and_the_config_key(tmp_path):
  tok = _train_tokenizer(tmp_path, 384)
  data_cfg = config_lib.from_config_dict(tiny.get_config()).data
  with pytest.raises(errors.DataError) as e:
    datasets.load("wikitext2", split="test", data_cfg=data_cfg, vocab_size=tok.vocab_size, tok=tok,
                  workdir=str(tmp_path), data_dir=str(tmp_path / "nothing"))
  msg = str(e.value)
  assert "wikitext-2-raw/wiki.test.raw" in msg and "--config.eval.data_dir" in msg and "wikitext-2-raw-v1.zip" in msg
  with pytest.raises(errors.ConfigError, match="no 'validation' split"):
    datasets.load("lm1b", split="validation", data_cfg=data_cfg, vocab_size=tok.vocab_size, tok=tok,
                  workdir=str(tmp_path), data_dir=str(tmp_path))
  with pytest.raises(errors.ConfigError, match="unknown"):
    datasets.load("wikitext5", split="test", data_cfg=data_cfg, vocab_size=tok.vocab_size, tok=tok,
                  workdir=str(tmp_path))


def test_every_zero_shot_set_reads_its_local_release_layout(tmp_path):
  tok = _train_tokenizer(tmp_path, 384)
  data_cfg = config_lib.from_config_dict(tiny.get_config()).data
  root = tmp_path / "data"
  files = {
      "wikitext103": ("wikitext-103-raw/wiki.test.raw", " = A = \n \n the 1 @-@ 2 war . \n = B = \n \n more text . \n"),
      "ptb": ("ptb.test.txt", " the <unk> 's N shares \n it ca n't \n"),
      "lm1b": (zero_shot.ZERO_SHOT["lm1b"].files["test"][0], "He said : \" yes . \"\nShe did n't .\n"),
      "lambada": ("lambada_test.jsonl", json.dumps({"text": "\u201cHi,\u201d she said"}) + "\n"),
      "ag_news": ("ag_news_csv/test.csv", '"3","Title one","Body #39;s text \\ more"\n"1","T2","B2"\n'),
      "pubmed": ("pubmed-dataset/test.txt", json.dumps({"article_text": ["a b .", "c d ."]}) + "\n"),
      "arxiv": ("arxiv/test.jsonl", json.dumps({"article": "we show that @xmath0 , as claimed ."}) + "\n"),
  }
  for name, (rel, text) in files.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text * 40)
    es = datasets.load(name, split="test", data_cfg=data_cfg, vocab_size=tok.vocab_size, tok=tok,
                       workdir=str(tmp_path), data_dir=str(root))
    p = es.protocol
    assert (es.name, es.split, p["source"]) == (name, "test", str(root / rel)), name
    assert p["num_documents"] == {"wikitext103": 80}.get(name, 40 * text.count("\n")) and es.tokens.shape[1] == 32
    assert p["word_level"] == (name in ("wikitext103", "ptb", "lm1b", "lambada")) and p["words_per_token"] > 0
  assert zero_shot.detok_lm1b('He said : " yes . "') == 'He said: "yes."'
  assert zero_shot.detok_lambada("\u201cHi,\u201d she said ") == '"Hi," she said'
  assert zero_shot.read_ag_news_csv(str(root / files["ag_news"][0]))[0] == "Title one Body #39;s text \\ more"
  assert zero_shot.read_papers(str(root / files["pubmed"][0]))[0] == "a b . c d ."


def test_a_zero_shot_set_reads_a_prepared_tfds_builder_without_tensorflow(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  rows = [{"title": f"Title {i}", "description": f"the {i}th body of news text."} for i in range(60)]

  class ReplaidTinyNews(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Two text features, like ag_news_subset, in ArrayRecord files."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"title": tfds.features.Text(), "description": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      yield from enumerate(rows)

  root = tmp_path / "tfds"
  ReplaidTinyNews(data_dir=str(root), file_format="array_record").download_and_prepare()
  spec = dataclasses.replace(zero_shot.ZERO_SHOT["ag_news"], tfds=("replaid_tiny_news", ("title", "description")))
  monkeypatch.setitem(zero_shot.ZERO_SHOT, "ag_news", spec)
  tok = _train_tokenizer(tmp_path, 384)
  data_cfg = config_lib.from_config_dict(tiny.get_config()).data
  es = datasets.load("ag_news", split="test", data_cfg=data_cfg, vocab_size=tok.vocab_size, tok=tok,
                     workdir=str(tmp_path), data_dir=str(root))  # no local files there: the builder is read
  assert es.protocol["num_documents"] == 60 and "replaid_tiny_news" in es.protocol["source"]
  docs, _ = zero_shot._tfds_docs(spec, "test", str(root))  # pylint: disable=protected-access
  assert sorted(docs) == sorted(f"{r['title']} {r['description']}" for r in rows)
  assert "tensorflow" not in sys.modules


# ---- a real training run: loading errors, zero-shot sets, watch, the binary.


def _plays_text(chars: int, *names: str) -> str:
  plays = sources.shakespeare_plays()
  return "".join(plays[n] for n in names)[:chars]


def _train_tokenizer(tmp_path, vocab: int) -> tokenizer_lib.Tokenizer:
  return tokenizer_lib.train_or_load_tokenizer([_plays_text(120_000, "macbeth")], vocab_size=vocab,
                                               model_type="unigram", cache_dir=str(tmp_path / f"tok{vocab}"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A 4-step tiny run on text files (tokenizer trained and cached in the workdir); checkpoints at 2 and 4."""
  root = tmp_path_factory.mktemp("run")
  (root / "train.txt").write_text(_plays_text(150_000, "macbeth", "othello"))
  (root / "val.txt").write_text(_plays_text(12_000, "the-comedy-of-errors"))
  cd = tiny.get_config()
  cd.data.source, cd.data.val_plays = "text", ""
  cd.data.train_files, cd.data.val_files = str(root / "train.txt"), str(root / "val.txt")
  cd.data.tokenizer_vocab_size = 384
  cd.eval.num_samples = 0
  workdir = root / "workdir"
  loop.train_and_evaluate(cd, str(workdir))
  return workdir


@pytest.fixture
def run_copy(trained_run, tmp_path):
  dst = tmp_path / "copy"
  shutil.copytree(trained_run, dst)
  return dst


def _edit_metadata(workdir, step, fn):
  """Edits a step's metadata and records the edit in its checksum manifest (as another code version would have
  written it); an edit without a new manifest is reported as damage."""
  path = workdir / "checkpoints" / str(step) / "metadata" / "metadata"
  meta = json.loads(path.read_text())
  fn(meta)
  path.write_text(json.dumps(meta))
  ckpt_lib.write_manifest(str(workdir / "checkpoints" / str(step)))


_QUICK = {"eval.max_batches": 1, "eval.final_num_times": 2}


def test_loading_fails_clearly_on_missing_partial_mismatched_checkpoints_and_tokenizers(run_copy, tmp_path):
  ev = functools.partial(run.evaluate_checkpoint, overrides=_QUICK, timing=False)
  with pytest.raises(errors.CheckpointError, match="no checkpoints at"):
    ev(str(tmp_path / "does_not_exist"))
  with pytest.raises(errors.CheckpointError, match=r"no complete checkpoint for step 3 .* available steps: \[2, 4\]"):
    ev(str(run_copy), step=3)
  shutil.rmtree(run_copy / "checkpoints" / "4" / "ema_params")
  with pytest.raises(errors.CheckpointError, match="step 4 .* damaged: ema_params/.* is missing.*pass --step=2"):
    ev(str(run_copy), step=4)
  os.remove(run_copy / "checkpoints" / "2" / "ema_params" / "manifest.ocdbt")
  with pytest.raises(errors.CheckpointError, match="step 2"):
    ev(str(run_copy), step=2)


def test_a_config_that_does_not_fit_the_parameters_is_refused(run_copy):
  _edit_metadata(run_copy, 4, lambda m: m["config"]["model"].update(width=64))
  with pytest.raises(errors.CheckpointError, match=r"does not fit the model .*model.width=64.*saved \(.*\) vs config"):
    run.evaluate_checkpoint(str(run_copy), step=4, overrides=_QUICK, timing=False)


def test_a_tokenizer_that_does_not_match_the_checkpoint_is_refused(run_copy, tmp_path):
  meta_path = run_copy / "checkpoints" / "4" / "metadata" / "metadata"
  recorded = json.loads(meta_path.read_text())["tokenizer"]["path"]
  local = run_copy / "tokenizer" / os.path.basename(recorded)
  _edit_metadata(run_copy, 4, lambda m: m["tokenizer"].update(path=str(local)))
  shutil.copy(_train_tokenizer(tmp_path, 400).path, local)  # another vocabulary at the recorded path
  with pytest.raises(errors.CheckpointError, match=r"does not match .*384 pieces.*400 pieces"):
    run.evaluate_checkpoint(str(run_copy), step=4, overrides=_QUICK, timing=False)
  os.remove(local)
  with pytest.raises(errors.CheckpointError, match="tokenizer is missing"):
    run.evaluate_checkpoint(str(run_copy), step=4, overrides=_QUICK, timing=False)


def test_only_eval_keys_can_be_overridden(trained_run):
  with pytest.raises(errors.ConfigError, match="only eval.. keys can"):
    run.evaluate_checkpoint(str(trained_run), overrides={"model.width": 8})
  with pytest.raises(errors.ConfigError, match="unknown config key 'eval.bogus'"):
    run.evaluate_checkpoint(str(trained_run), overrides={"eval.bogus": 1})


def test_zero_shot_set_from_a_local_copy_and_a_user_text_file(run_copy, tmp_path):
  data_dir = tmp_path / "zero_shot"
  (data_dir / "wikitext-2-raw").mkdir(parents=True)
  text = _plays_text(6000, "hamlet").replace(",", " ,").replace("-", " @-@ ")
  (data_dir / "wikitext-2-raw" / "wiki.test.raw").write_text(" = Hamlet = \n \n" + text + "\n = Second = \n \n" + text)
  out = tmp_path / "out"
  res = run.evaluate_checkpoint(str(run_copy), dataset="wikitext2", output_dir=str(out), timing=False,
                                overrides={"eval.data_dir": str(data_dir), "eval.final_num_times": 2})
  p = res["protocol"]
  assert (res["dataset"], res["split"], p["num_documents"], p["word_level"]) == ("wikitext2", "test", 2, True)
  assert p["detokenizer"].startswith("detok_wikitext") and p["complete"] and p["tokens_dropped"] < p["seq_len"]
  assert p["num_sequences"] * p["seq_len"] + p["tokens_dropped"] == round(p["words"] / p["words_per_token"])
  assert res["word_perplexity_bound"] == pytest.approx(math.exp(res["nats_per_token"] / p["words_per_token"]))
  assert (out / "wikitext2_test_step4.json").exists()
  (tmp_path / "my_text.txt").write_text(text)
  res = run.evaluate_checkpoint(str(run_copy), dataset=f"text:{tmp_path}/my_*.txt", output_dir=str(out),
                                timing=False, overrides={"eval.final_num_times": 2})
  assert (res["dataset"], res["split"], res["protocol"]["num_documents"]) == ("text-my_", "text", 1)
  assert res["path"] == str(out / "text-my__text_step4.json") and os.path.exists(res["path"])


def test_watch_evaluates_each_checkpoint_once(run_copy):
  sleeps = []
  first = run.watch(str(run_copy), overrides=_QUICK, timing=False, max_iterations=2, sleep=sleeps.append,
                    poll_seconds=0.5)
  assert [r["step"] for r in first] == [2, 4] and sleeps == [0.5]
  assert [os.path.basename(r["path"]) for r in first] == ["validation_validation_step2_quick1.json",
                                                          "validation_validation_step4_quick1.json"]
  again = run.watch(str(run_copy), overrides=_QUICK, timing=False, max_iterations=1)
  assert again == []  # results already on disk


def _eval_cli(*args):
  cmd = [sys.executable, os.path.join(REPO, "launch", "eval.py"), *args]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)


def test_help_is_short_and_lists_only_the_eval_keys():
  proc = _eval_cli("--help")
  lines = proc.stdout.splitlines()
  assert len(lines) < 60, len(lines)
  assert "  --config: Evaluation settings" in proc.stdout and "final_num_times=8" in proc.stdout
  assert "model:" not in proc.stdout and "!!python" not in proc.stdout


@pytest.mark.slow
def test_end_to_end_through_the_eval_binary(run_copy):
  proc = _eval_cli(f"--workdir={run_copy}", "--curves", "--geometry", "--config.eval.curve_points=5",
                   "--config.eval.curve_max_sequences=16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The progress lines (replaid_jax/progress.py): the first unit has no ETA yet (it carries the compilation).
  assert re.search(r"\] bound [^:\n]+ step 4: 1/(\d+) batches \(\d+%\)(, [\d,]+ tokens/s)?\n", proc.stderr)
  assert re.search(r"\] bound [^:\n]+ step 4: (\d+)/\1 batches \(100%\)", proc.stderr)
  assert re.search(r"\] curves [^:\n]+ step 4: 5/5 grid points \(100%\), [\d.,]+ grid points/s, ETA 0:00:00",
                   proc.stderr)
  out = run_copy / "eval"
  res = json.loads((out / "validation_validation_step4.json").read_text())
  final = json.loads((out / "final.json").read_text())  # the training loop's own evaluation
  p = res["protocol"]
  assert res["step"] == 4 and res["num_times"] == 8 and p["complete"]  # K = 8, whole split, by default
  assert res["num_sequences"] == p["num_sequences_available"] == final["data"]["val_rows"]
  assert res["num_tokens"] == res["num_sequences"] * 32 and p["tokens_dropped"] == final["data"]["val_tokens_dropped"]
  assert abs(res["nats_per_token"] - final["nats_per_token"]) < 4 * math.hypot(res["stderr"], final["stderr"])
  assert res["ci95"][0] < res["nats_per_token"] < res["ci95"][1] and res["stderr"] > 0
  assert res["bits_per_token"] == pytest.approx(res["nats_per_token"] / math.log(2))
  assert res["perplexity_bound"] == pytest.approx(math.exp(res["nats_per_token"]))
  assert res["recon"] + res["diffusion"] + res["prior"] == pytest.approx(res["nats_per_token"])
  per = np.load(out / res["per_sequence_file"])  # each sequence's bound, for paired comparisons
  assert res["per_sequence_file"] == "validation_validation_step4_per_sequence.npy"
  assert per.shape == (res["num_sequences"],) and per.mean() == pytest.approx(res["nats_per_token"], rel=1e-9)
  assert per.std(ddof=1) / math.sqrt(per.size) == pytest.approx(res["stderr"], rel=1e-9)
  assert len(p["tokens_sha256"]) == 64
  thr = res["throughput"]
  assert thr["tokens_per_s"] > 0 and thr["ideal_ratio_to_selfcond_forward"] == 9
  assert res["curves"]["summary"]["ce_linear_fit"]["r2"] <= 1.0 and len(res["curves"]["t"]) == 5
  assert (out / "curves_validation_validation_step4.png").stat().st_size > 1000
  geo = json.loads((out / "geometry_step4.json").read_text())
  assert 1 <= geo["all_rows"]["components_for_90pct"] <= 16 and len(geo["neighbours"]) == 20
  assert (out / "geometry_step4.png").stat().st_size > 1000
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))
  assert "step 4 | validation |" in proc.stdout and "nats/token" in proc.stdout
  assert "ETA" in proc.stderr
  # No warnings: orbax's notices about read-only opening and per-item metadata are by design, not shown.
  assert not [line for line in proc.stderr.splitlines() if line.startswith("W")], proc.stderr[-3000:]


@pytest.mark.parametrize("args, expected", [
    (["--workdir=/nonexistent/run"], "no checkpoints at"),
    (["--config.model.width=8"], "only eval.* keys can"),
    (["--config.eval.max_batchs=1"], "error: unknown config key eval.max_batchs; did you mean eval.max_batches?"),
])
def test_bad_input_ends_with_one_clear_message_and_no_traceback(trained_run, args, expected):
  if not any(a.startswith("--workdir") for a in args):
    args = [f"--workdir={trained_run}", *args]
  proc = _eval_cli(*args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.count(expected) == 1 and "Traceback" not in proc.stderr  # printed once, not also logged
