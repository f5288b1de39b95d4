"""Conditioning for the samplers: Plaid-style gradient guidance on z, and hard clamping.

Guidance adds the gradient of a log-likelihood J(z_t) of the wanted tokens to the
expected embedding (Tweedie: E[e | z_t, y] = E[e | z_t] + sigma_t^2 / alpha_t grad log p(y | z_t)):

  x_hat <- x_hat + grad_z J(z_t) * sigma_t^2 / alpha_t

  J(z_t) = sum_l w_l log p(x_l = a_l | z_t)                 tokens at fixed positions
         + sum_k w_k f_k(z_t)                               spans (words of n_k tokens)

with p(. | z_t) = softmax(logits) the denoiser's per-position marginals and, for a
span s at offset o, log p(s at o) = sum_j log p(x_{o+j} = s_j | z_t):

  include:  f_k = log sum_o p(s_k at o)                     logsumexp over the allowed offsets
  avoid:    f_k = sum_o log(1 - p(s_k at o))                negation

An allowed offset keeps the span inside the sequence and, for a span pinned to a
position, equals that position. The weights w carry the guidance scale, so per-token
and per-word weights are just larger or smaller entries.

Clamping is the cheaper alternative for known positions: after every step the known
positions of z_s are replaced by alpha_s e_a + sigma_s xi (the known embedding
re-noised to the current level), and the decoded tokens there are the known ones.
"""

import flax.struct
import jax
import jax.numpy as jnp

# Avoidance uses log(1 - (1 - eps) p) so that its gradient stays bounded when p -> 1.
_AVOID_EPS = 1e-3
_NEG = -1e9


@flax.struct.dataclass
class Conditioning:
  """What a batch is conditioned on; every field has the batch as its leading axis."""

  tokens: jax.Array  # [B, L] int32: target (or known) token per position; any value where unused
  weights: jax.Array  # [B, L] float32: guidance weight of log p(tokens at l); 0 where unguided
  clamp: jax.Array  # [B, L] bool: hard-clamp these positions to `tokens`
  span_tokens: jax.Array  # [B, K, S] int32: the tokens of each span, left-aligned
  span_mask: jax.Array  # [B, K, S] bool: which of the S slots a span uses (a prefix of them)
  span_weights: jax.Array  # [B, K] float32: guidance weight of each span; 0 for padding
  span_avoid: jax.Array  # [B, K] bool: avoid the span (log(1 - p)) instead of including it
  span_position: jax.Array  # [B, K] int32: fixed start offset, or -1 for anywhere

  @property
  def num_spans(self) -> int:
    return self.span_tokens.shape[1]


def empty(batch: int, seq_len: int, num_spans: int = 0, span_len: int = 1) -> Conditioning:
  """No conditioning (all weights zero, nothing clamped)."""
  return Conditioning(
      tokens=jnp.zeros((batch, seq_len), jnp.int32),
      weights=jnp.zeros((batch, seq_len), jnp.float32),
      clamp=jnp.zeros((batch, seq_len), bool),
      span_tokens=jnp.zeros((batch, num_spans, span_len), jnp.int32),
      span_mask=jnp.zeros((batch, num_spans, span_len), bool),
      span_weights=jnp.zeros((batch, num_spans), jnp.float32),
      span_avoid=jnp.zeros((batch, num_spans), bool),
      span_position=jnp.full((batch, num_spans), -1, jnp.int32),
  )


def position_log_probs(logp_BLV: jax.Array, cond: Conditioning) -> jax.Array:
  """log p(x_l = tokens_l | z) at every position: [B, L]."""
  return jnp.take_along_axis(logp_BLV, cond.tokens[..., None], axis=-1)[..., 0]


def _span_scores(logp_BLV: jax.Array, cond: Conditioning) -> tuple[jax.Array, jax.Array]:
  """(log p(span k at offset o) [B, L, K], whether offset o is allowed [B, L, K])."""
  b, l, _ = logp_BLV.shape
  k, s = cond.span_tokens.shape[1:]
  idx = jnp.broadcast_to(cond.span_tokens.reshape(b, 1, k * s), (b, l, k * s))
  lp = jnp.take_along_axis(logp_BLV, idx, axis=-1).reshape(b, l, k, s)  # log p(x_l = span_kj)
  score = jnp.zeros((b, l, k), logp_BLV.dtype)
  for j in range(s):
    # offset o reads position o + j; the wrap-around only reaches offsets that are not allowed.
    shifted = jnp.roll(lp[..., j], -j, axis=1)
    score = score + jnp.where(cond.span_mask[:, None, :, j], shifted, 0.0)
  length = jnp.sum(cond.span_mask, axis=-1)  # [B, K]
  offsets = jnp.arange(l)[None, :, None]
  allowed = offsets + length[:, None, :] <= l
  pinned = cond.span_position[:, None, :]
  allowed = allowed & ((pinned < 0) | (offsets == pinned))
  return score, allowed


def span_log_probs(logp_BLV: jax.Array, cond: Conditioning) -> jax.Array:
  """log sum_o p(span k at o) over the allowed offsets: [B, K] (the chance-like score of each span)."""
  score, allowed = _span_scores(logp_BLV, cond)
  return jax.nn.logsumexp(jnp.where(allowed, score, _NEG), axis=1)


def objective(logits_BLV: jax.Array, cond: Conditioning) -> jax.Array:
  """J per example [B]: the weighted log-likelihood of the conditioning under the denoiser."""
  logp = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  total = jnp.sum(cond.weights * position_log_probs(logp, cond), axis=-1)
  if cond.num_spans == 0:
    return total
  score, allowed = _span_scores(logp, cond)
  include = jax.nn.logsumexp(jnp.where(allowed, score, _NEG), axis=1)  # [B, K]
  avoid_terms = jnp.log1p(-(1.0 - _AVOID_EPS) * jnp.exp(jnp.minimum(score, 0.0)))
  avoid = jnp.sum(jnp.where(allowed, avoid_terms, 0.0), axis=1)  # [B, K]
  per_span = jnp.where(cond.span_avoid, avoid, include)
  return total + jnp.sum(jnp.where(cond.span_weights != 0, cond.span_weights * per_span, 0.0), axis=-1)


def is_guided(cond: Conditioning) -> bool:
  """Whether any guidance weight is non-zero (host-side check on concrete arrays)."""
  return bool(jnp.any(cond.weights != 0)) or bool(jnp.any(cond.span_weights != 0))


def is_clamped(cond: Conditioning) -> bool:
  return bool(jnp.any(cond.clamp))


def clamp_latents(z_BLE: jax.Array, cond: Conditioning, table_VE: jax.Array, alpha: jax.Array,
                  sigma: jax.Array, noise_BLE: jax.Array) -> jax.Array:
  """z with the clamped positions replaced by alpha e_a + sigma xi (the known tokens at this level)."""
  known = alpha * jnp.take(table_VE, cond.tokens, axis=0) + sigma * noise_BLE
  return jnp.where(cond.clamp[..., None], known, z_BLE)
