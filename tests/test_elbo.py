"""The ELBO terms against independent computations, and the gradient rules against autodiff."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from replaid_jax.diffusion import elbo
from replaid_jax.diffusion import sampler
from replaid_jax.diffusion import time_sampling
from replaid_jax.models import embedding
from replaid_jax.models import model as model_lib
from replaid_jax.models import noise_schedule

from conftest import TINY_DIFFUSION, TINY_MODEL, perturbed_params, replace

B, L = 8, 6
NO_SC = replace(TINY_DIFFUSION, selfcond_fraction=0.0)


def _schedule_values(params, t, cfg=TINY_DIFFUSION):
  return noise_schedule.gamma_tilde_and_deriv(params["schedule"], t, cfg.schedule)


def _tokens(key, batch=B, length=L):
  return jax.random.randint(key, (batch, length), 0, TINY_MODEL.vocab_size)


@pytest.fixture(scope="module")
def params():
  return perturbed_params(jax.random.key(0))


def test_prior_term_is_the_gaussian_kl_at_t1(params):
  tokens = _tokens(jax.random.key(1))
  t = jnp.ones((B,))
  plan = time_sampling.eval_plan(t, recon=False)
  plan = plan.replace(is_sc=jnp.zeros((B,), bool), sc_period=0)
  gt, dgt = _schedule_values(params, t)
  terms = elbo.per_example_terms(params, gt, dgt, tokens, plan, jax.random.key(2), model_cfg=TINY_MODEL,
                                 cfg=NO_SC, pscale=1.0)
  e = np.asarray(embedding.lookup(embedding.normalized(params["embedding"]), tokens), np.float64)
  g1 = float(params["bounds"]["gamma_1"])
  a2, s2 = 1 / (1 + np.exp(g1)), 1 / (1 + np.exp(-g1))
  mu = np.sqrt(a2) * e
  kl = 0.5 * np.sum(s2 + mu**2 - 1.0 - np.log(s2), axis=-1)  # KL(N(mu, s2 I) || N(0, I)) per position
  np.testing.assert_allclose(terms.prior, kl.mean(-1), rtol=1e-4)


def test_reconstruction_term_is_the_cross_entropy_at_gamma0(params):
  tokens = _tokens(jax.random.key(3))
  t = jnp.zeros((B,))
  plan = time_sampling.eval_plan(t, recon=True).replace(is_sc=jnp.zeros((B,), bool), sc_period=0)
  noise = jax.random.normal(jax.random.key(4), (B, L, TINY_MODEL.embed_dim))
  gt, dgt = _schedule_values(params, t)
  terms = elbo.per_example_terms(params, gt, dgt, tokens, plan, jax.random.key(0), model_cfg=TINY_MODEL,
                                 cfg=NO_SC, pscale=1.0, noise=noise)
  g0 = params["bounds"]["gamma_0"]
  e = embedding.lookup(embedding.normalized(params["embedding"]), tokens)
  z0 = jnp.sqrt(jax.nn.sigmoid(-g0)) * e + jnp.sqrt(jax.nn.sigmoid(g0)) * noise
  g = jnp.full((B,), g0)
  logits, _ = model_lib.predict(params, z0, g, jnp.zeros_like(z0), cfg=TINY_MODEL, prior_scale=1.0)
  logits = np.asarray(logits, np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  ce = logz - np.take_along_axis(logits, np.asarray(tokens)[..., None], -1)[..., 0]
  np.testing.assert_allclose(terms.recon, ce.mean(-1), rtol=1e-5)
  np.testing.assert_array_equal(terms.diffusion, 0.0)


def test_diffusion_term_integrates_to_the_discrete_time_kl_sum(params):
  """Brute force: for one fixed noise draw, sum_i KL(q(z_s|z_t,x) || q(z_s|z_t,x_hat)) over T = 4000 steps
  (VDM's discrete-time loss, from the posterior formulas) equals the integral over t of the
  continuous-time term, by the midpoint rule on 4000 points."""
  tokens = _tokens(jax.random.key(5), batch=1)
  noise = jax.random.normal(jax.random.key(6), (1, L, TINY_MODEL.embed_dim))
  n = 4000
  # Continuous time: one row per midpoint, the same tokens and noise in every row.
  t_mid = (jnp.arange(n) + 0.5) / n
  plan = time_sampling.Plan(t_mid, jnp.zeros((n,), bool), jnp.zeros((n,), bool), jnp.zeros((), jnp.int32), 0)
  gt, dgt = _schedule_values(params, t_mid)
  terms = jax.jit(functools.partial(elbo.per_example_terms, model_cfg=TINY_MODEL, cfg=NO_SC, pscale=1.0))(
      params, gt, dgt, jnp.repeat(tokens, n, 0), plan, jax.random.key(0), noise=jnp.repeat(noise, n, 0))
  continuous = float(np.mean(np.asarray(terms.diffusion, np.float64)))

  # Discrete time, float64: t_i = i/T, s = t - 1/T.
  gam = sampler.gamma_grid(jax.device_get(params), n, "learned")  # gamma(i/T), i = 0..T
  sig = lambda x: 1 / (1 + np.exp(-x))
  a2, s2 = sig(-gam), sig(gam)
  e = np.asarray(embedding.lookup(embedding.normalized(params["embedding"]), tokens), np.float64)[0]
  eps = np.asarray(noise, np.float64)[0]
  z_t = np.sqrt(a2[1:, None, None]) * e + np.sqrt(s2[1:, None, None]) * eps  # [T, L, d]
  g_t = jnp.asarray(gam[1:], jnp.float32)
  _, x_hat = jax.jit(functools.partial(model_lib.predict, cfg=TINY_MODEL, prior_scale=1.0))(
      params, jnp.asarray(z_t, jnp.float32), g_t, jnp.zeros(z_t.shape, jnp.float32))
  x_hat = np.asarray(x_hat, np.float64)
  at, as_ = np.sqrt(a2[1:]), np.sqrt(a2[:-1])
  st2, ss2 = s2[1:], s2[:-1]
  a_ts = at / as_
  s2_ts = st2 - a_ts**2 * ss2
  coef_e = as_ * s2_ts / st2  # weight of x in the posterior mean
  var = s2_ts * ss2 / st2
  kl = np.sum((coef_e[:, None, None] * (e - x_hat)) ** 2, -1) / (2 * var[:, None])  # [T, L]
  discrete = float(kl.mean(-1).sum())
  assert continuous > 0.1
  np.testing.assert_allclose(continuous, discrete, rtol=3e-3)


def test_low_discrepancy_lattice_puts_one_time_in_each_cell():
  for n in (1, 7, 64):
    for seed in range(3):
      u = jax.random.uniform(jax.random.key(seed), ())
      t = np.asarray(time_sampling.low_discrepancy(u, n))
      assert np.all((t >= 0) & (t < 1))
      np.testing.assert_array_equal(np.sort(np.floor(t * n)), np.arange(n))


def test_train_plan_lattice_covers_the_diffusion_rows_and_marks_selfcond_rows():
  batch = 32
  for n_recon in (1, 5, 31):
    plan = time_sampling.train_plan(jax.random.key(n_recon), batch, jnp.asarray(n_recon), 4)
    t = np.asarray(plan.t)
    assert np.all(t[:n_recon] == 0) and np.all(np.asarray(plan.is_recon) == (np.arange(batch) < n_recon))
    n_diff = batch - n_recon
    np.testing.assert_array_equal(np.sort(np.floor(t[n_recon:] * n_diff)), np.arange(n_diff))
    sc = np.asarray(plan.is_sc)
    assert sc.sum() == batch // 4 and np.all(np.flatnonzero(sc) % 4 == int(plan.sc_offset))


def test_time_lattice_with_many_steps_is_uniform_in_distribution():
  """Pooled over steps, lattice times pass a Kolmogorov-Smirnov check against U[0, 1)."""
  ts = np.concatenate([np.asarray(time_sampling.train_plan(jax.random.key(i), 16, jnp.asarray(3), 0).t[3:])
                       for i in range(200)])
  ts.sort()
  ks = np.max(np.abs(ts - (np.arange(ts.size) + 0.5) / ts.size))
  assert ks < 0.02


def _mixed_plan(batch=B, n_recon=2):
  return time_sampling.train_plan(jax.random.key(11), batch, jnp.asarray(n_recon), 4)


def _weights(plan):
  n_r = jnp.sum(plan.is_recon).astype(jnp.float32)
  return elbo.Weights(n_r, plan.t.shape[0] - n_r, jnp.float32(plan.t.shape[0]))


def test_gradients_follow_the_stated_objectives(params):
  """Schedule interior: grad of E_diff[l^2]; everything else: grad of E[loss] (plain autodiff)."""
  tokens = _tokens(jax.random.key(12))
  plan = _mixed_plan()
  w = _weights(plan)
  key = jax.random.key(13)
  kw = dict(model_cfg=TINY_MODEL, cfg=TINY_DIFFUSION, pscale=jnp.float32(1.0))
  loss, terms, grads = jax.jit(lambda p: elbo.loss_and_grads(p, tokens, plan, key, w, **kw))(params)

  def terms_of(p):
    gt, dgt = _schedule_values(p, plan.t)
    return elbo.per_example_terms(p, gt, dgt, tokens, plan, key, **kw)

  mean_loss = lambda p: elbo.weighted_loss(terms_of(p), w)
  n_diff = jnp.sum(~plan.is_recon)
  mean_sq = lambda p: jnp.sum(jnp.where(plan.is_recon, 0.0, terms_of(p).diffusion ** 2)) / n_diff

  ref_loss, ref = jax.jit(jax.value_and_grad(mean_loss))(params)
  ref_sched = jax.jit(jax.grad(mean_sq))(params)["schedule"]
  np.testing.assert_allclose(loss, ref_loss, rtol=3e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(b))))
  for name in ("denoiser", "embedding", "bounds"):
    jax.tree.map(close, grads[name], ref[name])
  jax.tree.map(close, grads["schedule"], ref_sched)
  # The two objectives really differ for the schedule: the rule is not a no-op.
  rel = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))), grads["schedule"],
                     ref["schedule"])
  assert min(jax.tree.leaves(rel)) > 0.1


def test_within_time_schedule_rule_is_the_gradient_of_the_squared_deviation_from_the_neighbours_mean(params):
  """schedule_variance="within_time": the interior follows d/dphi mean_diff (l_i - b_i)^2 with b_i held fixed, b_i
  the mean loss of the other non-self-conditioned diffusion rows within 2.5 lattice cells (brute force here);
  every other group keeps the gradient of E[loss]."""
  batch = 16
  tokens = _tokens(jax.random.key(21), batch=batch)
  plan = _mixed_plan(batch=batch)
  w = _weights(plan)
  key = jax.random.key(22)
  wt = replace(TINY_DIFFUSION, schedule_variance="within_time")
  run = lambda cfg: jax.jit(lambda p: elbo.loss_and_grads(p, tokens, plan, key, w, model_cfg=TINY_MODEL, cfg=cfg,
                                                            pscale=jnp.float32(1.0)))(params)
  loss, terms, grads = run(wt)
  loss_m2, _, grads_m2 = run(TINY_DIFFUSION)

  t, l = np.asarray(plan.t, np.float64), np.asarray(terms.diffusion, np.float64)
  use = ~np.asarray(plan.is_recon) & ~np.asarray(plan.is_sc)
  n_diff = float(w.n_diff)
  b = np.zeros(batch)
  for i in range(batch):
    others = [l[j] for j in range(batch) if j != i and use[j] and abs(t[j] - t[i]) <= 2.5 / n_diff]
    b[i] = np.mean(others) if others else 0.0
  assert np.sum(use) >= 8 and np.all(b[use] > 0)  # every scheduled row has neighbours: the rule is exercised
  np.testing.assert_allclose(elbo.time_baseline(plan.t, terms.diffusion, jnp.asarray(use), w.n_diff), b, rtol=1e-5)

  def dev_sq(p):
    gt, dgt = _schedule_values(p, plan.t)
    d = elbo.per_example_terms(p, gt, dgt, tokens, plan, key, model_cfg=TINY_MODEL, cfg=wt,
                               pscale=jnp.float32(1.0)).diffusion
    return jnp.sum(jnp.where(plan.is_recon, 0.0, (d - jnp.asarray(b, jnp.float32)) ** 2)) / n_diff

  ref_sched = jax.jit(jax.grad(dev_sq))(params)["schedule"]
  close = lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(r))))
  jax.tree.map(close, grads["schedule"], ref_sched)
  np.testing.assert_allclose(loss, loss_m2, rtol=1e-6)
  for name in ("denoiser", "embedding", "bounds"):
    jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-6, atol=1e-9), grads[name], grads_m2[name])
  # The baseline changes the schedule's gradient: the two rules differ.
  rel = jax.tree.map(lambda a, r: float(jnp.max(jnp.abs(a - r)) / jnp.max(jnp.abs(r))), grads["schedule"],
                     grads_m2["schedule"])
  assert max(jax.tree.leaves(rel)) > 0.1


def test_selfconditioned_rows_send_no_gradient_to_embeddings_schedule_or_bounds(params):
  tokens = _tokens(jax.random.key(14))
  key = jax.random.key(15)
  kw = dict(model_cfg=TINY_MODEL, cfg=TINY_DIFFUSION, pscale=jnp.float32(1.0))
  # All rows self-conditioned: those groups get exactly nothing, the backbone still learns.
  t = jnp.linspace(0.05, 0.95, B)
  plan = time_sampling.Plan(t, jnp.zeros((B,), bool), jnp.ones((B,), bool), jnp.zeros((), jnp.int32), 1)
  _, _, grads = elbo.loss_and_grads(params, tokens, plan, key, _weights(plan), **kw)
  for name in ("embedding", "schedule", "bounds"):
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads[name])), name
  assert float(jnp.max(jnp.abs(grads["denoiser"]["out_w"]))) > 0

  # Mixed batch: the embedding gradient is the one of the non-self-conditioned rows alone.
  plan = _mixed_plan()
  w = _weights(plan)
  _, _, grads = elbo.loss_and_grads(params, tokens, plan, key, w, **kw)

  def non_sc_loss(p):
    gt, dgt = _schedule_values(p, plan.t)
    terms = elbo.per_example_terms(p, gt, dgt, tokens, plan, key, **kw)
    keep = lambda x: jnp.where(plan.is_sc, 0.0, x)
    return elbo.weighted_loss(terms.replace(recon=keep(terms.recon), diffusion=keep(terms.diffusion),
                                            prior=keep(terms.prior)), w)

  ref = jax.jit(jax.grad(non_sc_loss))(params)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(b))))
  close(grads["embedding"]["table"], ref["embedding"]["table"])
  jax.tree.map(close, grads["bounds"], ref["bounds"])


def test_selfconditioning_feeds_the_first_pass_estimate(params):
  """Self-conditioned rows see x_sc = x_hat(z_t, 0); others see zeros."""
  tokens = _tokens(jax.random.key(16))
  plan = _mixed_plan()
  noise = jax.random.normal(jax.random.key(17), (B, L, TINY_MODEL.embed_dim))
  gt, dgt = _schedule_values(params, plan.t)
  kw = dict(model_cfg=TINY_MODEL, cfg=TINY_DIFFUSION, pscale=1.0)
  terms = elbo.per_example_terms(params, gt, dgt, tokens, plan, jax.random.key(0), noise=noise, **kw)
  no_sc = plan.replace(is_sc=jnp.zeros((B,), bool), sc_period=0)
  plain = elbo.per_example_terms(params, gt, dgt, tokens, no_sc, jax.random.key(0), noise=noise, **kw)
  sc = np.asarray(plan.is_sc)
  total = lambda tt: np.asarray(tt.recon + tt.diffusion)
  np.testing.assert_allclose(total(terms)[~sc], total(plain)[~sc], rtol=1e-5)
  assert np.all(np.abs(total(terms)[sc] - total(plain)[sc]) > 1e-7)


def test_frozen_bounds_and_fixed_schedule_get_no_gradient(params):
  tokens = _tokens(jax.random.key(18))
  plan = _mixed_plan()
  cfg = replace(TINY_DIFFUSION, schedule="linear_fixed", learn_bounds=False)
  _, _, grads = elbo.loss_and_grads(params, tokens, plan, jax.random.key(19), _weights(plan),
                                    model_cfg=TINY_MODEL, cfg=cfg, pscale=jnp.float32(1.0))
  for name in ("schedule", "bounds"):
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads[name])), name


def test_sequence_bound_is_unbiased_for_the_brute_force_time_integral(params):
  """K-lattice estimates averaged over many keys match a dense-quadrature estimate of the same bound."""
  tokens = _tokens(jax.random.key(20), batch=4)
  fn = jax.jit(functools.partial(elbo.sequence_bound, num_times=2, model_cfg=TINY_MODEL, cfg=TINY_DIFFUSION))
  fn64 = jax.jit(functools.partial(elbo.sequence_bound, num_times=64, model_cfg=TINY_MODEL, cfg=TINY_DIFFUSION))
  few = np.mean([np.asarray(fn(params, tokens, jax.random.key(i)).diffusion) for i in range(60)], axis=0)
  many = np.mean([np.asarray(fn64(params, tokens, jax.random.key(1000 + i)).diffusion) for i in range(8)], axis=0)
  spread = np.std([np.asarray(fn(params, tokens, jax.random.key(i)).diffusion) for i in range(60)], axis=0)
  np.testing.assert_array_less(np.abs(few - many), 4 * spread / np.sqrt(60) + 1e-3)
