"""Masked diffusion (MDLM): absorbing-state discrete diffusion with the SUBS parameterisation.

Forward process: each token is independently replaced by [MASK] with
probability t (alpha_t = 1 - t, linear), so x is intact at t = 0 and fully
masked at t = 1. The network sees the partly masked sequence and t, and
predicts the masked tokens (the [MASK] id is never predicted; unmasked
positions are carried over). Continuous-time NELBO per token:

  L = E_{t ~ U(0,1]} E_{z_t} (1/t) (1/L) sum_{l: z_l = MASK} -log p(x_l | z_t)

(the reconstruction term vanishes at alpha_0 = 1 and the prior term at
alpha_1 = 0). Training uses `diffusion.mdlm_train_loss`:
  "low_var"  the unweighted masked-token cross-entropy, normalised by
             L B / 2, the expected number of masked tokens (MDLM "low var.");
  "elbo"     the NELBO above.
Validation always reports the NELBO. Times come from one low-discrepancy
lattice over the global batch, t_b = 1 - (b + u)/B, which lies in (0, 1].
"""

import dataclasses

import jax
import jax.numpy as jnp

from replaid_jax.objectives import base
from replaid_jax.objectives import discrete
from replaid_jax.objectives import token_model

TRAIN_LOSSES = ("low_var", "elbo")


@dataclasses.dataclass(frozen=True)
class MDLM(discrete.DiscreteDiffusion):
  name = "mdlm"

  @property
  def mask_id(self) -> int:
    return token_model.extra_id(self.c.model.vocab_size)

  def time_of(self, f):
    """t = 1 - f in (0, 1]."""
    return 1.0 - f

  def masked_ce(self, params, tokens_BL, t_B, mask_BL):
    """-log p(x_l | z_t) at every position [B, L] (only masked positions are meaningful)."""
    z = jnp.where(mask_BL, self.mask_id, tokens_BL)
    return token_model.token_nll(self.logits(params, z, t_B), tokens_BL)

  def elbo_terms(self, params, tokens_BL, t_B, mask_BL):
    """The NELBO integrand per row at given (t, mask): (1/t)(1/L) sum over masked positions of the CE."""
    ce = self.masked_ce(params, tokens_BL, t_B, mask_BL)
    return jnp.sum(jnp.where(mask_BL, ce, 0.0), axis=-1) / (tokens_BL.shape[1] * t_B), ce

  def draw_terms(self, params, tokens_BL, t_B, key):
    mask = jax.random.uniform(key, tokens_BL.shape) < t_B[:, None]
    return self.elbo_terms(params, tokens_BL, t_B, mask)[0]

  def loss_and_grads(self, params, tokens_BL, setup, key):
    t_B = setup.t
    mask = jax.random.uniform(key, tokens_BL.shape) < t_B[:, None]
    seq_len = tokens_BL.shape[1]

    def loss_fn(p):
      per_row, ce = self.elbo_terms(p, tokens_BL, t_B, mask)
      if self.c.diffusion.mdlm_train_loss == "elbo":
        return jnp.sum(per_row) / setup.n_rows, per_row
      # The global batch's expected masked count; t sums over the whole step's lattice (mean t = 1/2).
      expected_masked = seq_len * 0.5 * setup.n_rows
      return jnp.sum(jnp.where(mask, ce, 0.0)) / expected_masked, per_row

    (loss, per_row), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, base.zero_terms(per_row, diffusion=jax.lax.stop_gradient(per_row)), grads

  def sample_traced(self, params, key, *, num_samples, seq_len, num_steps, known_BL=None, known_mask_BL=None,
                    temperature: float = 1.0):
    """Ancestral sampling on the uniform grid t_i = i/T, from all-[MASK] at t = 1 to t = 0.

    From t to s < t a masked position is revealed with probability (t - s)/t,
    its token drawn from the network's distribution; revealed tokens stay. The
    last step (s = 0) reveals everything left. Known positions start revealed
    (exact conditioning under the SUBS parameterisation).
    """
    if known_BL is None:
      known_BL = jnp.zeros((num_samples, seq_len), jnp.int32)
      known_mask_BL = jnp.zeros((num_samples, seq_len), bool)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_samples))
    z0 = jnp.where(known_mask_BL, known_BL, self.mask_id).astype(jnp.int32)

    def body(i, z_BL):
      step = num_steps - i
      t = step / num_steps
      s = (step - 1) / num_steps
      t_B = jnp.full((num_samples,), t, jnp.float32)
      logits = self.logits(params, z_BL, t_B) / temperature
      ks = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, step)))(keys)
      draw = jax.vmap(lambda k, lg: jax.random.categorical(k, lg))(ks[:, 0], logits)
      reveal = jax.vmap(lambda k: jax.random.uniform(k, (seq_len,)))(ks[:, 1]) < (t - s) / t
      masked = z_BL == self.mask_id
      return jnp.where(masked & reveal, draw, z_BL).astype(jnp.int32)

    return jax.lax.fori_loop(0, num_steps, body, z0)

  def bound_protocol(self, num_times):
    return {"num_times": num_times, "estimator": "continuous-time masked-diffusion NELBO, (1/t) x masked-token CE",
            "time_lattice": "t_k = 1 - (k + u) / K, k = 0..K-1, one u ~ U(0,1) per sequence; masks ~ Bernoulli(t)"}
