"""RePlaid: Gaussian (VDM) diffusion on learned unit-norm embeddings (`diffusion/elbo.py`)."""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from replaid_jax.diffusion import elbo
from replaid_jax.diffusion import sampler
from replaid_jax.diffusion import time_sampling
from replaid_jax.models import embedding
from replaid_jax.models import model as model_lib
from replaid_jax.objectives import base


@flax.struct.dataclass
class Setup:
  plan: time_sampling.Plan
  weights: elbo.Weights
  pscale: jax.Array

  def micro(self, i, size: int) -> "Setup":
    return Setup(self.plan.micro(i, size), self.weights, self.pscale)


def recon_rows(stats, cfg: elbo.DiffusionConfig, batch: int) -> jax.Array:
  """Reconstruction rows this step: Neyman allocation n_r / B = std_r / (std_r + std_d)."""
  fixed = jnp.asarray(min(max(round(cfg.recon_fraction * batch), 1), batch - 1), jnp.int32)
  if cfg.recon_split == "fixed":
    return fixed
  std_r, std_d = stats.stds()
  share = std_r / jnp.maximum(std_r + std_d, 1e-12)
  adaptive = jnp.clip(jnp.round(batch * share), 1, batch - 1).astype(jnp.int32)
  return jnp.where(stats.weight > 0, adaptive, fixed)


@dataclasses.dataclass(frozen=True)
class RePlaid(base.Objective):
  name = "replaid"
  learned_embeddings = True
  self_conditions = True

  def init(self, key, output_bias):
    d = self.c.diffusion
    return model_lib.init(key, self.c.model, gamma_0=d.gamma_0, gamma_1=d.gamma_1, output_bias=output_bias)

  def abstract(self):
    return model_lib.abstract(self.c.model)

  def frozen_groups(self):
    d = self.c.diffusion
    frozen = []
    if d.schedule == "linear_fixed":
      frozen.append("schedule")
    if not d.learn_bounds:
      frozen.append("bounds")
    if not d.learn_embeddings:
      frozen.append("embedding")
    return tuple(frozen)

  def setup(self, state, batch, key):
    # With antithetic noise the rows come in pairs (r, r + B/2) that share a time and a role and draw
    # eps and -eps (`elbo.antithetic_normal`): one plan over B/2 rows, tiled twice.
    cfg = self.c.diffusion
    copies = 2 if cfg.antithetic_noise else 1
    n_recon = recon_rows(state.loss_stats, cfg, batch // copies)
    plan = time_sampling.train_plan(key, batch // copies, n_recon,
                                    time_sampling.selfcond_period(cfg.selfcond_fraction))
    if copies > 1:
      plan = plan.tiled(copies)
      n_recon = copies * n_recon
    weights = elbo.Weights(n_recon=n_recon.astype(jnp.float32), n_diff=(batch - n_recon).astype(jnp.float32),
                           n_rows=jnp.asarray(batch, jnp.float32))
    return Setup(plan, weights, elbo.prior_scale(cfg, state.step))

  def loss_and_grads(self, params, tokens_BL, setup, key):
    return elbo.loss_and_grads(params, tokens_BL, setup.plan, key, setup.weights, model_cfg=self.c.model,
                               cfg=self.c.diffusion, pscale=setup.pscale)

  def update_stats(self, stats, terms):
    return stats.update(terms, self.c.diffusion.loss_stats_decay)

  def metrics(self, terms, setup, params):
    w = setup.weights
    r = terms.is_recon.astype(jnp.float32)
    mean_diff = jnp.sum(terms.diffusion) / w.n_diff
    out = {
        "nelbo": jnp.sum(terms.recon) / w.n_recon + mean_diff + jnp.mean(terms.prior),
        "recon": jnp.sum(terms.recon) / w.n_recon,
        "diffusion": mean_diff,
        "prior": jnp.mean(terms.prior),
        "diffusion_std": jnp.sqrt(jnp.sum((1 - r) * (terms.diffusion - mean_diff) ** 2)
                                  / jnp.maximum(w.n_diff - 1, 1)),
        "gamma_0": params["bounds"]["gamma_0"],
        "gamma_1": params["bounds"]["gamma_1"],
        "recon_share": w.n_recon / w.n_rows,
        "prior_scale": setup.pscale,
    }
    if terms.aux_ce is not None:
      out["aux_ce"] = jnp.sum(terms.aux_ce) / w.n_diff
    return out

  def sequence_bound(self, params, tokens_BL, key, *, num_times):
    return elbo.sequence_bound(params, tokens_BL, key, num_times=num_times, model_cfg=self.c.model,
                               cfg=self.c.diffusion)

  def forward_passes(self, num_times: int) -> int:
    return 2 * (num_times + 1)  # a self-conditioning pass and the main pass per time, the recon row included

  def sample(self, params, key, *, num_samples, seq_len, num_steps, known_BL=None, known_mask_BL=None):
    if known_BL is not None:
      raise ValueError("conditional RePlaid sampling goes through `batch_sampler` (guidance and clamping).")
    return sampler.sample(params, key, num_samples=num_samples, seq_len=seq_len, num_steps=num_steps,
                          model_cfg=self.c.model, cfg=self.c.diffusion)

  reports_sampler_steps = True

  def check_prompt(self, s, *, has_suffix: bool) -> None:
    del s, has_suffix  # guidance and clamping take any prompt, word constraints included

  def sampler_record(self, s, seq_len: int) -> dict:
    keys = ("sampler", "steps", "time_grid", "score_temp", "selfcond", "condition", "guidance_weight", "prefix",
            "prefix_file", "suffix", "suffix_file", "gap", "constraints", "avoid")
    return {"seq_len": seq_len, **{k: getattr(s, k) for k in keys}}

  def denoiser(self) -> sampler.ModelDenoiser:
    """The model as the sampler calls it (output prior at full scale, as at eval)."""
    return sampler.ModelDenoiser(self.c.model, self.c.diffusion.output_prior)

  def batch_sampler(self, params, s):
    """The guided sampler (`diffusion/sampler.generate`) on the schedule's float64 grid, which is computed once
    with the normalised embeddings; one key for the run, each sample's noise from its id, so a sample does not
    depend on its batch."""
    host = jax.device_get({"schedule": params["schedule"], "bounds": params["bounds"]})
    t, gammas = sampler.schedule_grid(host, s.steps, self.c.diffusion.schedule, s.time_grid)
    table = jax.jit(embedding.normalized)(params["embedding"])
    denoiser = self.denoiser()

    def sample_batch(key, request):
      return sampler.generate(denoiser, params, key, sample_ids=request.sample_ids, seq_len=request.seq_len, t=t,
                              gammas=gammas, table=table, method=s.sampler, score_temp=s.score_temp,
                              selfcond=s.selfcond, cond=request.cond, batch_sharding=request.batch_sharding,
                              progress=request.progress)
    return sample_batch

  def forward(self, params, tokens_BL, *, unroll=False):
    b, l = tokens_BL.shape
    z = jnp.zeros((b, l, self.c.model.embed_dim), jnp.float32)
    g = jnp.zeros((b,), jnp.float32)
    # t = 0 beside gamma = 0 only serves t-conditioned models here: forward measures cost, not values.
    return model_lib.predict(params, z, g, z, cfg=self.c.model, prior_scale=1.0, t_B=g,
                             use_output_prior=self.c.diffusion.output_prior, unroll=unroll)[1]

  def bound_protocol(self, num_times):
    return {"num_times": num_times, "time_lattice": "t_k = (k + u) / K, k = 0..K-1, one u ~ U(0,1) per sequence",
            "self_conditioning": "every pass (100%): x_sc from a first pass at the same z_t",
            "output_prior_scale": 1.0, "reconstruction": "each sequence's own t = 0 pass",
            "prior": "closed form at t = 1"}
