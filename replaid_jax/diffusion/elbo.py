"""The continuous-time VDM ELBO on learned embeddings, and its gradient rule.

Per sequence x with embeddings e = xE (nats per token):

  -log p(x) <= L_recon + L_diff + L_prior

  (1) L_recon = E_{z_0} mean_l -log softmax(logits(z_0, gamma_0))_l[x_l]
  (2) L_prior = mean_l KL(N(alpha_1 e_l, sigma_1^2 I) || N(0, I))
              = mean_l 1/2 [-d log sigma_1^2 - d alpha_1^2 + alpha_1^2 ||e_l||^2]
  (3) L_diff  = E_{t, z_t} 1/2 exp(-gamma_t) gamma'_t mean_l ||e_l - x_hat_l(z_t)||^2
              (= -1/2 SNR'(t) ||e - x_hat||^2, SNR = exp(-gamma))

Training rows are split by a `Plan`: reconstruction rows (t = 0) give (1),
diffusion rows give (3) at lattice times, every row gives (2). Self-conditioned
rows first run the network without gradient, then condition on its estimate;
their gamma, gamma', e and the E inside the output prior and x_hat are detached,
so embeddings and schedule learn from the other rows only.

Gradient rule: everything follows d E[loss]; the schedule's interior gamma~
follows d E_diff[l^2] (its shape does not change E[loss], so it is trained to
lower the estimator's variance). `loss_and_grads` does this with two VJPs.
With `schedule_variance="within_time"` (a study switch) the interior follows
d E_diff[(l - b(t))^2] instead, b(t) a stop-gradient estimate of E[l | t] from
the rows at neighbouring lattice times (`time_baseline`): the variance left
when every row sits in its own lattice cell, which is the training estimator's.
"""

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from replaid_jax.diffusion import time_sampling
from replaid_jax.models import embedding
from replaid_jax.models import model as model_lib
from replaid_jax.models import noise_schedule

sg = jax.lax.stop_gradient

RECON_SPLITS = ("adaptive", "fixed")
# What the schedule's interior minimises: E[l^2] (VDM, Plaid) or E[(l - E[l | t])^2] (the lattice's variance).
SCHEDULE_VARIANCES = ("second_moment", "within_time")
BASELINE_CELLS = 2.5  # time_baseline: rows within this many lattice cells of a row give its baseline


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """The `diffusion` config section."""

  gamma_0: float
  gamma_1: float
  schedule: str
  learn_bounds: bool
  selfcond_fraction: float
  output_prior: bool
  output_prior_warmup_steps: int
  recon_split: str
  recon_fraction: float
  loss_stats_decay: float
  learn_embeddings: bool
  aux_ce_weight: float
  mdlm_train_loss: str
  antithetic_noise: bool
  schedule_variance: str = "second_moment"


@flax.struct.dataclass
class Terms:
  """Per-example ELBO terms, nats/token; zero where a row does not estimate a term."""

  recon: jax.Array  # [B]
  diffusion: jax.Array  # [B]
  prior: jax.Array  # [B]
  is_recon: jax.Array  # [B] bool
  aux_ce: Any = None  # [B] token CE of the denoiser on diffusion rows (training only, when aux_ce_weight > 0)


@flax.struct.dataclass
class Weights:
  """Estimator weights: loss = sum(recon)/n_recon + sum(diffusion)/n_diff + sum(prior)/n_rows."""

  n_recon: jax.Array
  n_diff: jax.Array
  n_rows: jax.Array


def antithetic_normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Standard normal rows [eps; -eps]: the second half of the rows is the first half negated.

  Every row is marginally N(0, I), so each row's term keeps its expectation; a pair's
  terms cancel in what is odd in eps (the first-order part of the loss at low noise).
  """
  if shape[0] % 2:
    raise ValueError(f"antithetic noise needs an even number of rows, got {shape[0]}")
  eps = jax.random.normal(key, (shape[0] // 2,) + tuple(shape[1:]), jnp.float32)
  return jnp.concatenate([eps, -eps], axis=0)


def prior_scale(cfg: DiffusionConfig, step: jax.Array) -> jax.Array:
  """Output-prior scale lambda: linear warm-up from 0 to 1 (1 at eval and sampling)."""
  if cfg.output_prior_warmup_steps <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(1.0, step.astype(jnp.float32) / cfg.output_prior_warmup_steps)


def prior_kl(gamma_1: jax.Array, e_BLE: jax.Array) -> jax.Array:
  """(2): mean over positions of KL(N(alpha_1 e, sigma_1^2 I) || N(0, I)); [B]."""
  d = e_BLE.shape[-1]
  g1 = gamma_1[:, None]
  alpha2, _ = noise_schedule.alpha_sigma2(g1)
  kl = 0.5 * (-d * jax.nn.log_sigmoid(g1) - d * alpha2 + alpha2 * jnp.sum(jnp.square(e_BLE), -1))
  return jnp.mean(kl, axis=-1)


def _rows_where(mask_B: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.where(mask_B.reshape(mask_B.shape + (1,) * (a.ndim - 1)), a, b)


def _selfcond_input(params, z, g, plan: time_sampling.Plan, *, model_cfg, pscale, use_prior):
  """x_sc: the no-gradient estimate x_hat(z_t, x_sc=0) on self-conditioned rows, 0 elsewhere."""
  if not plan.sc_period:
    return jnp.zeros_like(z)
  batch = z.shape[0]
  rows = plan.sc_offset + plan.sc_period * jnp.arange(batch // plan.sc_period)
  pick = lambda x: jnp.take(x, rows, axis=0)
  _, x_hat = model_lib.predict(
      sg(params), sg(pick(z)), sg(pick(g)), jnp.zeros_like(pick(z)),
      cfg=model_cfg, prior_scale=pscale, t_B=pick(plan.t), use_output_prior=use_prior,
  )
  return jnp.zeros_like(z).at[rows].set(sg(x_hat))


def per_example_terms(
    params: dict,
    gt_B: jax.Array,
    dgt_B: jax.Array,
    tokens_BL: jax.Array,
    plan: time_sampling.Plan,
    key: jax.Array,
    *,
    model_cfg: model_lib.ModelConfig,
    cfg: DiffusionConfig,
    pscale: jax.Array,
    noise: jax.Array | None = None,
) -> Terms:
  """ELBO terms per example, given gamma~(t) and gamma~'(t) for each row.

  `noise` [B, L, d_e] replaces the standard normal draw from `key` when given.
  """
  if plan.sc_period and tokens_BL.shape[0] % plan.sc_period:
    raise ValueError(f"batch {tokens_BL.shape[0]} is not a multiple of the self-conditioning period {plan.sc_period}")
  sc = plan.is_sc
  detach = lambda v: _rows_where(sc, sg(v), v)
  bounds = params["bounds"] if cfg.learn_bounds else sg(params["bounds"])

  g = detach(noise_schedule.gamma(bounds, gt_B))
  gp = detach(noise_schedule.gamma_prime(bounds, dgt_B))
  table = embedding.normalized(params["embedding"])
  e = detach(embedding.lookup(table, tokens_BL))

  alpha2, sigma2 = noise_schedule.alpha_sigma2(g)
  eps = jax.random.normal(key, e.shape, jnp.float32) if noise is None else noise
  z = jnp.sqrt(alpha2)[:, None, None] * e + jnp.sqrt(sigma2)[:, None, None] * eps

  x_sc = _selfcond_input(params, z, g, plan, model_cfg=model_cfg, pscale=pscale, use_prior=cfg.output_prior)
  logits, x_hat = model_lib.predict(
      params, z, g, x_sc,
      cfg=model_cfg, prior_scale=pscale, t_B=plan.t, use_output_prior=cfg.output_prior,
      detach_embeddings_B=sc if plan.sc_period else None,
  )

  # (1) reconstruction: token cross-entropy of the denoiser at t = 0.
  logp = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.mean(jnp.take_along_axis(logp, tokens_BL[..., None], axis=-1)[..., 0], axis=-1)
  recon = jnp.where(plan.is_recon, ce, 0.0)

  # (2) prior: KL at t = 1, every row.
  prior = prior_kl(detach(jnp.broadcast_to(bounds["gamma_1"], g.shape)), e)

  # (3) diffusion: -1/2 SNR'(t) ||e - x_hat||^2, continuous time.
  sq_err = jnp.mean(jnp.sum(jnp.square(e - x_hat), axis=-1), axis=-1)
  diffusion = jnp.where(plan.is_recon, 0.0, 0.5 * jnp.exp(-g) * gp * sq_err)
  aux = jnp.where(plan.is_recon, 0.0, ce) if cfg.aux_ce_weight > 0 else None
  return Terms(recon=recon, diffusion=diffusion, prior=prior, is_recon=plan.is_recon, aux_ce=aux)


def weighted_loss(terms: Terms, w: Weights, aux_ce_weight: float = 0.0) -> jax.Array:
  """The step's NELBO estimate in nats/token (unbiased for the batch's mean bound).

  With `aux_ce_weight` > 0 (an ablation) the diffusion rows' token cross-entropy
  is added with that weight; the result is then a training loss, not a bound.
  """
  nelbo = jnp.sum(terms.recon) / w.n_recon + jnp.sum(terms.diffusion) / w.n_diff + jnp.sum(terms.prior) / w.n_rows
  if aux_ce_weight > 0 and terms.aux_ce is not None:
    nelbo = nelbo + aux_ce_weight * jnp.sum(terms.aux_ce) / w.n_diff
  return nelbo


def time_baseline(t_B: jax.Array, loss_B: jax.Array, use_B: jax.Array, n_cells: jax.Array) -> jax.Array:
  """b_i: the mean of loss_j over the other rows j with use_j and |t_j - t_i| <= BASELINE_CELLS / n_cells.

  An estimate of E[loss | t_i] that does not use row i's own draw (0 where no such row exists); `n_cells` is
  the lattice's number of cells, so about 2 BASELINE_CELLS rows of the lattice are candidates.
  """
  near = jnp.abs(t_B[:, None] - t_B[None, :]) <= BASELINE_CELLS / n_cells
  near = near & use_B[None, :] & ~jnp.eye(t_B.shape[0], dtype=bool)
  count = jnp.sum(near, axis=1)
  return jnp.where(count > 0, jnp.sum(jnp.where(near, loss_B[None, :], 0.0), axis=1) / jnp.maximum(count, 1), 0.0)


def loss_and_grads(
    params: dict,
    tokens_BL: jax.Array,
    plan: time_sampling.Plan,
    key: jax.Array,
    weights: Weights,
    *,
    model_cfg: model_lib.ModelConfig,
    cfg: DiffusionConfig,
    pscale: jax.Array,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, Terms, dict]:
  """(loss, per-example terms, gradients) under the gradient rule of the module docstring.

  The Gaussians are `noise` [B, L, d_e] when given, else drawn from `key`: with
  `cfg.antithetic_noise` as `antithetic_normal` (rows B/2.. negate rows ..B/2).

  1. gamma~(t_i), gamma~'(t_i) and their VJP in the schedule parameters phi;
  2. one VJP of the weighted loss in everything else and in those values;
  3. the per-row cotangents on gamma~ are multiplied by 2 l_i (l_i that row's
     diffusion loss), turning d E[l] into d E[l^2] for phi alone, and pulled
     back through step 1; with `cfg.schedule_variance="within_time"` by
     2 (l_i - b_i) (`time_baseline` over the diffusion rows that are not
     self-conditioned), giving d E[(l - b)^2] with b held fixed.

  With the auxiliary CE ablation on, the cotangents of step 3 include the CE
  term's dependence on gamma~, scaled the same way.
  """
  sched = params["schedule"]
  rest = {k: v for k, v in params.items() if k != "schedule"}
  (gt, dgt), sched_vjp = jax.vjp(
      lambda s: noise_schedule.gamma_tilde_and_deriv(s, plan.t, cfg.schedule), sched
  )

  if noise is None and cfg.antithetic_noise:
    noise = antithetic_normal(key, tokens_BL.shape + (model_cfg.embed_dim,))

  def objective(rest, gt, dgt):
    terms = per_example_terms(
        {**rest, "schedule": sg(sched)}, gt, dgt, tokens_BL, plan, key,
        model_cfg=model_cfg, cfg=cfg, pscale=pscale, noise=noise,
    )
    return weighted_loss(terms, weights, cfg.aux_ce_weight), terms

  loss, f_vjp, terms = jax.vjp(objective, rest, gt, dgt, has_aux=True)
  g_rest, g_gt, g_dgt = f_vjp(jnp.ones_like(loss))
  row_scale = 2.0 * sg(terms.diffusion)
  if cfg.schedule_variance == "within_time":
    use = ~plan.is_recon & ~plan.is_sc
    row_scale = row_scale - 2.0 * time_baseline(plan.t, sg(terms.diffusion), use, weights.n_diff)
  (g_sched,) = sched_vjp((g_gt * row_scale, g_dgt * row_scale))
  return loss, terms, {**g_rest, "schedule": g_sched}


def sequence_bound(
    params: dict,
    tokens_BL: jax.Array,
    key: jax.Array,
    *,
    num_times: int,
    model_cfg: model_lib.ModelConfig,
    cfg: DiffusionConfig,
) -> Terms:
  """An unbiased bound per sequence: its own t = 0 pass, K lattice times, the prior.

  Self-conditioning on every pass and the full output prior, as at sampling.
  `Terms.diffusion` is the mean over the K times.
  """
  batch = tokens_BL.shape[0]
  one = jnp.ones((), jnp.float32)
  k_recon, k_u, k_noise = jax.random.split(key, 3)

  def terms_at(t_B, recon, k):
    gt, dgt = noise_schedule.gamma_tilde_and_deriv(params["schedule"], t_B, cfg.schedule)
    plan = time_sampling.eval_plan(t_B, recon=recon)
    return per_example_terms(params, gt, dgt, tokens_BL, plan, k, model_cfg=model_cfg, cfg=cfg, pscale=one)

  base = terms_at(jnp.zeros((batch,), jnp.float32), True, k_recon)
  u_B = jax.random.uniform(k_u, (batch,), jnp.float32)

  def one_time(total, k):
    t_B = time_sampling.lattice(k, u_B, num_times)
    return total + terms_at(t_B, False, jax.random.fold_in(k_noise, k)).diffusion, None

  diff_sum, _ = jax.lax.scan(one_time, jnp.zeros((batch,), jnp.float32), jnp.arange(num_times))
  return Terms(recon=base.recon, diffusion=diff_sum / num_times, prior=base.prior, is_recon=base.is_recon)
