"""Samplers, conditioning, the sampling CLI and the GPT-2 judge.

The sampler core is checked on an exact denoiser: for data that is one of a few
fixed sequences, E[e | z_t] is an analytic posterior mixture, so the samplers
must reproduce the data distribution and conditioning must select the matching
sequences.
"""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import tiny
from replaid_jax import errors
from replaid_jax import inference
from replaid_jax.diffusion import guidance
from replaid_jax.diffusion import sampler
from replaid_jax.models import embedding
from replaid_jax.sample import prompts
from replaid_jax.sample import quality
from replaid_jax.sample import run as run_lib
from replaid_jax.train import loop

from conftest import TINY_DIFFUSION, TINY_MODEL, perturbed_params, read_events

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---- an exact denoiser for data = one of three sequences (sharing some tokens).
V, L, D = 7, 5, 4
SEQS = np.array([[0, 1, 2, 3, 4], [0, 1, 5, 5, 6], [2, 3, 2, 3, 4]], np.int32)
PRIOR = np.array([0.2, 0.5, 0.3])
N = 600


def exact_denoiser(params, z, gamma, x_sc, *, t=None):
  """E[e | z_t] and the per-position token posteriors when x is SEQS[k] with probability PRIOR[k]."""
  del t, x_sc
  table = params["table"]
  alpha, sigma2 = jnp.sqrt(jax.nn.sigmoid(-gamma)), jax.nn.sigmoid(gamma)
  e = table[params["seqs"]]  # [K, L, D]
  dist2 = jnp.sum((z[:, None] - alpha[:, None, None, None] * e[None]) ** 2, axis=(2, 3))
  post = jax.nn.softmax(params["log_prior"] - dist2 / (2 * sigma2[:, None]), axis=-1)  # p(k | z_t)
  probs = jnp.einsum("bk,klv->blv", post, jax.nn.one_hot(params["seqs"], V))
  return jnp.log(probs + 1e-12), probs @ table


@pytest.fixture(scope="module")
def exact_params():
  rng = np.random.default_rng(0)
  table = rng.normal(size=(V, D))
  table /= np.linalg.norm(table, axis=1, keepdims=True)
  return {"table": jnp.asarray(table, jnp.float32), "seqs": jnp.asarray(SEQS),
          "log_prior": jnp.log(jnp.asarray(PRIOR, jnp.float32))}


def _exact_run(params, method, steps, cond=None, seed=0, n=N):
  t, gammas = np.linspace(0.0, 1.0, steps + 1), np.linspace(-5.0, 7.0, steps + 1)
  out = sampler.generate(exact_denoiser, params, jax.random.key(seed), sample_ids=jnp.arange(n), seq_len=L, t=t,
                         gammas=gammas, table=params["table"], method=method, cond=cond)
  tokens = np.asarray(out["tokens"])
  which = np.full(n, -1)
  for k, seq in enumerate(SEQS):
    which[(tokens == seq).all(axis=1)] = k
  return which, tokens, out


@pytest.mark.parametrize("method, steps", [("ddpm", 100), ("dpm2m", 20), ("ddim", 50), ("ddpm", 4096)])
def test_samplers_reproduce_the_distribution_of_an_exact_denoiser(exact_params, method, steps):
  which, _, _ = _exact_run(exact_params, method, steps)
  assert np.all(which >= 0), "every sample must be one of the data sequences (no per-position mixtures)"
  freq = np.bincount(which, minlength=len(SEQS)) / N
  tol = 4 * np.sqrt(PRIOR * (1 - PRIOR) / N)
  assert np.all(np.abs(freq - PRIOR) < tol), (freq, PRIOR)


# Conditioning groups, G rows each, run as one batch (conditioning is per row, so one compile serves all).
G = 200
GROUPS = {  # name: (target tokens, guidance weights, clamp mask, span (tokens, avoid, position, weight) or None)
    "free": ([0, 0, 0, 5, 6], [0] * 5, [0] * 5, None),
    "clamp_prefix": ([2, 3, 0, 0, 0], [0] * 5, [1, 1, 0, 0, 0], None),
    "clamp_and_guide_prefix": ([2, 3, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], None),
    "guide_suffix": ([0, 0, 0, 5, 6], [0, 0, 0, 1, 1], [0] * 5, None),
    "weak_guide_suffix": ([0, 0, 0, 5, 6], [0, 0, 0, 0.5, 0.5], [0] * 5, None),
    "clamp_infill": ([0, 1, 0, 3, 4], [0] * 5, [1, 1, 0, 1, 1], None),
    "include_anywhere": ([0] * 5, [0] * 5, [0] * 5, ([2, 3], False, -1, 1.0)),
    "include_at_0": ([0] * 5, [0] * 5, [0] * 5, ([2, 3], False, 0, 1.0)),
    "avoid": ([0] * 5, [0] * 5, [0] * 5, ([5, 5], True, -1, 2.0)),
}


def _grouped_conditioning() -> guidance.Conditioning:
  rows = lambda x, dtype: jnp.asarray(np.repeat(np.asarray(x, dtype), G, axis=0))
  spans = [g[3] or ([0, 0], False, -1, 0.0) for g in GROUPS.values()]
  return guidance.Conditioning(
      tokens=rows([g[0] for g in GROUPS.values()], np.int32),
      weights=rows([g[1] for g in GROUPS.values()], np.float32),
      clamp=rows([g[2] for g in GROUPS.values()], bool),
      span_tokens=rows([[sp[0]] for sp in spans], np.int32),
      span_mask=rows([[[True, True]] for _ in spans], bool),
      span_weights=rows([[sp[3]] for sp in spans], np.float32),
      span_avoid=rows([[sp[1]] for sp in spans], bool),
      span_position=rows([[sp[2]] for sp in spans], np.int32))


@pytest.fixture(scope="module")
def grouped(exact_params):
  which, tokens, out = _exact_run(exact_params, "ddpm", 100, _grouped_conditioning(), n=G * len(GROUPS))
  logp = np.asarray(out["position_logp"])
  split = lambda a: {name: a[i * G:(i + 1) * G] for i, name in enumerate(GROUPS)}
  return split(which), split(tokens), split(logp)


def test_conditioning_selects_the_matching_sequences_of_an_exact_denoiser(exact_params, grouped):
  which, tokens, _ = grouped
  # Clamping the prefix [2, 3] (only SEQS[2] starts so) puts it there verbatim. Clamping alone is replacement
  # conditioning, which is approximate: the free positions evolve unconditionally early on, so a minority of
  # samples end as [2, 3] + the tail of another sequence (about 10% with DDPM, 20% with DPM-Solver++ here).
  # Clamping plus guidance on the same positions is exact here.
  np.testing.assert_array_equal(tokens["clamp_prefix"][:, :2], np.broadcast_to([2, 3], (G, 2)))
  assert np.mean(which["clamp_prefix"] == 2) > 0.7
  assert np.all(which["clamp_and_guide_prefix"] == 2)
  # Guidance on the suffix [5, 6] (only SEQS[1]); an infill clamp of prefix [0, 1] + suffix [3, 4] (only SEQS[0]).
  assert np.mean(which["guide_suffix"] == 1) > 0.98
  assert np.all(which["clamp_infill"] == 0)
  # A word anywhere: [2, 3] occurs in SEQS[0] (offset 2) and SEQS[2] (offsets 0, 2), not in SEQS[1];
  # pinned to offset 0 it occurs only in SEQS[2].
  assert np.mean(which["include_anywhere"] != 1) > 0.98
  assert np.mean(which["include_at_0"] == 2) > 0.98
  # Negation: avoid [5, 5] (only in SEQS[1]); the other two keep their relative odds.
  assert np.mean(which["avoid"] == 1) < 0.02
  ratio = np.mean(which["avoid"] == 0) / np.mean(which["avoid"] == 2)
  assert abs(ratio - PRIOR[0] / PRIOR[2]) < 0.35, ratio
  # Clamping with DPM-Solver++ too.
  cond = guidance.empty(G, L).replace(tokens=jnp.asarray(np.tile([2, 3, 0, 0, 0], (G, 1)), jnp.int32),
                                      clamp=jnp.asarray(np.tile([1, 1, 0, 0, 0], (G, 1)), bool))
  w_dpm, tok_dpm, _ = _exact_run(exact_params, "dpm2m", 20, cond, n=G)
  np.testing.assert_array_equal(tok_dpm[:, :2], np.broadcast_to([2, 3], (G, 2)))
  assert np.mean(w_dpm == 2) > 0.6


def test_guidance_raises_the_log_probability_of_the_constrained_tokens(grouped):
  which, _, logp = grouped
  lp_free = float(np.mean(logp["free"][:, 3:]))
  lp_guided = float(np.mean(logp["weak_guide_suffix"][:, 3:]))
  assert lp_guided > lp_free + 1.0, (lp_free, lp_guided)
  assert np.mean(which["weak_guide_suffix"] == 1) > np.mean(which["free"] == 1) + 0.2


def _numpy_schedule(seed=3, hidden=32):
  rng = np.random.default_rng(seed)
  return {"schedule": {k: rng.normal(size=hidden).astype(np.float32) for k in ("w1", "b1", "w2")},
          "bounds": {"gamma_0": np.float32(-3.2), "gamma_1": np.float32(6.1)}}


def _numpy_gamma_grid(params, steps):
  """gamma(i/T) from the schedule's parameters, written independently in float64."""
  p = {k: np.asarray(v, np.float64) for k, v in params["schedule"].items()}
  softplus = lambda x: np.log1p(np.exp(x))
  g = lambda s: np.sum(0.01 * softplus(p["w2"]) * np.tanh(softplus(p["w1"]) * (s[:, None] - 0.5) + p["b1"]), -1)
  t = np.arange(steps + 1, dtype=np.float64) / steps
  g0, g1 = (float(np.asarray(params["bounds"][k], np.float64)) for k in ("gamma_0", "gamma_1"))
  ends = g(np.array([0.0, 1.0]))
  return g0 + (g1 - g0) * (g(t) - ends[0]) / (ends[1] - ends[0])


def test_float64_coefficients_match_a_numpy_float64_reference_at_4096_steps():
  params = _numpy_schedule()
  steps = 4096
  t, gam = sampler.schedule_grid(params, steps, "learned", "uniform")
  ref = _numpy_gamma_grid(params, steps)
  np.testing.assert_allclose(gam, ref, rtol=0, atol=1e-12)
  np.testing.assert_array_equal(t, np.arange(steps + 1) / steps)
  g_t, g_s = ref[1:][::-1], ref[:-1][::-1]
  alpha = lambda g: np.sqrt(1.0 / (1.0 + np.exp(g)))
  sigma = lambda g: np.sqrt(1.0 / (1.0 + np.exp(-g)))

  ddpm = sampler.coefficients(t, gam, "ddpm")
  c = 1.0 - np.exp(-g_t) / np.exp(-g_s)  # 1 - SNR_t / SNR_s, naive but in float64
  np.testing.assert_allclose(ddpm["x_coef"], c * alpha(g_s), rtol=1e-9)
  np.testing.assert_allclose(ddpm["z_coef"], (1 - c) * alpha(g_s) / alpha(g_t), rtol=1e-12)
  np.testing.assert_allclose(ddpm["noise_std"], np.sqrt(c) * sigma(g_s), rtol=1e-9)
  np.testing.assert_allclose(ddpm["guide_scale"], sigma(g_t) ** 2 / alpha(g_t), rtol=1e-12)
  # The same quantity formed in float32 is off by far more: this is why the host computes it in float64.
  g32 = ref.astype(np.float32)
  c32 = 1 - np.exp(-g32[1:][::-1]) / np.exp(-g32[:-1][::-1])
  assert np.max(np.abs(c32 / c - 1)) > 1e-4

  ddim = sampler.coefficients(t, gam, "ddim")
  np.testing.assert_allclose(ddim["z_coef"], sigma(g_s) / sigma(g_t), rtol=1e-12)
  np.testing.assert_allclose(ddim["x_coef"], alpha(g_s) - sigma(g_s) * alpha(g_t) / sigma(g_t), rtol=1e-8)
  assert np.all(ddim["noise_std"] == 0)

  dpm = sampler.coefficients(t, gam, "dpm2m")
  lam = lambda g: np.log(alpha(g) / sigma(g))
  h = lam(g_s) - lam(g_t)
  r = h[:-1] / h[1:]
  np.testing.assert_allclose(dpm["cur_coef"][1:], 1 + 1 / (2 * r), rtol=1e-9)
  np.testing.assert_allclose(dpm["prev_coef"][1:], -1 / (2 * r), rtol=1e-9)
  assert dpm["cur_coef"][0] == 1 and dpm["prev_coef"][0] == 0
  np.testing.assert_allclose(dpm["x_coef"], -alpha(g_s) * (np.exp(-h) - 1), rtol=1e-8)


def test_time_grids():
  params = _numpy_schedule(seed=4)
  t, g = sampler.schedule_grid(params, 64, "learned", "logsnr")
  np.testing.assert_allclose(np.diff(g), (g[-1] - g[0]) / 64, rtol=1e-9)  # uniform in gamma
  _, g_at_t = sampler.schedule_grid(params, 1, "learned", "uniform")
  assert g[0] == g_at_t[0] and g[-1] == g_at_t[-1]
  np.testing.assert_allclose(sampler._gamma_tilde64(params, t, "learned"), np.linspace(0, 1, 65), atol=1e-12)
  tq, gq = sampler.schedule_grid(params, 64, "learned", "quadratic")
  np.testing.assert_allclose(tq, np.linspace(0, 1, 65) ** 2)
  assert np.all(np.diff(gq) > 0) and np.all(np.diff(t) > 0)


def test_time_of_gamma_inverts_the_schedule_and_pins_its_ends():
  params = _numpy_schedule(seed=5)
  t = np.array([0.0, 0.013, 0.25, 0.5, 0.77, 0.999, 1.0])
  _, g_grid = sampler.schedule_grid(params, 1, "learned", "uniform")
  g0, g1 = g_grid
  gammas = g0 + (g1 - g0) * sampler._gamma_tilde64(params, t, "learned")
  back = sampler.time_of_gamma(params, gammas, "learned")
  np.testing.assert_allclose(back, t, atol=1e-9)
  assert back[0] == 0.0 and back[-1] == 1.0
  np.testing.assert_allclose(sampler.time_of_gamma(params, gammas, "linear_fixed"), (gammas - g0) / (g1 - g0))


TINY_STEPS, TINY_LEN = 12, 16


def _tiny_sample(params, ids, seed=0, method="ddpm", batch_sharding=None, cond=None):
  t, gammas = sampler.schedule_grid(params, TINY_STEPS, "learned", "uniform")
  return np.asarray(sampler.generate(
      sampler.ModelDenoiser(TINY_MODEL), params, jax.random.key(seed), sample_ids=ids, seq_len=TINY_LEN, t=t,
      gammas=gammas, table=embedding.normalized(params["embedding"]), method=method, cond=cond,
      batch_sharding=batch_sharding)["tokens"])


@pytest.fixture(scope="module")
def tiny_params():
  return jax.device_get(jax.jit(perturbed_params)(jax.random.key(0)))


@pytest.mark.slow
def test_compiles_once_per_shape_and_sampler(tiny_params):
  ids = jnp.arange(8, dtype=jnp.int32)
  before = sampler.trace_counts()
  for seed in range(3):
    _tiny_sample(tiny_params, ids, seed=seed)
    _tiny_sample(tiny_params, ids, seed=seed, method="dpm2m")
  cond = guidance.empty(8, TINY_LEN).replace(weights=jnp.full((8, TINY_LEN), 1.0))
  for w in (1.0, 3.0):  # guidance weights are data, not part of the compile key
    _tiny_sample(tiny_params, ids, cond=cond.replace(weights=cond.weights * w))
  # The train loop's entry point with the same shapes reuses the unguided ddpm compile.
  out = sampler.sample(tiny_params, jax.random.key(0), num_samples=8, seq_len=TINY_LEN, num_steps=TINY_STEPS,
                       model_cfg=TINY_MODEL, cfg=TINY_DIFFUSION)
  assert out.shape == (8, TINY_LEN) and out.dtype == jnp.int32
  new = {k: v - before.get(k, 0) for k, v in sampler.trace_counts().items() if v != before.get(k, 0)}
  assert sorted(new.values()) == [1, 1, 1], new
  assert {k[0] for k in new} == {"ddpm", "dpm2m"}


def test_same_seed_same_tokens_independent_of_batching_and_sharding(tiny_params):
  ids = jnp.arange(8, dtype=jnp.int32)
  a = _tiny_sample(tiny_params, ids)
  np.testing.assert_array_equal(a, _tiny_sample(tiny_params, ids))
  assert not np.array_equal(a, _tiny_sample(tiny_params, ids, seed=1))
  np.testing.assert_array_equal(a[4:], _tiny_sample(tiny_params, ids[4:]))  # sample i does not depend on its batch
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  sharded = NamedSharding(mesh, PartitionSpec("data"))
  params = jax.device_put(tiny_params, NamedSharding(mesh, PartitionSpec()))
  np.testing.assert_array_equal(a, _tiny_sample(params, jax.device_put(ids, sharded), batch_sharding=sharded))


def test_clamped_positions_of_the_model_appear_verbatim(tiny_params):
  known = np.zeros((8, TINY_LEN), np.int32)
  known[:, :3], known[:, -2:] = [5, 9, 1], [17, 2]
  clamp = np.zeros((8, TINY_LEN), bool)
  clamp[:, :3] = clamp[:, -2:] = True
  cond = guidance.empty(8, TINY_LEN).replace(tokens=jnp.asarray(known), clamp=jnp.asarray(clamp))
  out = _tiny_sample(tiny_params, jnp.arange(8, dtype=jnp.int32), method="dpm2m", cond=cond)
  np.testing.assert_array_equal(out[:, :3], known[:, :3])
  np.testing.assert_array_equal(out[:, -2:], known[:, -2:])


def test_sampling_batch_is_a_multiple_of_the_devices_and_no_larger_than_needed():
  assert run_lib.batch_size(2, 3, 8) == 8 and run_lib.batch_size(16, 3, 8) == 8 and run_lib.batch_size(16, 40, 8) == 16
  assert run_lib.batch_size(6, 100, 4) == 8 and run_lib.batch_size(2, 3, 1) == 2


def test_unigram_entropy_and_word_parsing():
  assert quality.unigram_entropy(np.array([3, 3, 3, 3])) == 0.0
  assert math.isclose(quality.unigram_entropy(np.array([1, 2, 3, 4])), math.log(4))
  words = prompts.parse_words(" king, queen@5:3 ,crown:0.5, ratio 2:1@x", "constraints")
  assert words == [prompts.Word("king", -1, 1.0), prompts.Word("queen", 5, 3.0), prompts.Word("crown", -1, 0.5),
                   prompts.Word("ratio 2:1@x", -1, 1.0)]
  with pytest.raises(errors.ConfigError, match="avoid"):
    prompts.parse_words("king:-1", "constraints")


# ---- the CLI on a tiny trained checkpoint.

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A one-step run on two short plays (a small tokenizer trains in a second)."""
  from replaid_jax.data import sources  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("sample")
  plays = sources.shakespeare_plays()
  (root / "train.txt").write_text("\n".join(plays[name] for name in ("hamlet", "macbeth")), encoding="utf-8")
  (root / "val.txt").write_text(plays["the-tempest"][:20000], encoding="utf-8")
  cd = tiny.get_config()
  cd.data.source, cd.data.val_plays = "text", ""
  cd.data.train_files, cd.data.val_files = str(root / "train.txt"), str(root / "val.txt")
  cd.data.tokenizer_vocab_size = 400
  cd.train.num_steps = 1
  cd.checkpoint.every_steps = 1
  cd.eval.num_samples = 0
  cd.eval.final_num_times = 1
  cd.eval.final_max_batches = 1
  workdir = str(root / "run")
  loop.train_and_evaluate(cd, workdir)
  ck, _, meta = inference.open_checkpoint(workdir, None)
  ck.close()
  return workdir, meta, inference.checkpoint_tokenizer(meta, workdir)


def _sample_cli(workdir, *args):
  cmd = [sys.executable, os.path.join(REPO, "launch", "sample.py"), f"--workdir={workdir}", *args]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.mark.slow
def test_cli_end_to_end_with_prefix_and_suffix_clamped(trained):
  workdir, _, tok = trained
  prefix, suffix = "ROMEO:\n", "Exeunt."
  proc = _sample_cli(workdir, "--config.sample.num_samples=3", "--config.sample.batch_size=2",
                     "--config.sample.steps=8", f"--config.sample.prefix={prefix}",
                     f"--config.sample.suffix={suffix}", "--config.sample.gap=5", "--config.sample.condition=both",
                     "--config.sample.sampler=dpm2m", "--config.sample.constraints=love")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(os.path.join(workdir, "samples", "step1.jsonl"), encoding="utf-8")]
  pre, suf = tok.encode(prefix), tok.encode(suffix)
  assert len(rows) == 3 and [r["index"] for r in rows] == [0, 1, 2]
  for r in rows:
    assert len(r["tokens"]) == 32 and r["checkpoint_step"] == 1 and r["seed"] == 0
    assert r["tokens"][:len(pre)] == pre
    assert r["tokens"][len(pre) + 5:len(pre) + 5 + len(suf)] == suf
    assert r["text"].startswith(prefix) and suffix in r["text"]
    assert r["sampler"]["sampler"] == "dpm2m" and r["sampler"]["steps"] == 8 and r["target_match"] == 1.0
    assert r["unigram_entropy"] > 0 and "include 'love'" in r["spans"]
  summary = json.loads(open(os.path.join(workdir, "samples", "step1.summary.json"), encoding="utf-8").read())
  assert summary["target_match_rate"] == 1.0 and summary["timing"]["batch_size"] in (2, 8)  # 1 or 8 devices
  assert "sample 1 of 3 (noise stream 0," in proc.stdout and "3 samples (seed 0)" in proc.stdout
  # The progress line over all batches' sampler steps (replaid_jax/progress.py).
  assert re.search(r"sampling: (\d+)/\1 steps \(100%\), [\d.,e+-]+ steps/s, ETA \d+:\d\d:\d\d \(batch", proc.stderr)
  assert "sampling: 0/" in proc.stderr and "compiling…" in proc.stderr
  # The samples as TensorBoard text in the run's workdir, at the checkpoint's step, beside the training-time ones.
  train_dir = pathlib.Path(workdir, "train")
  texts = {v.tag.removesuffix("/text_summary"): (e.step, v.tensor.string_val[0].decode())
           for name in os.listdir(train_dir) if name.startswith("events.out.tfevents")
           for e in read_events(train_dir / name) for v in e.summary.value
           if v.metadata.plugin_data.plugin_name == "text"}
  assert {f"sampled/step1/{i}" for i in range(3)} <= set(texts)
  step, text = texts["sampled/step1/0"]
  assert step == 1 and "dpm2m, 8 steps" in text and "noise stream 0" in text and "ROMEO:" in text
  assert not re.search("[\x00-\x08\x0b-\x1f\x7f\ufffd]", proc.stdout)  # printed text is escaped
  # The same command gives the same tokens.
  judge = {}
  if _has("torch", "transformers", "tokenizers"):  # and with a (random) GPT-2 judge
    _random_gpt2(os.path.join(workdir, "gpt2"))
    judge = {"judge": "gpt2:" + os.path.join(workdir, "gpt2")}
  again = run_lib.sample_checkpoint(workdir, overrides={
      "num_samples": 3, "steps": 8, "prefix": prefix, "suffix": suffix, "gap": 5, "condition": "both",
      "sampler": "dpm2m", "constraints": "love", "print_samples": 0, "progress": False, **judge})
  rows2 = [json.loads(line) for line in open(again["samples_file"], encoding="utf-8")]
  assert [r["tokens"] for r in rows2] == [r["tokens"] for r in rows]
  if judge:
    g = again["generative_perplexity"]
    assert g["judge_tokens"] > 0 and 1 < g["gen_ppl"] < 1e6


def test_cli_errors_are_one_clear_line(trained, tmp_path):
  workdir, _, _ = trained
  latin1 = tmp_path / "prompt.txt"
  latin1.write_bytes(b"caf\xe9 au lait")
  cases = [
      (["--config.sample.prefix=" + "the king is dead; long live the king. " * 20], "sample.prefix"),
      ([f"--config.sample.prefix_file={latin1}"], "not UTF-8"),
      (["--config.model.width=8"], "only --config.sample.KEY=VALUE overrides are accepted"),
      (["--config.sample.bogus=1"], "unknown config key sample.bogus"),
      (["--config.sample.stpes=8"], "unknown config key sample.stpes; did you mean sample.steps?"),
  ]
  for args, expected in cases:
    proc = _sample_cli(workdir, *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr


def test_help_is_short_and_lists_only_the_sample_keys():
  proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "sample.py"), "--help"], capture_output=True,
                        text=True, cwd=REPO, timeout=600)
  lines = proc.stdout.splitlines()
  assert len(lines) < 60, len(lines)
  assert "  --config: Sampling settings" in proc.stdout and "steps=256" in proc.stdout and "  --workdir:" in proc.stdout
  assert "model:" not in proc.stdout and "!!python" not in proc.stdout and "sample:\n" not in proc.stdout


def test_prompt_layout_errors(trained):
  _, meta, tok = trained
  cfg, _ = run_lib.resolve_config(meta["config"], {"suffix": "Exeunt."}, meta["vocab_size"])
  layout = prompts.build(tok, cfg.sample, 32, max_seq_len=64)
  n = len(tok.encode("Exeunt."))
  assert layout.suffix_start == 32 - n and layout.clamp.sum() == 0 and layout.weights[-n:].min() == 2.0
  bad = [({"gap": 3}, errors.ConfigError, "no suffix"),
         ({"suffix": "x", "gap": 40}, errors.DataError, "sample.gap=40"),
         ({"constraints": "love@31"}, errors.DataError, "position"),
         ({"prefix": "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3}, errors.DataError, "sample.prefix")]
  for overrides, exc, pattern in bad:
    cfg, _ = run_lib.resolve_config(meta["config"], overrides, meta["vocab_size"])
    with pytest.raises(exc, match=pattern):
      prompts.build(tok, cfg.sample, 32, max_seq_len=64)


def test_checkpoint_config_without_a_sample_section_still_loads(trained):
  _, meta, _ = trained
  saved = {k: v for k, v in meta["config"].items() if k != "sample"}
  cfg, filled = run_lib.resolve_config(saved, {"steps": 16}, meta["vocab_size"])
  assert "sample" in filled and cfg.sample.steps == 16 and cfg.sample.sampler == "ddpm"
  assert cfg.model.vocab_size == meta["vocab_size"]
  with pytest.raises(errors.ConfigError, match="sample.bogus"):
    run_lib.resolve_config(saved, {"bogus": 1})


# ---- the GPT-2 judge against Hugging Face's PyTorch implementation.

def _has(*modules):
  import importlib.util  # pylint: disable=g-import-not-at-top
  return all(importlib.util.find_spec(m) is not None for m in modules)


def _random_gpt2(directory: str):
  """A randomly initialised GPT-2 with a small byte-level BPE, saved in Hugging Face format."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  lines = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
           "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"] * 10
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(lines, vocab_size=420, min_frequency=1, special_tokens=["<|endoftext|>"])
  hf_tok = transformers.GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                          eos_token="<|endoftext|>", unk_token="<|endoftext|>")
  hf_tok.save_pretrained(directory)
  bpe.save_model(directory)  # vocab.json + merges.txt as well
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=len(hf_tok), n_positions=48, n_embd=64, n_layer=3, n_head=4,
                                   initializer_range=0.2, bos_token_id=hf_tok.bos_token_id,
                                   eos_token_id=hf_tok.eos_token_id)
  model = transformers.GPT2LMHeadModel(config).eval()
  model.save_pretrained(directory, safe_serialization=True)
  return hf_tok, model


@pytest.mark.skipif(not _has("torch", "transformers", "tokenizers"), reason="needs the test extra (torch, transformers)")
def test_gpt2_judge_matches_hugging_face(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  from replaid_jax.judges import gpt2  # pylint: disable=g-import-not-at-top
  from replaid_jax.judges import perplexity  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / "gpt2")
  hf_tok, model = _random_gpt2(directory)
  judge = perplexity.load(f"gpt2:{directory}", batch_size=2)
  ids = np.random.default_rng(0).integers(0, len(hf_tok), (3, 48))
  with torch.no_grad():
    ref = model(torch.tensor(ids)).logits.numpy()
  got = judge.logits(ids)
  assert np.abs(ref).max() > 1.0
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)

  texts = ["Whether to suffer the slings, or to take arms?", "To be the question of outrageous troubles " * 12, ""]
  assert len(hf_tok.encode(texts[1])) > 48  # scored in two windows
  for text in texts:
    assert judge.encode(text) == hf_tok.encode(text)
  os.remove(os.path.join(directory, "tokenizer.json"))  # the vocab.json + merges.txt path
  assert gpt2.load_tokenizer(directory).encode(texts[0]).ids == hf_tok.encode(texts[0])

  ref_total, ref_count = 0.0, 0
  for text in texts:
    tok_ids = hf_tok.encode(text)
    for o in range(0, len(tok_ids), 48):  # windows of n_positions, each after <|endoftext|>
      window = tok_ids[o:o + 48]
      inputs = torch.tensor([[hf_tok.bos_token_id] + window[:-1]])
      with torch.no_grad():
        logp = torch.log_softmax(model(inputs).logits[0].double(), -1).numpy()
      ref_total -= float(logp[np.arange(len(window)), window].sum())
      ref_count += len(window)
  res = perplexity.generative_perplexity(judge, texts)
  assert res["judge_tokens"] == ref_count
  np.testing.assert_allclose(res["gen_ppl"], math.exp(ref_total / ref_count), rtol=1e-5)
