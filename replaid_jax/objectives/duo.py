"""Uniform-state discrete diffusion: the continuous-time ELBO that Duo trains and evaluates.

Forward process: each token is kept with probability alpha_t = 1 - t and
otherwise replaced by a token drawn uniformly from the V, so

  q(z_t | x) = Cat(alpha_t e_x + (1 - alpha_t) / V).

The reverse step is the forward posterior with the network's distribution
x_theta = softmax(f(z_t, t)) in place of x: p(z_s | z_t) = q(z_s | z_t, x_theta),
which is linear in x and hence a distribution. Letting s -> t, the KL of each
step becomes a jump-rate divergence, and the NELBO per token is

  L = E_t E_{z_t} w(t) sum_{k != i} [ r_k log(r_k / r^theta_k) - r_k + r^theta_k ],

  i = z_t at the position,  w(t) = -alpha'_t / (V alpha_t) = 1 / (V (1 - t)),
  xbar = V alpha_t x + (1 - alpha_t),  r_k = xbar_k / xbar_i  (r^theta from x_theta).

There is no reconstruction term (z_0 = x) and no prior term (z_1 is uniform,
the prior). The bracket is phi(a, b) = b h(a/b - 1) with h(e) = (1 + e)
log1p(e) - e >= 0, evaluated through e / alpha_t (`_divergence`): the sum then
stays accurate in float32 both as alpha_t -> 0, where the weight diverges and
the bracket vanishes like alpha_t^2, and as t -> 0, where the bracket holds
terms proportional to t. Training minimises this NELBO; validation
reports it in `diffusion`. Times come from one low-discrepancy lattice over the
global batch, t_b = (b + u) / B in [0, 1).

The network reads tokens through the shared token table (V + 1 rows as for the
other token objectives; the extra row is unused) and is conditioned on t.
"""

import dataclasses

import jax
import jax.numpy as jnp

from replaid_jax.objectives import base
from replaid_jax.objectives import discrete

_SERIES_BELOW = 1e-3  # |e| under which h(e) / e uses its series


def _h_over_e(e: jax.Array) -> jax.Array:
  """((1 + e) log1p(e) - e) / e for e >= -1, stable near 0 (and equal to -1 at e = -1)."""
  small = jnp.abs(e) < _SERIES_BELOW
  safe_e = jnp.where(small, 1.0, e)
  ratio = ((1.0 + safe_e) * jnp.log1p(jnp.maximum(safe_e, -1.0 + 1e-7)) - safe_e) / safe_e
  series = e * (0.5 - e * (1.0 / 6.0 - e / 12.0))
  return jnp.where(e <= -1.0, -1.0, jnp.where(small, series, ratio))


def _divergence(x_BL: jax.Array, z_BL: jax.Array, probs_BLV: jax.Array, t_B: jax.Array) -> jax.Array:
  """sum_{k != z} phi(r_k, r^theta_k) / (V alpha) per position [B, L], written through e / alpha.

  With xbar = t + alpha V x (and xbar^theta from p = x_theta),
  r_k - r^theta_k = alpha g_k / (xbar_i xbar^theta_i), where
  g_k = V [t ((x_k - x_i) - (p_k - p_i)) + alpha V (x_k p_i - p_k x_i)].
  With q = g / (r^theta xbar_i xbar^theta_i), e = alpha q and the summand is
  r^theta q (h(e)/e) / V: finite at alpha = 0, and free of cancellation as
  t -> 0 (every t-proportional part carries t as a factor, never as 1 - alpha).
  """
  vocab = probs_BLV.shape[-1]
  t = t_B[:, None, None]
  a = 1.0 - t
  x = jax.nn.one_hot(x_BL, vocab, dtype=jnp.float32)
  p = probs_BLV
  at_z = lambda v: jnp.take_along_axis(v, z_BL[..., None], axis=-1)  # [B, L, 1]
  x_i, p_i = at_z(x), at_z(p)
  xbar_i, xbar_t_i = t + a * vocab * x_i, t + a * vocab * p_i
  r_t = (t + a * vocab * p) / xbar_t_i
  g = vocab * (t * ((x - x_i) - (p - p_i)) + a * vocab * (x * p_i - p * x_i))
  q = g / (r_t * xbar_i * xbar_t_i)
  summand = r_t * q * _h_over_e(a * q) / vocab
  not_z = jnp.arange(vocab)[None, None, :] != z_BL[..., None]
  return jnp.sum(jnp.where(not_z, summand, 0.0), axis=-1)


@dataclasses.dataclass(frozen=True)
class Duo(discrete.DiscreteDiffusion):
  name = "duo"

  def time_of(self, f):
    """t = f in [0, 1), kept below 1 in float32 (where alpha_t = 0 and the weight 1/(V alpha_t) is infinite)."""
    return jnp.minimum(f, 1.0 - 1e-7)

  def corrupt(self, key: jax.Array, tokens_BL: jax.Array, t_B: jax.Array) -> jax.Array:
    """z_t ~ q(z_t | x): keep each token with probability 1 - t, else draw one uniformly (possibly itself)."""
    k_keep, k_draw = jax.random.split(key)
    keep = jax.random.uniform(k_keep, tokens_BL.shape) < (1.0 - t_B)[:, None]
    uniform = jax.random.randint(k_draw, tokens_BL.shape, 0, self.c.model.vocab_size, jnp.int32)
    return jnp.where(keep, tokens_BL, uniform).astype(jnp.int32)

  def probs(self, params, z_BL, t_B):
    return jax.nn.softmax(self.logits(params, z_BL, t_B), axis=-1)

  def elbo_terms(self, params, tokens_BL, z_BL, t_B):
    """The NELBO integrand per row (nats/token) at given (t, z_t)."""
    div = _divergence(tokens_BL, z_BL, self.probs(params, z_BL, t_B), t_B)
    return jnp.mean(div, axis=-1)

  def draw_terms(self, params, tokens_BL, t_B, key):
    return self.elbo_terms(params, tokens_BL, self.corrupt(key, tokens_BL, t_B), t_B)

  def loss_and_grads(self, params, tokens_BL, setup, key):
    z = self.corrupt(key, tokens_BL, setup.t)

    def loss_fn(p):
      per_row = self.elbo_terms(p, tokens_BL, z, setup.t)
      return jnp.sum(per_row) / setup.n_rows, per_row

    (loss, per_row), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, base.zero_terms(per_row, diffusion=jax.lax.stop_gradient(per_row)), grads

  def sample_traced(self, params, key, *, num_samples, seq_len, num_steps, known_BL=None, known_mask_BL=None,
                    temperature: float = 1.0):
    """Ancestral sampling on t_i = i/T from uniform noise at t = 1 to t = 0.

    Each step draws z_s ~ q(z_s | z_t, x_theta), per position:
      p(z_s = k) ∝ (alpha_{t|s} [k = z_t] + (1 - alpha_{t|s}) / V) (alpha_s x_theta_k + (1 - alpha_s) / V).
    Known positions are held at their tokens throughout (the network sees them
    clean while the rest is noisy: a heuristic, not exact conditioning, since a
    uniform-state model was trained with every position noised alike).
    """
    vocab = self.c.model.vocab_size
    if known_BL is None:
      known_BL = jnp.zeros((num_samples, seq_len), jnp.int32)
      known_mask_BL = jnp.zeros((num_samples, seq_len), bool)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_samples))
    noise = jax.vmap(lambda k: jax.random.randint(k, (seq_len,), 0, vocab, jnp.int32))(keys)
    z0 = jnp.where(known_mask_BL, known_BL, noise).astype(jnp.int32)

    def body(i, z_BL):
      step = num_steps - i
      t = step / num_steps
      s = (step - 1) / num_steps
      alpha_t, alpha_s = 1.0 - t, 1.0 - s
      alpha_ts = alpha_t / alpha_s
      t_B = jnp.full((num_samples,), t, jnp.float32)
      x_theta = jax.nn.softmax(self.logits(params, z_BL, t_B) / temperature, -1)
      stay = alpha_ts * jax.nn.one_hot(z_BL, vocab, dtype=jnp.float32) + (1.0 - alpha_ts) / vocab
      post = stay * (alpha_s * x_theta + (1.0 - alpha_s) / vocab)
      ks = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
      draw = jax.vmap(lambda k, p: jax.random.categorical(k, jnp.log(p)))(ks, post)
      return jnp.where(known_mask_BL, known_BL, draw).astype(jnp.int32)

    return jax.lax.fori_loop(0, num_steps, body, z0)

  def bound_protocol(self, num_times):
    return {"num_times": num_times,
            "estimator": "continuous-time uniform-state NELBO, 1/(V(1-t)) x the jump-rate divergence to the network",
            "time_lattice": "t_k = (k + u) / K, k = 0..K-1, one u ~ U(0,1) per sequence; z_t ~ q(z_t | x)"}
