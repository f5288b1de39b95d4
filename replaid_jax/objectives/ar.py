"""The autoregressive baseline: the same DiT with causal attention, trained and evaluated on the exact NLL.

Position l predicts x_l from BOS, x_0..x_{l-1}: the inputs are the sequence
shifted right behind a BOS id, so every one of the L tokens is scored, as in
the diffusion models' bounds. The adaLN conditioning is fixed at 0.
"""

import dataclasses

import jax
import jax.numpy as jnp

from replaid_jax import errors
from replaid_jax.objectives import base
from replaid_jax.objectives import token_model


def shift_right(tokens_BL: jax.Array, bos: int) -> jax.Array:
  return jnp.concatenate([jnp.full_like(tokens_BL[:, :1], bos), tokens_BL[:, :-1]], axis=1)


@dataclasses.dataclass(frozen=True)
class AR(base.Objective):
  name = "ar"
  autoregressive = True
  token_input = True

  def init(self, key, output_bias):
    return token_model.init(key, self.c.model, output_bias, causal=True)

  def abstract(self):
    return token_model.abstract(token_model.config(self.c.model, causal=True))

  def logits(self, params, tokens_BL):
    bos = token_model.extra_id(self.c.model.vocab_size)
    cond = jnp.zeros((tokens_BL.shape[0],), jnp.float32)
    return token_model.logits(params, shift_right(tokens_BL, bos), cond, self.c.model, causal=True)

  def nll(self, params, tokens_BL):
    """Exact -log p(x_l | x_<l) per position, [B, L]."""
    return token_model.token_nll(self.logits(params, tokens_BL), tokens_BL)

  def loss_and_grads(self, params, tokens_BL, setup, key):
    def loss_fn(p):
      per_row = jnp.mean(self.nll(p, tokens_BL), axis=-1)
      return jnp.sum(per_row) / setup.n_rows, per_row

    (loss, per_row), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, base.zero_terms(per_row, recon=per_row), grads

  def metrics(self, terms, setup, params):
    return {"nll": jnp.sum(terms.recon) / setup.n_rows}

  def sequence_bound(self, params, tokens_BL, key, *, num_times):
    per_row = jnp.mean(self.nll(params, tokens_BL), axis=-1)
    return base.zero_terms(per_row, recon=per_row)

  def forward_passes(self, num_times: int) -> int:
    return 1  # one causal pass gives every position's exact conditional

  def check_prompt(self, s, *, has_suffix: bool) -> None:
    super().check_prompt(s, has_suffix=has_suffix)
    if has_suffix:
      raise errors.ConfigError("an autoregressive model cannot condition on a suffix; clear sample.suffix (use an "
                               "mdlm, duo or replaid checkpoint for infilling).")

  def sampler_record(self, s, seq_len: int) -> dict:
    return {**super().sampler_record(s, seq_len), "steps": seq_len}  # one step per token

  def sample(self, params, key, *, num_samples, seq_len, num_steps=0, known_BL=None, known_mask_BL=None,
             temperature: float = 1.0):
    return base.jit_sample(self, params, key, num_samples=num_samples, seq_len=seq_len, num_steps=num_steps,
                           known_BL=known_BL, known_mask_BL=known_mask_BL, temperature=temperature)

  def sample_traced(self, params, key, *, num_samples, seq_len, num_steps=0, known_BL=None, known_mask_BL=None,
                    temperature: float = 1.0):
    """Ancestral sampling, one token per full causal forward pass; known positions are teacher-forced.

    Sample i draws from fold_in(key, i), so it does not depend on the batch.
    """
    del num_steps
    bos = token_model.extra_id(self.c.model.vocab_size)
    if known_BL is None:
      known_BL = jnp.zeros((num_samples, seq_len), jnp.int32)
      known_mask_BL = jnp.zeros((num_samples, seq_len), bool)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_samples))
    cond = jnp.zeros((num_samples,), jnp.float32)

    def body(pos, x_BL):
      logits = token_model.logits(params, shift_right(x_BL, bos), cond, self.c.model, causal=True)[:, pos]
      draw = jax.vmap(lambda k, lg: jax.random.categorical(jax.random.fold_in(k, pos), lg / temperature))(
          keys, logits)
      tok = jnp.where(known_mask_BL[:, pos], known_BL[:, pos], draw)
      return x_BL.at[:, pos].set(tok.astype(jnp.int32))

    return jax.lax.fori_loop(0, seq_len, body, jnp.where(known_mask_BL, known_BL, 0).astype(jnp.int32))

  def forward(self, params, tokens_BL, *, unroll=False):
    cond = jnp.zeros((tokens_BL.shape[0],), jnp.float32)
    return token_model.logits(params, tokens_BL, cond, self.c.model, causal=True, unroll=unroll)

  def bound_protocol(self, num_times):
    return {"num_times": 0, "estimator": "exact NLL: sum over positions of -log p(x_l | BOS, x_<l), one causal pass"}
