"""The AR, masked- and uniform-state-diffusion baselines, the ablation switches and FLOP accounting."""

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from configs import tiny
from conftest import TINY_DIFFUSION, TINY_MODEL
from replaid_jax import config_lib
from replaid_jax import flops
from replaid_jax import objectives
from replaid_jax.eval import run as eval_run
from replaid_jax.judges import perplexity
from replaid_jax.objectives import ar as ar_lib
from replaid_jax.objectives import base
from replaid_jax.objectives import duo as duo_lib
from replaid_jax.objectives import mdlm as mdlm_lib
from replaid_jax.objectives import token_model
from replaid_jax.train import loop
from replaid_jax.train import step as step_lib

from test_train import _run_steps


def _perturbed(objective, key, scale=0.3):
  """Init params with every zero-initialised weight made non-zero."""
  params, _ = objective.init(key, None)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _log_softmax64(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---- AR: the reported NLL is the sum of -log p over the tokens.


def test_ar_bound_equals_an_independent_prefix_by_prefix_nll():
  obj = ar_lib.AR(base.Sections(TINY_MODEL, TINY_DIFFUSION, "ar"))
  params = _perturbed(obj, jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, TINY_MODEL.vocab_size, (3, 10)).astype(np.int32)
  reported = np.asarray(obj.sequence_bound(params, jnp.asarray(tokens), jax.random.key(1), num_times=1).recon)
  bos = TINY_MODEL.vocab_size
  expected = np.zeros(3)
  for pos in range(tokens.shape[1]):
    # Only BOS and the tokens before `pos` are given: the network never sees later tokens.
    inputs = np.concatenate([np.full((3, 1), bos), tokens[:, :pos]], axis=1).astype(np.int32)
    logits = token_model.logits(params, jnp.asarray(inputs), jnp.zeros((3,)), TINY_MODEL, causal=True)[:, -1]
    expected -= _log_softmax64(logits)[np.arange(3), tokens[:, pos]]
  np.testing.assert_allclose(reported * tokens.shape[1], expected, rtol=2e-5)


def test_ar_gradient_accumulation_equals_one_big_batch():
  params_1, losses_1, _ = _run_steps((1, 1, 1), num_steps=2, **{"train.grad_accum_steps": 1}, objective="ar")
  params_2, losses_2, _ = _run_steps((1, 1, 1), num_steps=2, **{"train.grad_accum_steps": 2}, objective="ar")
  np.testing.assert_allclose(losses_2, losses_1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_2, params_1)


# ---- MDLM: the NELBO estimator against brute force on a tiny vocabulary.


def _pattern_probs(t, masks):
  k = masks.sum(-1)
  return t[:, None] ** k[None, :] * (1 - t[:, None]) ** (masks.shape[1] - k[None, :])


def test_mdlm_nelbo_matches_brute_force_integral_and_discrete_kl_sum():
  model = dataclasses.replace(TINY_MODEL, vocab_size=3)
  obj = mdlm_lib.MDLM(base.Sections(model, TINY_DIFFUSION, "mdlm"))
  params = _perturbed(obj, jax.random.key(2), scale=0.5)
  x = np.array([2, 0, 1], np.int32)
  seq_len = x.size
  masks = np.array([[(m >> i) & 1 for i in range(seq_len)] for m in range(2**seq_len)], bool)  # all 8 patterns

  def masked_ce(t_grid):
    """CE [T, P, L] of the true tokens for every (t, mask pattern)."""
    t_rows = np.repeat(t_grid, len(masks)).astype(np.float32)
    m_rows = np.tile(masks, (len(t_grid), 1))
    tok = np.broadcast_to(x, m_rows.shape)
    ce = obj.masked_ce(params, jnp.asarray(tok), jnp.asarray(t_rows), jnp.asarray(m_rows))
    return np.asarray(ce, np.float64).reshape(len(t_grid), len(masks), seq_len)

  # (a) The continuous-time NELBO as an integral over t (Gauss-Legendre), exact sum over the mask patterns.
  nodes, wts = np.polynomial.legendre.leggauss(48)
  t_q = 0.5 * (nodes + 1)
  ce = masked_ce(t_q)
  integrand = (_pattern_probs(t_q, masks) * (ce * masks[None]).sum(-1) / t_q[:, None]).sum(-1) / seq_len
  integral = float(0.5 * (wts * integrand).sum())

  # (b) The discrete-time ELBO with T steps, from categorical KLs over the V + 1 states (no closed form used).
  num_steps = 1000
  t_i = np.arange(1, num_steps + 1) / num_steps
  s_i = t_i - 1.0 / num_steps
  probs = np.exp(_log_softmax64(_logits_at(obj, params, x, masks, t_i)))  # [T, P, L, V]
  reveal = ((t_i - s_i) / t_i)[:, None, None]  # q(z_s = x | z_t = MASK, x)
  q_x = np.broadcast_to(reveal, probs.shape[:3])
  p_x = reveal * np.take_along_axis(probs, np.broadcast_to(x[None, None, :, None], probs.shape[:3] + (1,)),
                                    -1)[..., 0]
  # q and p both put s/t on staying masked, so the [MASK] entry of the KL is 0; the token entries:
  kl = q_x * np.log(q_x / p_x)
  discrete = float((_pattern_probs(t_i, masks) * (kl * masks[None]).sum(-1)).sum() / seq_len)

  # (c) The estimator the eval binary uses, over many sequences' worth of draws.
  tokens = jnp.asarray(np.broadcast_to(x, (2048, seq_len)))
  est = np.asarray(jax.jit(lambda k: obj.sequence_bound(params, tokens, k, num_times=4).diffusion)(
      jax.random.key(3)), np.float64)
  mean, se = est.mean(), est.std(ddof=1) / np.sqrt(est.size)

  assert integral > 0.5
  assert abs(discrete - integral) / integral < 5e-3, (discrete, integral)
  assert abs(mean - integral) < 4 * se, (mean, se, integral)
  assert se < 0.02 * integral


def _logits_at(obj, params, x, masks, t_grid):
  t_rows = np.repeat(t_grid, len(masks)).astype(np.float32)
  m_rows = np.tile(masks, (len(t_grid), 1))
  z = np.where(m_rows, obj.mask_id, np.broadcast_to(x, m_rows.shape)).astype(np.int32)
  logits = jax.jit(lambda p, z, t: token_model.logits(p, z, t, obj.c.model, causal=False))(
      params, jnp.asarray(z), jnp.asarray(t_rows))
  return np.asarray(logits, np.float64).reshape(len(t_grid), len(masks), x.size, -1)


# ---- Duo: the uniform-state NELBO against brute force on a tiny vocabulary.


def _all_states(vocab, seq_len):
  return np.array(np.meshgrid(*[np.arange(vocab)] * seq_len, indexing="ij")).reshape(seq_len, -1).T.astype(np.int32)


def _duo_probs(obj, params, states, t_grid):
  """x_theta [T, S, L, V] (float64) at every (t, state)."""
  z = np.tile(states, (len(t_grid), 1))
  t_rows = np.repeat(t_grid, len(states)).astype(np.float32)
  probs = jax.jit(obj.probs)(params, jnp.asarray(z), jnp.asarray(t_rows))
  return np.asarray(probs, np.float64).reshape(len(t_grid), len(states), states.shape[1], -1)


def _forward_marginal(x, states, alpha, vocab):
  """q(z_t = state | x) [T, S] = prod_l (alpha [z_l = x_l] + (1 - alpha)/V)."""
  per = alpha[:, None, None] * (states[None] == x[None, None]) + (1 - alpha[:, None, None]) / vocab
  return per.prod(-1)


def _duo_integrand(obj, params, x, states, t):
  """The NELBO integrand E_{z_t} (1/L) sum_l w(t) sum_{k != z_l} [r log(r / r^theta) - r + r^theta] [T],
  in float64 from the plain formula, with the exact sum over z_t; and the per-state values [T, S]."""
  vocab = obj.c.model.vocab_size
  alpha = 1 - t
  probs = _duo_probs(obj, params, states, t)  # [T, S, L, V]
  a = alpha[:, None, None, None]
  xbar = np.broadcast_to(vocab * a * np.eye(vocab)[x][None, None] + (1 - a), probs.shape)
  xbar_t = vocab * a * probs + (1 - a)
  at_z = lambda v: np.take_along_axis(v, np.broadcast_to(states[None, :, :, None], v.shape[:3] + (1,)), -1)
  r, r_t = xbar / at_z(xbar), xbar_t / at_z(xbar_t)
  bracket = np.where(np.arange(vocab) == states[None, :, :, None], 0.0, r * np.log(r / r_t) - r + r_t).sum(-1)
  per_state = bracket.mean(-1) / (vocab * alpha[:, None])
  return (_forward_marginal(x, states, alpha, vocab) * per_state).sum(-1), per_state


def _duo_discrete_elbo(obj, params, x, states, num_steps):
  """The discrete-time ELBO with T steps: exact categorical KLs between q(z_s | z_t, x) and q(z_s | z_t, x_theta),
  from Bayes' rule on the forward kernels (no continuous-time limit taken). No recon or prior term: z_0 = x and
  q(z_1 | x) is the uniform prior."""
  vocab = obj.c.model.vocab_size
  t_i = np.arange(1, num_steps + 1) / num_steps
  alpha_t, alpha_s = 1 - t_i, 1 - (t_i - 1.0 / num_steps)
  probs = _duo_probs(obj, params, states, t_i)
  a_ts = (alpha_t / alpha_s)[:, None, None, None]
  a_s = alpha_s[:, None, None, None]
  stay = a_ts * (np.arange(vocab) == states[None, :, :, None]) + (1 - a_ts) / vocab  # q(z_t | z_s = k)
  q_post = stay * (a_s * np.eye(vocab)[x][None, None] + (1 - a_s) / vocab)
  p_post = stay * (a_s * probs + (1 - a_s) / vocab)
  q_post /= q_post.sum(-1, keepdims=True)
  p_post /= p_post.sum(-1, keepdims=True)
  kl = np.where(q_post > 0, q_post * np.log(np.where(q_post > 0, q_post, 1) / p_post), 0.0).sum(-1)  # [T, S, L]
  return float((_forward_marginal(x, states, alpha_t, vocab) * kl.sum(-1)).sum() / x.size)


def test_duo_nelbo_matches_brute_force_integral_and_discrete_kl_sum():
  vocab = 3
  model = dataclasses.replace(TINY_MODEL, vocab_size=vocab)
  obj = duo_lib.Duo(base.Sections(model, TINY_DIFFUSION, "duo"))
  params = _perturbed(obj, jax.random.key(4), scale=0.5)
  x = np.array([2, 0, 1], np.int32)
  seq_len = x.size
  states = _all_states(vocab, seq_len)  # all 27 z_t

  # The float32 implementation against the plain float64 formula, pointwise in (t, z_t), at times for which
  # 1 - t is exact in float32.
  for t in (2.0**-13, 0.3125, 0.96875):
    _, per_state = _duo_integrand(obj, params, x, states, np.array([t]))
    implemented = jax.jit(obj.elbo_terms)(params, jnp.asarray(np.broadcast_to(x, states.shape)), jnp.asarray(states),
                                          jnp.full((len(states),), t, jnp.float32))
    np.testing.assert_allclose(np.asarray(implemented), per_state[0], rtol=3e-4)

  # (a) The continuous-time NELBO: Gauss-Legendre on panels refined towards t = 0, where the integrand has a
  # log(1/t) singularity (a token resampled at small t carries r ~ V/t), and narrow panels over [0.1, 1],
  # where the randomly perturbed network makes the integrand rough in t.
  nodes, wts = np.polynomial.legendre.leggauss(64)
  edges = [0.0] + [10.0**k for k in range(-8, -1)] + list(np.linspace(0.1, 1.0, 37))
  integral = 0.0
  for lo, hi in zip(edges[:-1], edges[1:]):
    t = lo + (hi - lo) * 0.5 * (nodes + 1)
    integral += (hi - lo) * 0.5 * float((wts * _duo_integrand(obj, params, x, states, t)[0]).sum())

  # (b) The discrete-time ELBO is looser and tends to the integral from above as T grows.
  d_4k, d_16k = (_duo_discrete_elbo(obj, params, x, states, n) for n in (4000, 16000))

  # (c) The estimator's draws: at a fixed t, z_t ~ corrupt() averages to the exact expectation over the 27 states.
  # (Over t the integrand's log(1/t) singularity gives the Monte Carlo estimate a heavy tail, so the test fixes t;
  # the time lattice t_k = (k + u)/K is uniform on [0, 1) by construction.)
  tokens = jnp.asarray(np.broadcast_to(x, (8192, seq_len)))
  for t in (0.0625, 0.5):
    exact = float(_duo_integrand(obj, params, x, states, np.array([t]))[0][0])
    t_b = jnp.full((tokens.shape[0],), t, jnp.float32)
    draws = np.asarray(jax.jit(lambda k, t_b=t_b: obj.elbo_terms(params, tokens, obj.corrupt(k, tokens, t_b), t_b))(
        jax.random.key(5)), np.float64)
    mean, se = draws.mean(), draws.std(ddof=1) / np.sqrt(draws.size)
    assert abs(mean - exact) < 4 * se and se < 0.05 * exact, (t, mean, se, exact)

  assert integral > 0.5
  assert d_4k > d_16k > integral, (d_4k, d_16k, integral)
  assert (d_16k - integral) / integral < 0.015, (d_16k, integral)
  assert (d_16k - integral) < 0.6 * (d_4k - integral)  # converging


def test_duo_divergence_is_finite_and_exact_at_the_ends_of_time():
  vocab = 5
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, vocab, (4, 6)), jnp.int32)
  z = jnp.asarray(rng.integers(0, vocab, (4, 6)), jnp.int32)
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(4, 6, vocab)), jnp.float32), -1)
  # t -> 1 (alpha -> 0): the weight 1/(V alpha) diverges while the bracket vanishes like alpha^2; the term -> 0 linearly.
  tiny = np.asarray(duo_lib._divergence(x, z, probs, jnp.full((4,), 1 - 1e-6)))  # pylint: disable=protected-access
  small = np.asarray(duo_lib._divergence(x, z, probs, jnp.full((4,), 1 - 1e-3)))  # pylint: disable=protected-access
  assert np.isfinite(tiny).all() and (tiny >= 0).all()
  np.testing.assert_allclose(tiny, small * 1e-3, rtol=2e-2, atol=1e-9)
  assert np.all(np.asarray(duo_lib._divergence(x, z, probs, jnp.ones((4,)))) == 0)  # pylint: disable=protected-access
  # t = 0 (alpha = 1, z = x): the divergence is sum_{k != x} p_k / p_x / V, the 1/p analogue of -log p.
  p = np.asarray(probs, np.float64)
  p_x = np.take_along_axis(p, np.asarray(x)[..., None], -1)[..., 0]
  at_zero = np.asarray(duo_lib._divergence(x, x, probs, jnp.zeros((4,))))  # pylint: disable=protected-access
  np.testing.assert_allclose(at_zero, (1 - p_x) / p_x / vocab, rtol=1e-4)
  z_ok = z.at[3].set(x[3])  # at t = 0 only z = x has probability under q
  grads = jax.grad(lambda pr: jnp.sum(duo_lib._divergence(x, z_ok, pr, jnp.asarray([1.0, 1 - 1e-6, 0.5, 0.0]))))(probs)
  assert np.isfinite(np.asarray(grads)).all()


# ---- samplers.


@pytest.mark.parametrize("name", ["ar", "mdlm", "duo"])
def test_baseline_samplers_reproduce_a_known_distribution_and_keep_known_tokens(name):
  model = dataclasses.replace(TINY_MODEL, vocab_size=4)
  obj = objectives.REGISTRY[name](base.Sections(model, TINY_DIFFUSION, name))
  params, _ = obj.init(jax.random.key(0), None)
  p = np.array([0.1, 0.2, 0.3, 0.4])
  params["denoiser"]["out_w"] = jnp.zeros_like(params["denoiser"]["out_w"])  # logits = log p whatever the input
  params["denoiser"]["out_b"] = jnp.log(jnp.asarray(p, jnp.float32))
  known = np.zeros((512, 6), np.int32)
  known[:, 0] = 2
  mask = np.zeros((512, 6), bool)
  mask[:, 0] = True
  toks = np.asarray(obj.sample(params, jax.random.key(1), num_samples=512, seq_len=6, num_steps=8,
                               known_BL=jnp.asarray(known), known_mask_BL=jnp.asarray(mask)))
  assert (toks[:, 0] == 2).all()
  freq = np.bincount(toks[:, 1:].reshape(-1), minlength=4) / toks[:, 1:].size
  assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / toks[:, 1:].size)), (freq, p)
  again = np.asarray(obj.sample(params, jax.random.key(1), num_samples=512, seq_len=6, num_steps=8,
                                known_BL=jnp.asarray(known), known_mask_BL=jnp.asarray(mask)))
  np.testing.assert_array_equal(toks, again)


# ---- ablation switches.


def test_frozen_embeddings_do_not_move_and_the_rest_does():
  _, _, run = _run_steps((1, 1, 1), num_steps=0, **{"diffusion.learn_embeddings": False})
  before = jax.device_get(run.state.params)
  after, losses, _ = _run_steps((1, 1, 1), num_steps=2, **{"diffusion.learn_embeddings": False})
  np.testing.assert_array_equal(after["embedding"]["table"], before["embedding"]["table"])
  assert not np.allclose(after["denoiser"]["in_proj"], before["denoiser"]["in_proj"])
  assert np.isfinite(losses).all()


def test_aux_ce_adds_the_weighted_token_cross_entropy_to_the_loss():
  cd = tiny.get_config()
  cd.model.vocab_size = 48
  cd.diffusion.aux_ce_weight = 0.5
  c = config_lib.from_config_dict(cd)
  obj = objectives.make(c)
  params = _perturbed(obj, jax.random.key(0))
  state = types.SimpleNamespace(loss_stats=step_lib.LossStats.zeros(), step=jnp.zeros((), jnp.int32))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 48, (8, 32)), jnp.int32)
  setup = obj.setup(state, 8, jax.random.key(1))
  loss, terms, _ = obj.loss_and_grads(params, tokens, setup, jax.random.key(2))
  m = obj.metrics(terms, setup, params)
  assert float(m["aux_ce"]) > 1.0
  np.testing.assert_allclose(float(loss), float(m["nelbo"] + 0.5 * m["aux_ce"]), rtol=1e-5)


def test_plaid_block_and_wide_embeddings_train():
  params, losses, _ = _run_steps((1, 1, 1), num_steps=2, **{"model.block": "plaid", "model.embed_dim": 768})
  blocks = params["denoiser"]["blocks"]
  assert "rms1" in blocks and "adaln_w" not in blocks and "mlp_b1" not in blocks
  assert params["embedding"]["table"].shape[-1] == 768 and np.isfinite(losses).all()


# ---- FLOP accounting.


@pytest.mark.parametrize("name", ["replaid", "ar", "mdlm", "duo", "replaid+input_posterior"])
def test_xla_forward_flops_agree_with_the_analytic_count(name):
  cd = demo.get_config()
  cd.objective = name.split("+")[0]
  cd.model.input_posterior = name.endswith("+input_posterior")
  cd.model.vocab_size = 512
  c = config_lib.from_config_dict(cd)
  obj = objectives.make(c)
  params = obj.abstract().shapes
  analytic = flops.config_forward_flops(c, token_input=obj.token_input)
  measured = flops.xla_forward_flops(obj, params, c.data.seq_len)
  assert abs(measured / analytic - 1) < 0.10, (measured, analytic)
  assert flops.steps_for_budget(1e15, analytic, 32) == int(1e15 // (3 * analytic * 32))


# ---- one train binary, one eval schema, and the AR model as a judge.


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("objectives")
  finals = {}
  for name in ("replaid", "ar", "mdlm", "duo"):
    cd = tiny.get_config()
    cd.objective = name
    cd.train.num_steps = 3
    cd.data.cache_dir = str(root / "tokenizer")
    finals[name] = loop.train_and_evaluate(cd, str(root / name))
  return root, finals


@pytest.mark.slow
def test_every_objective_trains_through_one_loop_with_one_result_schema(trained_runs):
  root, finals = trained_runs
  keys = {name: set(json.loads((root / name / "eval" / "final.json").read_text())) for name in finals}
  assert keys["ar"] == keys["replaid"] == keys["mdlm"] == keys["duo"]
  assert finals["ar"]["diffusion"] == 0 and finals["ar"]["recon"] > 0
  for name in ("mdlm", "duo"):
    assert finals[name]["recon"] == 0 and finals[name]["diffusion"] > 0
  for name in finals:
    assert finals[name]["objective"] == name and np.isfinite(finals[name]["nats_per_token"])
  results = {name: eval_run.evaluate_checkpoint(str(root / name), overrides={"eval.max_batches": 1}, timing=False)
             for name in ("replaid", "ar", "duo")}
  assert set(results["ar"]) == set(results["replaid"]) == set(results["duo"])
  assert results["ar"]["protocol"]["objective"] == "ar"


@pytest.mark.slow
def test_an_ar_run_judges_text_with_its_exact_nll(trained_runs):
  root, _ = trained_runs
  judge = perplexity.load(f"ar:{root / 'ar'}", batch_size=2)
  text = "ROMEO: But soft, what light through yonder window breaks?"
  (total, count), = judge.score([text])
  ids = np.asarray(judge.tokenizer.encode(text), np.int32)
  assert count == ids.size
  nll = judge.objective.nll(judge.params, jnp.asarray(ids[None]))
  np.testing.assert_allclose(total, float(jnp.sum(nll)), rtol=1e-4)
  res = perplexity.generative_perplexity(judge, [text])
  np.testing.assert_allclose(res["gen_ppl"], np.exp(total / count), rtol=1e-9)


@pytest.mark.slow
def test_every_objective_samples_through_the_one_cli_path_with_its_prompt_held(trained_runs, tmp_path):
  """sample_checkpoint asks each objective to `generate`: the prompt's tokens come back where they were put,
  the settings record is the objective's own, and a prompt a sampler cannot honour is refused by name."""
  from replaid_jax import errors  # pylint: disable=g-import-not-at-top
  from replaid_jax.sample import run as sample_run  # pylint: disable=g-import-not-at-top
  root, _ = trained_runs
  base_over = {"num_samples": 3, "batch_size": 2, "steps": 4, "print_samples": 0, "progress": False}
  for name in ("replaid", "ar", "mdlm", "duo"):
    prompt = {"prefix": "ROMEO:"} if name == "ar" else {"prefix": "ROMEO:", "suffix": "night.", "condition": "clamp"}
    out = tmp_path / f"{name}.jsonl"
    summary = sample_run.sample_checkpoint(str(root / name), overrides={**base_over, **prompt}, output=str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and summary["objective"] == name
    assert all(r["text"].startswith("ROMEO:") for r in rows), [r["text"] for r in rows]
    if "suffix" in prompt:
      assert all(r["text"].rstrip().endswith("night.") for r in rows), [r["text"] for r in rows]
    assert summary["sampler"]["sampler"] == ("ddpm" if name == "replaid" else f"{name} ancestral")
    assert summary["sampler"]["steps"] == (summary["sampler"]["seq_len"] if name == "ar" else 4)
  with pytest.raises(errors.ConfigError, match="cannot condition on a suffix"):
    sample_run.sample_checkpoint(str(root / "ar"), overrides={**base_over, "suffix": "night."})
  with pytest.raises(errors.ConfigError, match="objective is 'mdlm'"):
    sample_run.sample_checkpoint(str(root / "mdlm"), overrides={**base_over, "constraints": "love"})


@pytest.mark.slow
def test_curves_are_refused_for_a_baseline_checkpoint(trained_runs):
  root, _ = trained_runs
  from replaid_jax import errors  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError, match="objective='ar'"):
    eval_run.evaluate_checkpoint(str(root / "ar"), analyses=("bound", "curves"), timing=False)


@pytest.mark.parametrize("size, table", [("66M", 2.858e11), ("231M", 8.292e11), ("1233M", 4.026e12)])
def test_the_count_without_attention_products_matches_the_protocol_size_table(size, table):
  from configs import slimpajama  # pylint: disable=g-import-not-at-top
  width, layers, _ = slimpajama.SIZES[size]
  ours = flops.forward_flops_per_sequence(seq_len=2048, width=width, num_layers=layers, vocab_size=32001,
                                          embed_dim=16, token_input=True, include_attention=False)
  assert abs(ours / table - 1) < 0.01, (ours, table)
  with_attention = flops.forward_flops_per_sequence(seq_len=2048, width=width, num_layers=layers, vocab_size=32001,
                                                    embed_dim=16, token_input=True)
  np.testing.assert_allclose(with_attention - ours, layers * 4 * 2048**2 * width)
