"""Building blocks of the DiT backbone: parameter constructors and stateless layers.

Shape suffixes: B batch, L sequence, D width, H heads, K head dim, C cond dim.
"""

from flax import nnx
import jax
import jax.numpy as jnp

_LN_EPS = 1e-5

Axes = tuple[str | None, ...]


def _param(init, key: jax.Array | None, shape: tuple[int, ...], axes: Axes) -> nnx.Param:
  # The logical names travel as metadata; `replaid_jax.sharding` maps them onto a mesh when the init is jitted, so
  # no mesh is needed (nor used) when the variable is created.
  if len(shape) != len(axes):
    raise ValueError(f"shape {shape} and logical axes {axes} differ in rank.")
  return nnx.Param(nnx.with_partitioning(init, axes, eager_sharding=False)(key, shape, jnp.float32))


def normal(key: jax.Array, shape: tuple[int, ...], std: float, axes: Axes) -> nnx.Param:
  """N(0, std^2) float32 parameter with logical axis names."""
  return _param(nnx.initializers.normal(std), key, shape, axes)


def zeros(shape: tuple[int, ...], axes: Axes) -> nnx.Param:
  return _param(nnx.initializers.zeros, None, shape, axes)


def ones(shape: tuple[int, ...], axes: Axes) -> nnx.Param:
  return _param(nnx.initializers.ones, None, shape, axes)


def fixed(value: jax.Array, axes: Axes) -> nnx.Param:
  """A parameter that starts at a given float32 value."""
  return _param(lambda *_: jnp.asarray(value, jnp.float32), None, jnp.shape(value), axes)


def layer_norm(x_BLD: jax.Array, scale_D: jax.Array) -> jax.Array:
  """Weight-only LayerNorm (no bias), computed in float32."""
  x = x_BLD.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + _LN_EPS) * scale_D


def rms_norm(x_BLD: jax.Array, scale_D: jax.Array) -> jax.Array:
  """RMSNorm (weight only), computed in float32."""
  x = x_BLD.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + _LN_EPS) * scale_D


def modulate(x_BLD: jax.Array, shift_BD: jax.Array, scale_BD: jax.Array) -> jax.Array:
  return x_BLD * (1.0 + scale_BD[:, None, :]) + shift_BD[:, None, :]


def dense(x: jax.Array, w: jax.Array, b: jax.Array | None = None, *, dtype=jnp.float32) -> jax.Array:
  """x @ w (+ b) with inputs cast to the compute dtype, accumulated in float32."""
  y = jnp.einsum("...i,io->...o", x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
  if b is not None:
    y = y + b
  return y


def rope_tables(seq_len: int, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
  """cos, sin tables [L, K/2] for rotary position embeddings."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head dimension, got {head_dim}.")
  inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BLHK: jax.Array, cos_LK: jax.Array, sin_LK: jax.Array) -> jax.Array:
  """Rotates channel pairs (first half, second half) by position-dependent angles."""
  half = x_BLHK.shape[-1] // 2
  x1, x2 = x_BLHK[..., :half], x_BLHK[..., half:]
  cos = cos_LK[None, :, None, :]
  sin = sin_LK[None, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHK.dtype)


def attention(q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array, *, causal: bool,
              bias_HLL: jax.Array | None = None) -> jax.Array:
  bias = None if bias_HLL is None else bias_HLL[None].astype(q_BLHK.dtype)
  return jax.nn.dot_product_attention(q_BLHK, k_BLHK, v_BLHK, bias=bias, is_causal=causal)


def alibi_slopes(num_heads: int) -> jax.Array:
  """Per-head slopes 2^(-8h/H), h = 0..H-1: head 0 penalises distance by 1 per position, the last by ~2^-8 H."""
  return 2.0 ** (-8.0 * jnp.arange(num_heads, dtype=jnp.float32) / num_heads)


def alibi_bias(seq_len: int, num_heads: int) -> jax.Array:
  """[H, L, L] additive attention logits -s_h |i - j| (a locality prior that does not depend on the content)."""
  pos = jnp.arange(seq_len, dtype=jnp.float32)
  return -alibi_slopes(num_heads)[:, None, None] * jnp.abs(pos[:, None] - pos[None, :])[None]


def relative_bias_init(num_layers: int, num_heads: int, max_distance: int) -> jax.Array:
  """[N, H, R] learned-locality bias at initialisation: -s_h d for d = 0..R-1, the alibi penalty in every block."""
  d = jnp.arange(max_distance, dtype=jnp.float32)
  return jnp.broadcast_to(-alibi_slopes(num_heads)[:, None] * d[None], (num_layers, num_heads, max_distance))


def relative_bias(table_HR: jax.Array, seq_len: int) -> jax.Array:
  """[H, L, L] attention logits table[h, |i - j|] of one block's learned locality."""
  if seq_len > table_HR.shape[-1]:
    raise ValueError(f"sequence of {seq_len} tokens is longer than the learned attention bias "
                     f"({table_HR.shape[-1]} distances, model.max_seq_len); raise model.max_seq_len.")
  pos = jnp.arange(seq_len)
  return table_HR[:, jnp.abs(pos[:, None] - pos[None, :])]


def gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


def sinusoidal(s_B: jax.Array, num_freqs: int) -> jax.Array:
  """[sin(f s), cos(f s)] with f = exp(linspace(-5, 5, num_freqs)): [B, 2 num_freqs]."""
  freqs = jnp.exp(jnp.linspace(-5.0, 5.0, num_freqs, dtype=jnp.float32))
  ang = s_B.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)
