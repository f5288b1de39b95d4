"""What the discrete-diffusion baselines (MDLM, Duo) share: a token-table DiT conditioned on t, one
low-discrepancy time lattice, a continuous-time NELBO reported in `diffusion`, and an ancestral sampler.

A subclass says how a lattice fraction f in [0, 1) maps to a time (`time_of`),
what the NELBO integrand of a row is at a time with fresh corruption
(`draw_terms`), how it trains (`loss_and_grads`) and how it samples
(`sample_traced`).
"""

import dataclasses

import jax
import jax.numpy as jnp

from replaid_jax.diffusion import time_sampling
from replaid_jax.objectives import base
from replaid_jax.objectives import token_model


@dataclasses.dataclass(frozen=True)
class DiscreteDiffusion(base.Objective):
  token_input = True

  def time_of(self, f: jax.Array) -> jax.Array:
    """The time of lattice fraction f in [0, 1)."""
    raise NotImplementedError

  def draw_terms(self, params: dict, tokens_BL: jax.Array, t_B: jax.Array, key: jax.Array) -> jax.Array:
    """The NELBO integrand per row (nats/token) at times t_B, corrupting the tokens with `key`."""
    raise NotImplementedError

  def init(self, key, output_bias):
    return token_model.init(key, self.c.model, output_bias, causal=False)

  def abstract(self):
    return token_model.abstract(token_model.config(self.c.model, causal=False))

  def logits(self, params: dict, z_BL: jax.Array, t_B: jax.Array, *, unroll: bool = False) -> jax.Array:
    return token_model.logits(params, z_BL, t_B, self.c.model, causal=False, unroll=unroll)

  def setup(self, state, batch, key):
    """One lattice over the global batch: row b gets the time of (b + u)/B, with one u ~ U(0, 1) per step."""
    u = jax.random.uniform(key, (), jnp.float32)
    return base.RowSetup(self.time_of(time_sampling.low_discrepancy(u, batch)),
                         jnp.asarray(batch, jnp.float32))

  def metrics(self, terms, setup, params):
    return {"nelbo": jnp.sum(terms.diffusion) / setup.n_rows}

  def sequence_bound(self, params, tokens_BL, key, *, num_times):
    """K draws per sequence at the times of (k + u)/K, k = 0..K-1, one u per sequence; their mean."""
    batch = tokens_BL.shape[0]
    k_u, k_draw = jax.random.split(key)
    u_B = jax.random.uniform(k_u, (batch,), jnp.float32)

    def one_time(total, k):
      t_B = self.time_of(time_sampling.lattice(k, u_B, num_times))
      return total + self.draw_terms(params, tokens_BL, t_B, jax.random.fold_in(k_draw, k)), None

    total, _ = jax.lax.scan(one_time, jnp.zeros((batch,), jnp.float32), jnp.arange(num_times))
    return base.zero_terms(total, diffusion=total / num_times)

  def forward_passes(self, num_times: int) -> int:
    return num_times

  def sample(self, params, key, *, num_samples, seq_len, num_steps=0, known_BL=None, known_mask_BL=None,
             temperature: float = 1.0):
    return base.jit_sample(self, params, key, num_samples=num_samples, seq_len=seq_len, num_steps=num_steps,
                           known_BL=known_BL, known_mask_BL=known_mask_BL, temperature=temperature)

  def forward(self, params, tokens_BL, *, unroll=False):
    return self.logits(params, tokens_BL, jnp.full((tokens_BL.shape[0],), 0.5, jnp.float32), unroll=unroll)
