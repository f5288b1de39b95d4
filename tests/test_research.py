"""The plateau toolkit: synthetic sources with exact entropies, the per-noise-level diagnostic, the init switches."""

import dataclasses
import itertools
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from replaid_jax.models import denoiser
from replaid_jax.models import model as model_lib
from replaid_jax.eval import diagnostics
from replaid_jax.research import synthetic


@pytest.mark.parametrize("order", [1, 2])
def test_sequence_entropy_equals_brute_force_enumeration(order):
  """H(x_1..x_L)/L from the formula equals -sum p log p over every window of length L."""
  src = synthetic.make_markov(3, order, 2, seed=order)
  length = 4
  total = 0.0
  for seq in itertools.product(range(3), repeat=length):
    ctx = 0
    for s in seq[:order]:
      ctx = ctx * 3 + s
    p = src.stationary[ctx]
    for s in seq[order:]:
      p *= src.transition[ctx, s]
      ctx = (ctx * 3 + s) % 3**order
    if p > 0:
      total -= p * math.log(p)
  assert src.sequence_entropy(length) == pytest.approx(total / length, rel=1e-9)


def test_sampled_stream_matches_the_chain():
  """Empirical transition frequencies of a long stream agree with the chain within sampling error."""
  src = synthetic.make_markov(8, 1, 3, seed=4)
  x = src.sample(200_000, np.random.default_rng(0))
  counts = np.zeros((8, 8))
  np.add.at(counts, (x[:-1], x[1:]), 1)
  emp = counts / counts.sum(1, keepdims=True)
  n = counts.sum(1, keepdims=True)
  se = np.sqrt(src.transition * (1 - src.transition) / n) + 1e-3
  assert np.all(np.abs(emp - src.transition) < 5 * se)
  marg = np.bincount(x, minlength=8) / x.size
  assert np.allclose(marg, src.stationary, atol=0.01)


def _params_with_unigram_bias(key, cfg, log_unigram):
  params, _ = model_lib.init(key, cfg, gamma_0=-3.0, gamma_1=6.0, output_bias=jnp.asarray(log_unigram))
  return params


def test_diagnostic_at_initialisation_is_the_context_free_denoiser(tiny_model):
  """With a log-unigram output bias and zero-initialised head and gates, the model is the context-free denoiser."""
  rng = np.random.default_rng(0)
  counts = rng.integers(1, 50, tiny_model.vocab_size).astype(np.float64)
  log_unigram = np.log(counts / counts.sum())
  params = _params_with_unigram_bias(jax.random.key(0), tiny_model, log_unigram)
  tokens = rng.integers(0, tiny_model.vocab_size, (4, 16))
  out = diagnostics.denoiser_gain_by_level(params, tokens, log_unigram, jax.random.key(1), model_cfg=tiny_model,
                                       bins=4, per_bin=2)
  np.testing.assert_allclose(out["model"], out["context_free"], rtol=1e-4, atol=1e-6)
  assert out["model_total"] > 0


def test_diagnostic_integral_matches_a_fine_quadrature_of_the_context_free_loss(tiny_model):
  """Midpoint sums over gamma converge: 8 and 64 nodes per unit agree on the context-free total."""
  rng = np.random.default_rng(1)
  log_unigram = np.log(np.full(tiny_model.vocab_size, 1.0 / tiny_model.vocab_size))
  params = _params_with_unigram_bias(jax.random.key(2), tiny_model, log_unigram)
  tokens = rng.integers(0, tiny_model.vocab_size, (64, 16))
  coarse = diagnostics.denoiser_gain_by_level(params, tokens, log_unigram, jax.random.key(3), model_cfg=tiny_model,
                                          bins=6, per_bin=2)["context_free_total"]
  fine = diagnostics.denoiser_gain_by_level(params, tokens, log_unigram, jax.random.key(3), model_cfg=tiny_model,
                                        bins=6, per_bin=16)["context_free_total"]
  assert coarse == pytest.approx(fine, rel=0.05)


def _denoiser_params(cfg):
  return nnx.to_pure_dict(nnx.state(denoiser.Denoiser(cfg, key=jax.random.key(0))))


def test_head_and_gate_init_switches(tiny_model):
  """head_init_scale draws the readout with std scale/sqrt(width); gate_init sets both residual gates only."""
  cfg = dataclasses.replace(tiny_model, head_init_scale=2.0, gate_init=0.25, width=64, vocab_size=512)
  p = _denoiser_params(cfg)
  w = np.asarray(p["out_w"])
  assert w.std() == pytest.approx(2.0 / math.sqrt(64), rel=0.05)
  b = np.asarray(p["blocks"]["adaln_b"]).reshape(cfg.num_layers, 6, 64)
  np.testing.assert_array_equal(b[:, (2, 5)], 0.25)
  np.testing.assert_array_equal(b[:, (0, 1, 3, 4)], 0.0)
  # The default stays adaLN-Zero with a zero head, and the switches leave every other parameter unchanged.
  base = _denoiser_params(dataclasses.replace(cfg, head_init_scale=0.0, gate_init=0.0))
  assert not np.any(np.asarray(base["out_w"]))
  for name in ("qkv", "attn_out", "mlp_w1", "mlp_w2"):
    np.testing.assert_array_equal(np.asarray(base["blocks"][name]), np.asarray(p["blocks"][name]))
  np.testing.assert_array_equal(np.asarray(base["in_proj"]), np.asarray(p["in_proj"]))


def test_alibi_attention_adds_minus_slope_times_distance_to_the_logits():
  """The biased attention equals softmax(q.k / sqrt(K) - s_h |i - j|) v computed by hand, per head."""
  from replaid_jax.models import layers  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(np.asarray(layers.alibi_slopes(4)), [1.0, 0.25, 0.0625, 0.015625])
  bias = np.asarray(layers.alibi_bias(5, 2))
  assert bias.shape == (2, 5, 5) and bias[0, 1, 3] == -2.0 and bias[1, 4, 0] == -4.0 / 16
  np.testing.assert_array_equal(bias, bias.transpose(0, 2, 1))
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 5, 2, 4)) for i in range(3))
  out = np.asarray(layers.attention(q, k, v, causal=False, bias_HLL=jnp.asarray(bias)))
  logits = np.einsum("bihk,bjhk->bhij", q, k) / 2.0 + bias[None]
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, np.einsum("bhij,bjhk->bihk", w, v), rtol=1e-5, atol=1e-6)


def test_the_alibi_switch_changes_the_attention_and_nothing_else(tiny_model):
  """Same parameters; the network's output moves once attention reaches the residual stream (open gates)."""
  cfg = dataclasses.replace(tiny_model, gate_init=0.5, head_init_scale=1.0)
  assert jax.tree.structure(_denoiser_params(cfg)) == jax.tree.structure(
      _denoiser_params(dataclasses.replace(cfg, attention_bias="alibi")))
  x = jax.random.normal(jax.random.key(1), (2, 8, cfg.width))
  cond = jnp.zeros((2,))
  run = lambda c: np.asarray(denoiser.Denoiser(c, key=jax.random.key(0)).trunk(x, cond))
  assert np.abs(run(cfg) - run(dataclasses.replace(cfg, attention_bias="alibi"))).max() > 1e-3


def test_the_learned_locality_starts_as_alibi_and_trains_one_bias_per_block_head_and_distance(tiny_model):
  """attention_bias='learned': table[h, |i - j|] added to the logits; at init it is the alibi network exactly,
  and the output has a gradient with respect to it at the distances a sequence uses (so it trains)."""
  from replaid_jax.models import layers  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(tiny_model, gate_init=0.5, head_init_scale=1.0, attention_bias="learned")
  table = np.asarray(layers.relative_bias_init(3, 2, 6))
  assert table.shape == (3, 2, 6) and table[1, 0, 4] == -4.0 and table[2, 1, 2] == -2.0 / 16
  np.testing.assert_array_equal(np.asarray(layers.relative_bias(jnp.asarray(table[0]), 5)),
                                np.asarray(layers.alibi_bias(5, 2)))
  custom = jnp.arange(12.0).reshape(2, 6)
  bias = np.asarray(layers.relative_bias(custom, 4))
  assert bias[1, 0, 3] == 9.0 and bias[1, 3, 0] == 9.0 and bias[0, 2, 2] == 0.0
  with pytest.raises(ValueError, match="max_seq_len"):
    layers.relative_bias(custom, 7)

  x = jax.random.normal(jax.random.key(1), (2, 8, cfg.width))
  cond = jnp.zeros((2,))
  learned = denoiser.Denoiser(cfg, key=jax.random.key(0))
  alibi = denoiser.Denoiser(dataclasses.replace(cfg, attention_bias="alibi"), key=jax.random.key(0))
  assert learned.blocks.rel_bias[...].shape == (cfg.num_layers, cfg.num_heads, cfg.max_seq_len)
  np.testing.assert_array_equal(np.asarray(learned.trunk(x, cond)), np.asarray(alibi.trunk(x, cond)))

  grads = nnx.grad(lambda net: jnp.sum(net.trunk(x, cond) ** 2))(learned)
  g = np.asarray(grads["blocks"]["rel_bias"][...])
  assert np.abs(g[:, :, :8]).max() > 1e-4  # distances inside the sequence get a gradient
  np.testing.assert_array_equal(g[:, :, 8:], 0.0)  # distances beyond it do not


def test_attention_profile_at_initialisation_sums_to_one_and_alibi_concentrates_it_on_neighbours():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from replaid_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from replaid_jax.research import plateau  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  train, val = rng.integers(0, 48, (64, 32), dtype=np.int32), rng.integers(0, 48, (16, 32), dtype=np.int32)
  corpus = pipeline.Corpus(train=train, val=val, vocab_size=48, tokenizer=None,
                           unigram_counts=np.bincount(train.reshape(-1), minlength=48).astype(np.float64), info={})
  cd = tiny.get_config()
  base = plateau.attention_by_distance(cd, corpus, gamma=0.0, max_distance=3)
  cd.model.attention_bias = "alibi"
  alibi = plateau.attention_by_distance(cd, corpus, gamma=0.0, max_distance=3)
  length = 32
  np.testing.assert_allclose(base["uniform_by_distance"], [1 / length] + [2 * (length - d) / length**2
                                                                            for d in (1, 2, 3)])
  for prof in (base, alibi):
    assert len(prof["heads"]) == cd.model.num_heads and prof["rows"] == 16
    for head in prof["heads"]:
      assert sum(head["by_distance"]) + head["farther"] == pytest.approx(1.0, abs=1e-5)
  near = lambda prof: sum(prof["heads"][0]["by_distance"][:2])
  assert near(alibi) > 0.5 > near(base)  # slope 1 on head 0: most of its weight within one position


def test_embedding_separation():
  table = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
  sep = diagnostics.embedding_separation({"embedding": {"table": jnp.asarray(table)}})
  assert sep["embed_min_dist"] == pytest.approx(math.sqrt(2))
  assert sep["embed_mean_dist"] == pytest.approx((2 * math.sqrt(2) + 2) / 3)


REPO = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))


def _cli(*args):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return proc


@pytest.mark.slow
def test_a_study_and_a_probe_on_a_synthetic_source_through_the_binaries(tmp_path):
  """synthetic_data.py writes a source with its entropy; plateau.py runs variants x seeds, reports paired bounds."""
  import json  # pylint: disable=g-import-not-at-top
  src = tmp_path / "src"
  _cli("launch/synthetic_data.py", f"--out={src}", "--vocab=16", "--order=1", "--successors=3",
       "--train_tokens=20000", "--val_tokens=2048", "--seq_len=32")
  info = json.loads((src / "info.json").read_text())
  assert 0 < info["sequence_entropy"] < info["unigram_entropy"] <= math.log(16)
  data = (f"data.source='npy';data.train_files='{src}/train.npy';data.val_files='{src}/val.npy';"
          "data.npy_vocab_size=16;data.val_plays='';eval.num_samples=0")
  study = tmp_path / "study"
  _cli("launch/plateau.py", f"--out={study}", "--base=configs/tiny.py", f"--variant=replaid:{data}",
       f"--variant=ar:objective='ar';{data}", "--seeds=0", "--steps=2,4", "--parallel=2", "--reference=replaid",
       "--noise_batches=3", "--noise_by_time=2")
  summary = json.loads((study / "summary.json").read_text())
  assert set(summary) == {"replaid", "ar"}
  for name, v in summary.items():
    assert sorted(int(s) for s in v["steps"]) == [2, 4]
    assert all(np.isfinite(r["mean"]) for r in v["steps"].values())
  assert "paired_diff" in summary["ar"]["steps"]["4"] and "paired_diff" not in summary["replaid"]["steps"]["4"]
  run = json.loads((study / "replaid" / "seed0.json").read_text())
  assert "train/grad_norm_denoiser" not in run["points"][0]["train"]  # averaged step metrics, not logged rows
  assert run["points"][0]["train"]["grad_norm_denoiser"] >= 0 and "embed_min_dist" in run["points"][0]["train"]
  for name in ("replaid", "ar"):  # the gradient noise scale at every point, for any objective
    for p in json.loads((study / name / "seed0.json").read_text())["points"]:
      assert p["train"]["noise/trace_all"] > 0 and np.isfinite(p["train"]["noise/grad_sq_all"]), p["train"]
    # The AR loss has no draws of its own: given the rows, its gradient is exact.
    exact = abs(p["train"]["noise_draws/trace_all"]) < 1e-9 * p["train"]["noise/trace_all"]
    assert exact == (name == "ar"), p["train"]
    for part in ("noise_eps", "noise_times"):  # each part of the draws alone: none for AR, some for RePlaid
      assert (abs(p["train"][f"{part}/trace_all"]) < 1e-9 * p["train"]["noise/trace_all"]) == (name == "ar")
  assert "| replaid | 1 |" in (study / "report.md").read_text()
  assert (study / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # --noise_by_time: RePlaid's profile along t at every point (2 cells), summarised and plotted; AR has none.
  prof = summary["replaid"]["noise_by_time"]
  assert sorted(prof, key=int) == ["2", "4"] and prof["4"]["t"] == [0.25, 0.75] and prof["4"]["seeds"] == 1
  assert all(x > 0 for x in prof["4"]["grad_within"]) and 0 < prof["4"]["gain_grad_best"] <= 1
  assert "noise_by_time" not in summary["ar"]
  assert 0 < run["points"][1]["train"]["time/gain_grad_best"] <= 1
  assert (study / "noise_by_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # Rerunning skips finished runs; a probe reports every min(steps) steps.
  again = _cli("launch/plateau.py", f"--out={study}", "--base=configs/tiny.py", f"--variant=replaid:{data}",
               "--seeds=0", "--steps=2,4")
  assert "0 run(s) to do" in again.stdout
  probe = tmp_path / "probe"
  _cli("launch/plateau.py", f"--out={probe}", "--base=configs/tiny.py", f"--variant=p:{data}", "--seeds=0",
       "--steps=2,4", "--probe_gamma=-2")
  pts = json.loads((probe / "p" / "seed0.json").read_text())["points"]
  assert [p["step"] for p in pts] == [2, 4] and all(np.isfinite(p["train"]["ce"]) for p in pts)


def test_the_noise_scale_estimates_recover_the_gradient_and_the_noise_of_a_known_gaussian_estimator():
  """G_i = g + N(0, S / b): averaged over many draws, the estimates of |g|^2 and tr(S) are unbiased."""
  from replaid_jax.research import plateau  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  dim, m, b, trials = 40, 8, 16, 3000
  g = rng.normal(size=dim) * 0.3
  s_diag = rng.uniform(0.5, 2.0, size=dim)  # per-example variances: tr(S) = sum
  grad_sq, trace = [], []
  for _ in range(trials):
    batches = g + rng.normal(size=(m, dim)) * np.sqrt(s_diag / b)
    est = plateau.noise_scale_estimates(np.sum(batches**2, axis=1), float(np.sum(batches.mean(0) ** 2)), b)
    grad_sq.append(est["grad_sq"])
    trace.append(est["trace"])
  se = lambda v: np.std(v) / np.sqrt(trials)
  assert abs(np.mean(grad_sq) - np.sum(g**2)) < 4 * se(grad_sq)
  assert abs(np.mean(trace) - np.sum(s_diag)) < 4 * se(trace)
  assert abs(np.mean(trace) / np.mean(grad_sq) - np.sum(s_diag) / np.sum(g**2)) < 0.05 * np.sum(s_diag) / np.sum(g**2)
  # With noise far above the gradient, |g|^2 can come out negative: the scale is then reported as inf.
  assert plateau.noise_scale_estimates(np.array([1.0, 1.2]), 0.5, 4)["b_simple"] == float("inf")


def _tiny_run_on_random_tokens(*, rows: int, val: int, seed: int, vocab: int = 24):
  """(config dict, corpus, run) of configs/tiny.py on one device, on `rows` uniformly random training rows (the
  first `val` of them also the validation rows)."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from replaid_jax import config_lib  # pylint: disable=g-import-not-at-top
  from replaid_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from replaid_jax.train import build as build_lib  # pylint: disable=g-import-not-at-top
  cd = tiny.get_config()
  cd.mesh.shape = (1, 1, 1)
  train = np.random.default_rng(seed).integers(0, vocab, (rows, cd.data.seq_len)).astype(np.int32)
  corpus = pipeline.Corpus(train=train, val=train[:val], vocab_size=vocab, tokenizer=None,
                           unigram_counts=np.bincount(train.reshape(-1), minlength=vocab).astype(np.float64),
                           info={"source": "synthetic"})
  c = build_lib.resolve_vocab(config_lib.from_config_dict(cd), corpus)
  return cd, corpus, build_lib.build(c, corpus, devices=jax.devices()[:1])


def test_the_gradient_noise_scale_of_a_training_state_adds_up_over_groups_and_shrinks_with_the_batch(tmp_path):
  """On a real tiny model: the groups' |G|^2 and tr(S) add up to the whole's, and the spread of the M batch
  gradients around their mean (mean |G_i|^2 - |mean G_i|^2 = tr(S) (1/b - 1/(M b))) is smaller at 4x the batch."""
  from replaid_jax import config_lib  # pylint: disable=g-import-not-at-top
  from replaid_jax.research import plateau  # pylint: disable=g-import-not-at-top
  from replaid_jax.train import build as build_lib  # pylint: disable=g-import-not-at-top
  cd, corpus, run = _tiny_run_on_random_tokens(rows=256, val=16, seed=0)
  length = cd.data.seq_len
  spread = {}
  for b in (4, 16):
    rows = jnp.asarray(corpus.train[:8 * b].reshape(8, b, length))
    est = plateau.gradient_noise_scale(run, run.state, rows, jax.random.key(1))
    assert set(est) == {"denoiser", "embedding", "all"}
    for k in ("grad_sq", "trace"):
      np.testing.assert_allclose(est["all"][k], est["denoiser"][k] + est["embedding"][k], rtol=1e-9)
    spread[b] = est["all"]["trace"] * (1 / b - 1 / (8 * b))
  assert spread[16] < spread[4]
  # One batch of rows repeated: with every draw shared the M gradients are one gradient (no noise); with only the
  # Gaussians, or only the times and row roles, drawn afresh, each part alone is noise.
  same = jnp.broadcast_to(jnp.asarray(corpus.train[:4]), (8, 4, length))
  none = plateau.gradient_noise_scale(run, run.state, same, jax.random.key(1), fixed=("setup", "noise"))["all"]
  assert abs(none["trace"]) <= 1e-9 * none["grad_sq"] and none["grad_sq"] > 0
  for fixed in (("setup",), ("noise",)):
    assert plateau.gradient_noise_scale(run, run.state, same, jax.random.key(1), fixed=fixed)["all"]["trace"] > 0
  # The same sequences in fresh orders with every draw shared: only the pairing of sequences and lattice cells
  # (time, role, Gaussians) moves, and that alone is noise; the orders are permutations of the one batch.
  shuffled = plateau.shuffled_batches(jnp.asarray(corpus.train[:4]), 8, np.random.default_rng(0))
  np.testing.assert_array_equal(np.sort(np.asarray(shuffled), axis=1),
                                np.broadcast_to(np.sort(corpus.train[:4], axis=0), (8, 4, length)))
  assert len({np.asarray(r).tobytes() for r in shuffled}) > 1
  assert plateau.gradient_noise_scale(run, run.state, shuffled, jax.random.key(1),
                                      fixed=("setup", "noise"))["all"]["trace"] > 0
  with pytest.raises(ValueError, match="times"):
    plateau.gradient_noise_scale(run, run.state, same, jax.random.key(1), fixed=("times",))
  # With 2 draws per sequence each batch is tiled as a training step tiles it, so the gradients are the K = 1 run's
  # on the batch tiled twice: the same |G|^2, and half the trace per sequence (b = 4 sequences, not 8 rows).
  cd.train.draws_per_sequence = 2
  run2 = build_lib.build(build_lib.resolve_vocab(config_lib.from_config_dict(cd), corpus), corpus,
                         devices=jax.devices()[:1])
  rows = jnp.asarray(corpus.train[:32].reshape(8, 4, length))
  cd.train.draws_per_sequence = 1
  run1 = build_lib.build(build_lib.resolve_vocab(config_lib.from_config_dict(cd), corpus), corpus,
                         devices=jax.devices()[:1])
  k2 = plateau.gradient_noise_scale(run2, run2.state, rows, jax.random.key(1))["all"]
  k1 = plateau.gradient_noise_scale(run1, run1.state, jnp.tile(rows, (1, 2, 1)), jax.random.key(1))["all"]
  np.testing.assert_allclose(k2["grad_sq"], k1["grad_sq"], rtol=1e-5)
  np.testing.assert_allclose(k2["trace"], k1["trace"] / 2, rtol=1e-5)


def test_the_noise_profile_along_t_matches_per_row_autodiff():
  """research.plateau.noise_by_time on a real tiny model: each cell's per-row gradient moments and loss moments
  equal those of per-row gradients taken by autodiff of the row's ELBO terms, with the same Gaussians; the best
  time density is at least as good as the two objectives' optima."""
  from replaid_jax.diffusion import elbo  # pylint: disable=g-import-not-at-top
  from replaid_jax.diffusion import time_sampling  # pylint: disable=g-import-not-at-top
  from replaid_jax.models import noise_schedule  # pylint: disable=g-import-not-at-top
  from replaid_jax.research import plateau  # pylint: disable=g-import-not-at-top
  cd, corpus, run = _tiny_run_on_random_tokens(rows=64, val=8, seed=1)
  c, length = run.config, cd.data.seq_len
  rows = jnp.asarray(corpus.train[:3])
  key, bins, draws = jax.random.key(3), 2, 2
  prof = plateau.noise_by_time(run, run.state, rows, key, bins=bins, draws=draws)
  params = run.state.params
  pscale = elbo.prior_scale(c.diffusion, run.state.step)
  one = elbo.Weights(n_recon=jnp.float32(1), n_diff=jnp.float32(1), n_rows=jnp.float32(1))
  for j in range(bins):
    t = jnp.full((1,), (j + 0.5) / bins, jnp.float32)
    plan = time_sampling.Plan(t=t, is_recon=jnp.zeros(1, bool), is_sc=jnp.zeros(1, bool), sc_offset=jnp.int32(0),
                              sc_period=0)
    eps = jax.random.normal(jax.random.fold_in(key, j), (draws, 3, length, c.model.embed_dim), jnp.float32)
    gt, dgt = noise_schedule.gamma_tilde_and_deriv(params["schedule"], t, c.diffusion.schedule)

    def row_loss(p, tokens, e):
      terms = elbo.per_example_terms(p, gt, dgt, tokens[None], plan, key, model_cfg=c.model, cfg=c.diffusion,
                                     pscale=pscale, noise=e[None])
      return elbo.weighted_loss(terms, one), terms.diffusion[0]

    grads, losses = [], []
    for d in range(draws):
      for r in range(3):
        g, l = jax.grad(lambda p: row_loss(p, rows[r], eps[d, r]), has_aux=True)(params)
        grads.append(np.concatenate([np.asarray(x, np.float64).ravel()
                                     for name in ("denoiser", "embedding") for x in jax.tree.leaves(g[name])]))
        losses.append(float(l))
    grads, losses = np.stack(grads), np.array(losses)
    np.testing.assert_allclose(prof["grad_second_moment"][j], np.mean(np.sum(grads ** 2, 1)), rtol=1e-3)
    within = np.sum((grads - grads.mean(0)) ** 2) / (len(grads) - 1)
    np.testing.assert_allclose(prof["grad_within"][j], within, rtol=1e-3)
    np.testing.assert_allclose(prof["loss_mean"][j], losses.mean(), rtol=1e-4)
    np.testing.assert_allclose(prof["loss_var"][j], losses.var(ddof=1), rtol=1e-3)
    assert within > 0
  assert prof["t"] == [0.25, 0.75]
  best = prof["gain_grad_best"]
  assert 0 < best <= min(prof["gain_grad_at_second_moment_optimum"], prof["gain_grad_at_loss_within_optimum"]) + 1e-12
  assert 0 < prof["gain_second_moment"] <= 1 + 1e-12
