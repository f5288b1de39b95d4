"""The train step on device meshes, resumption, and a whole run through the train binary."""

import json
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from conftest import read_events
from replaid_jax import checkpoint as ckpt_lib
from replaid_jax import config_lib
from replaid_jax.data import pipeline
from replaid_jax.train import loop
from replaid_jax.train import build as build_lib
from replaid_jax.train import sizing as sizing_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _synthetic_corpus(vocab=48, seq_len=32, rows=64, seed=0):
  rng = np.random.default_rng(seed)
  train = rng.integers(0, vocab, (rows, seq_len), dtype=np.int32)
  val = rng.integers(0, vocab, (16, seq_len), dtype=np.int32)
  return pipeline.Corpus(train=train, val=val, vocab_size=vocab, tokenizer=None,
                         unigram_counts=np.bincount(train.reshape(-1), minlength=vocab).astype(np.float64),
                         info={"source": "synthetic"})


def _tiny_config(**overrides):
  cd = tiny.get_config()
  for key, value in overrides.items():
    if "." not in key:
      cd[key] = value
      continue
    section, field = key.split(".")
    cd[section][field] = value
  return cd


def _one_device_run(corpus, **overrides):
  """The run of configs/tiny.py with `overrides` on `corpus`, built on one device (its config: `run.config`)."""
  c = build_lib.resolve_vocab(config_lib.from_config_dict(_tiny_config(**{"mesh.shape": (1, 1, 1), **overrides})),
                              corpus)
  return build_lib.build(c, corpus, devices=jax.devices()[:1])


def _run_steps(mesh_shape, num_steps=2, **overrides):
  cd = _tiny_config(**{"mesh.shape": mesh_shape, "mesh.axes": ("data", "fsdp", "tensor"), **overrides})
  corpus = _synthetic_corpus()
  c = build_lib.resolve_vocab(config_lib.from_config_dict(cd), corpus)
  n = int(np.prod([s for s in mesh_shape]))
  run = build_lib.build(c, corpus, devices=jax.devices()[:n])
  step = build_lib.compile_step(run)
  state = run.state
  key = jax.random.key(c.seed)
  losses = []
  for i in range(num_steps):
    batch = build_lib.global_batch(run, {"tokens": corpus.train[i * 8:(i + 1) * 8]})
    state, m = step(state, batch, key)
    losses.append(float(m["loss"]))
  return jax.device_get(state.params), losses, run


@pytest.mark.parametrize("block", ["dit", "plaid"])
def test_weight_decay_shrinks_the_matrices_and_not_the_stacked_vectors(block):
  """With a zero gradient, AdamW's update is the decoupled decay alone: -lr * wd * p on every backbone parameter
  with two or more axes besides the "layers" stacking axis, and nothing on the blocks' norms, biases and gates
  (stacked, they have two array axes but are vectors). The bounds decay with their own rate, the embedding
  (weight decay 0) not at all. Built as training builds it, from the model's logical axes."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  overrides = {"mesh.shape": (1, 1, 1), "mesh.axes": ("data", "fsdp", "tensor"), "optim.warmup_steps": 0,
               "optim.weight_decay": 0.1, "optim.bounds_weight_decay": 0.01, "optim.embedding_weight_decay": 0.0,
               "model.block": block}
  corpus = _synthetic_corpus()
  run = _one_device_run(corpus, **overrides)
  c, params = run.config, run.state.params
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = run.tx.update(zeros, run.tx.init(params), params)
  flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  p, u = flat(params), flat(updates)
  axes = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(
      run.axes, is_leaf=lambda x: isinstance(x, tuple))[0]}
  decayed, kept = [], []
  for name, value in p.items():
    rate = 0.0
    if name.startswith("['denoiser']") and len([a for a in axes[name] if a != "layers"]) >= 2:
      rate = c.optim.lr * 0.1
      decayed.append(name)
    elif name.startswith("['bounds']"):
      rate = c.optim.bounds_lr * 0.01
    elif name.startswith("['denoiser']"):
      kept.append(name)
    np.testing.assert_allclose(u[name], -rate * value, rtol=1e-6, atol=1e-12, err_msg=name)
  assert any("qkv" in n for n in decayed) and any("mlp_w1" in n for n in decayed)
  stacked_vectors = [n for n in kept if "['blocks']" in n]
  assert stacked_vectors and all(p[n].ndim == 2 for n in stacked_vectors)  # [layers, width]: the old mask's defect
  assert any(np.any(p[n] != 0) for n in stacked_vectors)  # the LayerNorm scales are ones: a decay would show


def test_k_draws_per_sequence_is_the_plain_step_on_the_batch_tiled_k_times():
  """train.draws_per_sequence=2 on 8 sequences is a plain step on [x; x] (16 rows, tiled, not repeated row by row,
  so a sequence's two lattice times lie half the lattice apart), through the compiled step of a built run."""
  corpus = _synthetic_corpus()
  tokens = corpus.train[:8]
  out = {}
  for name, draws, batch_size, rows in (("k2", 2, 8, tokens), ("tiled", 1, 16, np.tile(tokens, (2, 1))),
                                        ("repeated", 1, 16, np.repeat(tokens, 2, axis=0))):
    run = _one_device_run(corpus, **{"train.batch_size": batch_size, "train.draws_per_sequence": draws})
    c = run.config
    state, metrics = build_lib.compile_step(run)(run.state, build_lib.global_batch(run, {"tokens": rows}),
                                                 jax.random.key(c.seed))
    out[name] = (jax.device_get(state.params), float(metrics["loss"]))
  assert out["k2"][1] == pytest.approx(out["tiled"][1], rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), out["k2"][0], out["tiled"][0])
  assert abs(out["k2"][1] - out["repeated"][1]) > 1e-4  # the row order matters, so the check above can fail
  from replaid_jax import errors  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError, match="train.draws_per_sequence"):
    config_lib.from_config_dict(_tiny_config(**{"train.draws_per_sequence": 0}))


def test_antithetic_draws_are_the_mean_of_two_plain_estimates_with_eps_and_minus_eps():
  """diffusion.antithetic_noise with 2 draws on 8 sequences: the compiled step's loss and per-group gradient norms
  equal the mean of two plain estimates on the 8 sequences, one plan (times, roles) for both, with noises eps and
  -eps, each of them unbiased; a lattice K = 2 step on the same key differs, so the check can fail."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from replaid_jax import errors  # pylint: disable=g-import-not-at-top
  from replaid_jax.diffusion import elbo  # pylint: disable=g-import-not-at-top
  from replaid_jax.diffusion import time_sampling  # pylint: disable=g-import-not-at-top
  from replaid_jax.objectives import replaid  # pylint: disable=g-import-not-at-top
  corpus = _synthetic_corpus()
  tokens = corpus.train[:8]
  metrics = {}
  for name, antithetic in (("antithetic", True), ("lattice", False)):
    run = _one_device_run(corpus, **{"train.batch_size": 8, "train.draws_per_sequence": 2,
                                     "diffusion.antithetic_noise": antithetic,
                                     "diffusion.output_prior_warmup_steps": 0})
    c = run.config
    if antithetic:
      c_anti, state = c, jax.device_get(run.state)  # the compiled step donates its state
    _, m = build_lib.compile_step(run)(run.state, build_lib.global_batch(run, {"tokens": tokens}),
                                       jax.random.key(c.seed))
    metrics[name] = jax.device_get(m)
  d = c_anti.diffusion
  k_setup, k_noise = jax.random.split(jax.random.fold_in(jax.random.key(c_anti.seed), state.step))
  n_recon = replaid.recon_rows(state.loss_stats, d, 8)
  plan = time_sampling.train_plan(k_setup, 8, n_recon, time_sampling.selfcond_period(d.selfcond_fraction))
  weights = elbo.Weights(n_recon=n_recon.astype(np.float32), n_diff=(8 - n_recon).astype(np.float32),
                         n_rows=np.float32(8))
  eps = jax.random.normal(k_noise, tokens.shape + (c_anti.model.embed_dim,))
  halves = [elbo.loss_and_grads(state.params, tokens, plan, jax.random.key(99), weights, model_cfg=c_anti.model,
                                cfg=dataclasses.replace(d, antithetic_noise=False),
                                pscale=elbo.prior_scale(d, state.step), noise=sign * eps) for sign in (1.0, -1.0)]
  mean_loss = 0.5 * (float(halves[0][0]) + float(halves[1][0]))
  mean_grads = jax.tree.map(lambda a, b: 0.5 * (a + b), halves[0][2], halves[1][2])
  assert float(metrics["antithetic"]["loss"]) == pytest.approx(mean_loss, rel=1e-5)
  for group, g in mean_grads.items():
    assert float(metrics["antithetic"][f"grad_norm_{group}"]) == pytest.approx(
        float(optax.tree_utils.tree_norm(g)), rel=1e-4), group
  assert abs(float(halves[0][0]) - float(halves[1][0])) > 1e-4  # eps and -eps give different estimates
  assert abs(float(metrics["lattice"]["loss"]) - mean_loss) > 1e-4
  for bad, match in (({"objective": "mdlm"}, "objective='mdlm'"), ({"train.draws_per_sequence": 1}, "even"),
                     ({"train.draws_per_sequence": 2, "train.grad_accum_steps": 2}, "grad_accum_steps=1")):
    with pytest.raises(errors.ConfigError, match=match):
      config_lib.from_config_dict(_tiny_config(**{"diffusion.antithetic_noise": True, **bad}))


def test_within_time_schedule_variance_reaches_the_step_and_only_moves_the_schedule_differently():
  """diffusion.schedule_variance='within_time' through a built run's compiled step: the first step's loss is the
  same estimate as with the default rule, the schedule takes a different first update; invalid pairings are
  clear config errors."""
  from replaid_jax import errors  # pylint: disable=g-import-not-at-top
  base = {"optim.warmup_steps": 0, "optim.grad_clip": 0.0}
  p_m2, l_m2, _ = _run_steps((1, 1, 1), num_steps=1, **base)
  p_wt, l_wt, _ = _run_steps((1, 1, 1), num_steps=1, **base, **{"diffusion.schedule_variance": "within_time"})
  assert l_wt[0] == pytest.approx(l_m2[0], rel=1e-6)
  diff = lambda a, b: max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert diff(p_wt["schedule"], p_m2["schedule"]) > 1e-6
  assert diff(p_wt["denoiser"], p_m2["denoiser"]) < 1e-7
  for bad, match in (({"objective": "mdlm"}, "objective='mdlm'"),
                     ({"diffusion.schedule": "linear_fixed"}, "linear_fixed"),
                     ({"diffusion.antithetic_noise": True, "train.draws_per_sequence": 2}, "antithetic")):
    with pytest.raises(errors.ConfigError, match=match):
      config_lib.from_config_dict(_tiny_config(**{"diffusion.schedule_variance": "within_time", **bad}))
  with pytest.raises(errors.ConfigError, match="schedule_variance"):
    config_lib.from_config_dict(_tiny_config(**{"diffusion.schedule_variance": "variance"}))


def test_batch_not_divisible_by_devices_is_a_clear_error():
  from replaid_jax import errors  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError, match="not divisible by the 8 devices"):
    _run_steps((8, 1, 1), num_steps=0, **{"train.batch_size": 12})


def _npy_config(tmp_path, **overrides):
  rng = np.random.default_rng(1)
  np.save(tmp_path / "train.npy", rng.integers(0, 40, 5000, dtype=np.int32))
  np.save(tmp_path / "val.npy", rng.integers(0, 40, 600, dtype=np.int32))
  base = {"data.source": "npy", "data.train_files": str(tmp_path / "train.npy"),
          "data.val_files": str(tmp_path / "val.npy"), "data.npy_vocab_size": 40, "data.val_plays": "",
          "eval.num_samples": 0, "eval.final_num_times": 0, "train.num_steps": 4, "checkpoint.every_steps": 2}
  base.update(overrides)
  return _tiny_config(**base)


def _restore_final(workdir, step):
  ck = ckpt_lib.Checkpointer(workdir, read_only=True)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                         ema_params=ocp.args.StandardRestore()))
  with open(os.path.join(ck.directory, str(step), "data_iter", "process_0-of-1.json")) as f:
    data_state = f.read()
  ck.close()
  return out["state"]["params"], out["ema_params"], data_state


@pytest.mark.slow
def test_interrupted_and_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path):
  straight = str(tmp_path / "straight")
  loop.train_and_evaluate(_npy_config(tmp_path), straight)
  resumed = str(tmp_path / "resumed")
  first = loop.train_and_evaluate(_npy_config(tmp_path), resumed, stop_after=2)
  assert first == {"step": 2, "stopped": True}
  loop.train_and_evaluate(_npy_config(tmp_path), resumed)
  a_params, a_ema, a_data = _restore_final(straight, 4)
  b_params, b_ema, b_data = _restore_final(resumed, 4)
  jax.tree.map(np.testing.assert_array_equal, a_params, b_params)
  jax.tree.map(np.testing.assert_array_equal, a_ema, b_ema)
  assert a_data == b_data
  with open(os.path.join(straight, "train", "metrics.jsonl")) as f:
    straight_loss = {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}
  with open(os.path.join(resumed, "train", "metrics.jsonl")) as f:
    resumed_loss = {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}
  assert straight_loss == resumed_loss and sorted(straight_loss) == [1, 2, 3, 4]


@pytest.mark.slow
def test_resuming_with_another_tokenizer_vocabulary_is_refused(tmp_path):
  from replaid_jax import errors  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(_npy_config(tmp_path, **{"train.num_steps": 2}), workdir)
  cd = _npy_config(tmp_path, **{"data.npy_vocab_size": 48, "train.num_steps": 4})
  with pytest.raises(errors.CheckpointError, match="vocab_size=40"):
    loop.train_and_evaluate(cd, workdir)


def _train_cli(workdir, *args, env=None):
  cmd = [sys.executable, os.path.join(REPO, "launch", "train.py"), "--config=" + os.path.join(REPO, "configs", "tiny.py"),
         f"--workdir={workdir}", *args]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)


@pytest.mark.slow
def test_end_to_end_tiny_run_through_the_train_binary(tmp_path):
  workdir = tmp_path / "run"
  proc = _train_cli(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = json.loads((workdir / "eval" / "final.json").read_text())
  assert final["step"] == 4 and np.isfinite(final["nats_per_token"]) and final["stderr"] > 0
  assert final["unigram_nats_per_token"] > 0 and final["num_times"] == 2
  rows = [json.loads(line) for line in (workdir / "train" / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "train/tokens_per_s" in r]
  assert len(train_rows) == 4 and all(r["train/flops_per_s"] > 0 for r in train_rows)
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "train"))
  assert (workdir / "plots" / "gamma_step4.png").stat().st_size > 1000
  assert (workdir / "plots" / "loss.png").stat().st_size > 1000
  # The per-noise-level diagnostic: per-bin gains over the context-free denoiser, embedding separation, plot.
  diag = next(r for r in rows if "diag/context_gain" in r)
  assert len([k for k in diag if k.startswith("diag/gain_bin")]) == 12
  assert sum(diag[f"diag/gain_bin{i:02d}"] for i in range(12)) == pytest.approx(diag["diag/context_gain"], abs=1e-6)
  assert 0 < diag["diag/embed_min_dist"] <= diag["diag/embed_mean_dist"] <= 2
  assert (workdir / "plots" / "noise_levels_step4.png").stat().st_size > 1000
  samples = [json.loads(line) for line in (workdir / "samples" / "samples_step4.jsonl").read_text().splitlines()]
  assert len(samples) == 1 and len(samples[0]["tokens"]) == 32 and samples[0]["index"] == 0
  assert "validation bound at step 4" in proc.stderr
  # Progress (replaid_jax/progress.py) leads each metric line: steps done of the total, rate and ETA first.
  assert "train: 0/4 steps (0%), compiling…" in proc.stderr
  assert re.search(r"\] train: 4/4 steps \(100%\), [\d.,]+ steps/s, ETA \d+:\d\d:\d\d \| loss=[\d.]+  lr=",
                   proc.stderr)
  assert f"results: {workdir / 'eval' / 'final.json'}; plots: {workdir / 'plots'}" in proc.stderr
  assert re.search(r"Total: [\d,]+ parameters, [\d,]+ bytes\n", proc.stderr)
  assert not (workdir / "eval" / "metrics.jsonl").exists()  # nothing was written there
  # TensorBoard: the config as hparams, the plots as images, the samples as text, next to the scalars.
  events = [e for name in os.listdir(workdir / "train") if name.startswith("events.out.tfevents")
            for e in read_events(workdir / "train" / name)]
  values = [v for e in events for v in e.summary.value]
  plugins = {v.metadata.plugin_data.plugin_name for v in values}
  assert {"hparams", "text"} <= plugins
  hparams = next(v for v in values if v.tag == "_hparams_/session_start_info").metadata.plugin_data.content
  assert b"train.num_steps" in hparams and b"model.width" in hparams
  images = {v.tag for v in values if v.HasField("image")}
  assert {"plots/gamma", "plots/bound_vs_minutes", "plots/loss", "plots/noise_levels"} <= images
  assert any(v.tag.startswith("samples/") for v in values if v.metadata.plugin_data.plugin_name == "text")
  assert any(v.tag == "train/loss" for v in values)


@pytest.mark.parametrize("args, expected", [
    (["--config.train.bogus=3"], "unknown config key train.bogus "),
    (["--config.train.nmu_steps=3"], "error: unknown config key train.nmu_steps; did you mean train.num_steps?"),
    (["--config.trian.num_steps=3"], "error: unknown config key trian.num_steps; did you mean train.num_steps?"),
    (["--config.data.seq_len=128"], "data.seq_len=128 exceeds model.max_seq_len=64"),
    (["--config.data.source=text", "--config.data.train_files=/nonexistent/*.txt",
      "--config.data.val_files=/nonexistent/v.txt", "--config.data.val_plays="], "data.train_files"),
])
def test_bad_input_ends_with_one_clear_message_and_no_traceback(tmp_path, args, expected):
  proc = _train_cli(tmp_path / "run", *args)
  assert proc.returncode == 2
  assert proc.stderr.count(expected) == 1  # printed once, not also logged
  assert "Traceback" not in proc.stderr
  assert len([line for line in proc.stderr.splitlines() if "error:" in line]) == 1 and "\\n" not in proc.stderr


def test_help_shows_the_multi_process_flags():
  proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "train.py"), "--help"], capture_output=True,
                        text=True, cwd=REPO, timeout=600)
  for flag in ("--config", "--workdir", "--coordinator_address", "--num_processes", "--process_id"):
    assert f"  {flag}:" in proc.stdout, flag


def test_bad_text_files_are_named_in_the_error(tmp_path):
  from replaid_jax import errors  # pylint: disable=g-import-not-at-top
  bad = tmp_path / "latin1.txt"
  bad.write_bytes(b"good text then \xff\xfe bad")
  empty = tmp_path / "empty.txt"
  empty.write_text("   \n")
  for path, pattern in ((bad, "latin1.txt"), (empty, "empty")):
    cd = _tiny_config(**{"data.source": "text", "data.train_files": str(path), "data.val_files": str(path),
                         "data.val_plays": ""})
    with pytest.raises(errors.DataError, match=pattern):
      loop.train_and_evaluate(cd, str(tmp_path / "w"))


def test_a_training_process_traces_the_model_init_once(monkeypatch):
  """Building the run traces the init once, under jit: that trace gives the shapes, the parameter and train-state
  shardings and (compiled) the values. The train step, the FLOP count and the inference model of the same config
  then read the structure that trace kept, so none of them traces the init again (not even an nnx.eval_shape)."""
  from replaid_jax import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from replaid_jax import inference  # pylint: disable=g-import-not-at-top
  from replaid_jax.models import model as model_lib  # pylint: disable=g-import-not-at-top
  traced = []
  original = model_lib.Model.__init__

  def counting_init(self, *args, **kwargs):
    traced.append(kwargs["gamma_0"])
    original(self, *args, **kwargs)

  monkeypatch.setattr(model_lib.Model, "__init__", counting_init)
  monkeypatch.setattr(model_lib, "_ABSTRACTS", {})  # a fresh process: no structure kept yet
  _, losses, run = _run_steps((1, 1, 1), num_steps=1, seed=3)
  # One trace, the one that draws the values: it gets the config's bounds, where the eval_shape of `abstract` gets 0.0.
  assert run.config.diffusion.gamma_0 != 0.0
  assert len(losses) == 1 and traced == [run.config.diffusion.gamma_0]
  flops_lib.xla_forward_flops(run.objective, run.state.params, 32)
  inference.build_model(run.config, devices=jax.devices()[:1])
  assert len(traced) == 1


# ---- train.size_to_minutes: the run sized to the speed measured after compilation.


def test_sized_step_count_fits_the_time_left_less_the_reserve():
  assert sizing_lib.sized_num_steps(2.0, 600.0, 1500) == int(2.0 * 600.0 * (1 - sizing_lib.SIZE_RESERVE))  # 1,020
  assert sizing_lib.sized_num_steps(5.0, 600.0, 1500) == 1500  # train.num_steps is the most it takes
  assert sizing_lib.sized_num_steps(2.0, -10.0, 1500) == 0
  assert sizing_lib.sized_num_steps(2.0, 600.0, 1500, done=20) == 20 + 960
  assert sizing_lib.sized_num_steps(2.0, 0.0, 1500, 20) == 20


def test_an_evaluation_is_skipped_only_when_it_alone_would_stop_the_run_short_of_its_schedule():
  fits = sizing_lib.evaluation_fits
  assert fits(100, 1.0, 30.0, 200.0)  # 100 s of training and 30 s of evaluation fit 200 s
  assert not fits(100, 1.0, 30.0, 120.0)  # 100 s fit, 130 s do not: the evaluation is skipped
  assert fits(100, 1.0, 30.0, 90.0)  # the schedule cannot finish either way: the run keeps its evaluations
  assert fits(100, None, 30.0, 120.0) and fits(0, 1.0, 30.0, 0.0)  # no pace measured yet; nothing left to train


def test_a_budgeted_run_asks_before_each_in_loop_evaluation_and_skips_the_ones_refused(tmp_path, monkeypatch):
  asked = []

  def refuse_the_first(steps_left, steps_per_second, eval_seconds, seconds_left):
    asked.append((steps_left, steps_per_second, eval_seconds, seconds_left))
    return len(asked) > 1

  monkeypatch.setattr(sizing_lib, "evaluation_fits", refuse_the_first)
  w = str(tmp_path / "w")
  cfg = {"train.num_steps": 6, "train.eval_every": 2, "train.max_minutes": 600.0, "eval.final_num_times": 0}
  loop.train_and_evaluate(_tiny_config(**cfg), w)
  assert [a[0] for a in asked] == [4, 2]  # before the evaluations at steps 2 and 4 (none at the last step)
  assert asked[0][2] == 0.0 and asked[1][2] == 0.0  # no evaluation has run when the second is asked about
  assert all(a[1] is not None and a[1] > 0 and 0 < a[3] <= 600 * 60 for a in asked)
  assert [r["step"] for r in _metric_rows(w) if "val/nats_per_token" in r] == [4]


def test_timing_the_compiled_step_leaves_the_state_as_it_was():
  corpus = _synthetic_corpus()
  run = _one_device_run(corpus)
  c = run.config
  batch = build_lib.global_batch(run, {"tokens": corpus.train[:8]})
  key = jax.random.key(c.seed)
  compiled = build_lib.compile_step(run).lower(run.state, batch, key).compile()
  before = jax.device_get(run.state.params)
  rate = sizing_lib.time_train_step(run, compiled, run.state, batch, key, min_steps=2, min_seconds=0.0)
  assert rate > 0 and int(run.state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.state.params), before)
  shorter = sizing_lib.with_num_steps(run, 3)
  assert shorter.config.train.num_steps == 3 and shorter.tx is not run.tx and sizing_lib.with_num_steps(run, 4) is run


def test_a_second_sizing_takes_more_steps_only_when_enough_more_fit_and_never_past_the_cap():
  run = _one_device_run(_synthetic_corpus(), **{"train.size_to_minutes": 10.0, "train.num_steps": 1000})
  now = time.time()  # the budget's 600 s start now
  sized, first = sizing_lib.size_run(run, 0.5, done=20, t_start=now, compile_s=0.0, measured=True)
  n1 = first["num_steps"]
  assert 255 <= n1 <= 260 and sized.config.train.num_steps == n1  # 20 + 0.5 steps/s x 600 s x 0.8
  again = dict(done=40, t_start=now, compile_s=0.0, measured=True, measured_from=20, more_than=n1, cap=1000)
  assert sizing_lib.size_run(sized, 0.5, **again) is None  # about 280 steps: less than 10% more
  faster, record = sizing_lib.size_run(sized, 1.0, **again)
  assert 515 <= record["num_steps"] <= 520 and faster.config.train.num_steps == record["num_steps"]
  assert record["cap"] == 1000 and record["decided_at_step"] == 40
  _, capped = sizing_lib.size_run(sized, 50.0, **again)
  assert capped["num_steps"] == 1000  # the config's own train.num_steps stays the most a run takes


def _metric_rows(workdir):
  with open(os.path.join(workdir, "train", "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_a_sized_run_completes_the_schedule_it_decided(tmp_path):
  sized = {"train.size_to_minutes": 10.0, "train.num_steps": 50, "eval.final_num_times": 0, "eval.num_samples": 0}
  # A forced speed of 0.02 steps/s leaves about 10 of the 50 steps in 10 minutes (less what setup took).
  a = str(tmp_path / "sized")
  out = loop.train_and_evaluate(_tiny_config(**sized), a, steps_per_second=0.02)
  with open(os.path.join(a, "train", "config.json")) as f:
    meta = json.load(f)
  sizing = meta["sizing"]
  n = sizing["num_steps"]
  assert sizing["steps_per_second"] == 0.02 and not sizing["measured"] and sizing["cap"] == 50
  # Decided after step 2, the end of the warm-up (optim.warmup_steps=2), from the time left then.
  assert sizing["decided_at_step"] == 2
  assert n == 2 + int(0.02 * sizing["seconds_left"] * (1 - sizing_lib.SIZE_RESERVE)) and 2 < n < 50
  assert meta["config"]["train"]["num_steps"] == n and meta["config"]["train"]["size_to_minutes"] == 10.0
  ckpt = ckpt_lib.Checkpointer(a)
  try:
    assert ckpt.latest_step() == n and ckpt.metadata(n)["sizing"] == sizing
  finally:
    ckpt.close()
  rows = _metric_rows(a)
  assert [r["sizing/num_steps"] for r in rows if "sizing/num_steps" in r] == [n]
  train_rows = {r["step"]: r for r in rows if "train/loss" in r}
  assert out["step"] == n and sorted(train_rows) == list(range(1, n + 1))  # the whole schedule ran
  from replaid_jax.train import optim  # pylint: disable=g-import-not-at-top
  c = config_lib.from_config_dict(_tiny_config())
  schedule = optim.learning_rates(c.optim, total_steps=n)["backbone"]
  assert train_rows[n]["train/lr"] == pytest.approx(float(schedule(n - 1)))
  assert float(schedule(n)) == pytest.approx(c.optim.lr * c.optim.final_lr_fraction)  # decayed to its end
  # The optimizer ran that schedule: the same losses as a run given num_steps=n, and as a sized run whose
  # measured speed (on a copy of the state) lets it take them all.
  b = str(tmp_path / "plain")
  loop.train_and_evaluate(_tiny_config(**{**sized, "train.size_to_minutes": 0.0, "train.num_steps": n}), b)
  measured = str(tmp_path / "measured")
  loop.train_and_evaluate(_tiny_config(**{**sized, "train.size_to_minutes": 1000.0, "train.num_steps": n}), measured)
  with open(os.path.join(measured, "train", "config.json")) as f:
    timed = json.load(f)["sizing"]
  assert timed["measured"] and timed["steps_per_second"] > 0 and timed["num_steps"] == n
  loss = lambda w: {r["step"]: r["train/loss"] for r in _metric_rows(w) if "train/loss" in r}
  assert loss(a) == loss(b) == loss(measured)
  # A budget that fits no more than the warm-up is refused with what to change.
  from replaid_jax import errors  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError,
                     match=r"train.size_to_minutes=10: at the measured 0.0001 steps/s only 2 steps fit "):
    loop.train_and_evaluate(_tiny_config(**sized), str(tmp_path / "short"), steps_per_second=1e-4)


@pytest.mark.slow
def test_a_sized_run_measures_again_at_the_end_of_its_warm_up_and_takes_the_steps_a_slow_start_left(
    tmp_path, monkeypatch):
  # As on a machine busy for a minute: the batches for steps 2-20 come 2 s late, the rest of the 40-step warm-up
  # runs at full speed. The first sizing (step 20) sees about 0.5 steps/s; the second (step 40) the real speed.
  real, calls = build_lib.global_batch, []

  def late_at_first(*args, **kwargs):
    calls.append(None)
    if len(calls) <= 20:  # the setup's first batch and those drawn after steps 1-19
      time.sleep(2.0)
    return real(*args, **kwargs)

  monkeypatch.setattr(build_lib, "global_batch", late_at_first)
  cap = 150
  sized = {"train.size_to_minutes": 3.0, "train.num_steps": cap, "optim.warmup_steps": 40,
           "eval.final_num_times": 0, "eval.num_samples": 0}
  a = str(tmp_path / "sized")
  out = loop.train_and_evaluate(_tiny_config(**sized), a)
  with open(os.path.join(a, "train", "config.json")) as f:
    sizing = json.load(f)["sizing"]
  first, n = sizing["first"], sizing["num_steps"]
  assert first["decided_at_step"] == 20 and sizing["decided_at_step"] == 40 and sizing["measured"]
  assert first["steps_per_second"] < 1.0 < sizing["steps_per_second"]
  assert first["num_steps"] < cap and n >= (1 + sizing_lib.SIZE_REVISE_MIN) * first["num_steps"]
  assert sizing["cap"] == cap and n <= cap
  rows = _metric_rows(a)
  assert [r["sizing/num_steps"] for r in rows if "sizing/num_steps" in r] == [first["num_steps"], n]
  assert out["step"] == n and max(r["step"] for r in rows if "train/loss" in r) == n
  # The warm-up's learning rates do not depend on the schedule's length: the run is the one given n steps.
  monkeypatch.setattr(build_lib, "global_batch", real)
  b = str(tmp_path / "plain")
  loop.train_and_evaluate(_tiny_config(**{**sized, "train.size_to_minutes": 0.0, "train.num_steps": n}), b)
  loss = lambda w: {r["step"]: r["train/loss"] for r in _metric_rows(w) if "train/loss" in r}
  assert loss(a) == loss(b)


@pytest.mark.slow
def test_a_resumed_sized_run_keeps_the_step_count_it_decided(tmp_path):
  sized = {"train.size_to_minutes": 10.0, "train.num_steps": 50, "eval.final_num_times": 0, "eval.num_samples": 0}
  workdir = str(tmp_path / "run")
  first = loop.train_and_evaluate(_tiny_config(**sized), workdir, stop_after=3, steps_per_second=0.02)
  with open(os.path.join(workdir, "train", "config.json")) as f:
    n = json.load(f)["sizing"]["num_steps"]
  assert first == {"step": 3, "stopped": True} and 3 < n < 50
  # Resumed at a speed that would now fit all 50 steps: the run keeps its n-step schedule and ends there.
  out = loop.train_and_evaluate(_tiny_config(**sized), workdir, steps_per_second=100.0)
  assert out["step"] == n
  rows = _metric_rows(workdir)
  assert max(r["step"] for r in rows if "train/loss" in r) == n
  assert [r["sizing/num_steps"] for r in rows if "sizing/num_steps" in r] == [n]  # decided once
  ckpt = ckpt_lib.Checkpointer(workdir)
  try:
    meta = ckpt.metadata(n)
  finally:
    ckpt.close()
  assert meta["sizing"]["num_steps"] == meta["config"]["train"]["num_steps"] == n
