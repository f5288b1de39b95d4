"""The DiT backbone of MDLM/Duo with RePlaid's input layer.

  u   = z_t / sqrt(alpha_t^2 / d_e + sigma_t^2)              (input scaling)
  h_0 = W_in u + W_sc (x_sc sqrt(d_e))                       (W_sc zero-initialised)
  c   = SiLU(MLP(sinusoidal(gamma_t)))                       (adaLN conditioning)
  h   = DiT blocks (adaLN-Zero, RoPE, weight-only LN, GELU-tanh MLP with biases)
  out = W_out(modulate(LN(h), c)) + b_out                    (W_out zero-initialised)

The blocks' parameters are stacked on a leading "layers" axis and run with
`lax.scan`, so compile time does not grow with depth.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from replaid_jax.models import layers
from replaid_jax.models import params as params_lib

P = params_lib.Param


@dataclasses.dataclass(frozen=True)
class DenoiserConfig:
  vocab_size: int
  embed_dim: int
  width: int
  num_layers: int
  num_heads: int
  mlp_ratio: int
  cond_dim: int
  cond_freqs: int
  max_seq_len: int
  rope_base: float
  compute_dtype: str
  causal: bool
  remat: bool

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


def init(key: jax.Array, cfg: DenoiserConfig, output_bias: jax.Array | None = None) -> dict:
  if cfg.width % cfg.num_heads:
    raise ValueError(f"model.width={cfg.width} is not divisible by model.num_heads={cfg.num_heads}.")
  d, c, e, n = cfg.width, cfg.cond_dim, cfg.embed_dim, cfg.num_layers
  h, k, f, v = cfg.num_heads, cfg.head_dim, cfg.mlp_ratio * cfg.width, cfg.vocab_size
  keys = iter(jax.random.split(key, 8))
  nrm = params_lib.normal
  blocks = {
      "ln1": params_lib.ones((n, d), ("layers", None)),
      "adaln_w": params_lib.zeros((n, c, 6 * d), ("layers", None, None)),
      "adaln_b": params_lib.zeros((n, 6 * d), ("layers", None)),
      "qkv": nrm(next(keys), (n, d, 3, h, k), d**-0.5, ("layers", "embed", None, "heads", None)),
      "attn_out": nrm(next(keys), (n, h, k, d), d**-0.5, ("layers", "heads", None, "embed")),
      "ln2": params_lib.ones((n, d), ("layers", None)),
      "mlp_w1": nrm(next(keys), (n, d, f), d**-0.5, ("layers", "embed", "mlp")),
      "mlp_b1": params_lib.zeros((n, f), ("layers", "mlp")),
      "mlp_w2": nrm(next(keys), (n, f, d), f**-0.5, ("layers", "mlp", "embed")),
      "mlp_b2": params_lib.zeros((n, d), ("layers", None)),
  }
  if output_bias is None:
    out_b = params_lib.zeros((v,), ("vocab",))
  else:
    if output_bias.shape != (v,):
      raise ValueError(f"output bias has shape {output_bias.shape}, expected ({v},).")
    out_b = P(jnp.asarray(output_bias, jnp.float32), ("vocab",))
  return {
      "in_proj": nrm(next(keys), (e, d), e**-0.5, (None, "embed")),
      "sc_proj": params_lib.zeros((e, d), (None, "embed")),
      "cond_w1": nrm(next(keys), (2 * cfg.cond_freqs, c), (2 * cfg.cond_freqs) ** -0.5, (None, None)),
      "cond_b1": params_lib.zeros((c,), (None,)),
      "cond_w2": nrm(next(keys), (c, c), c**-0.5, (None, None)),
      "cond_b2": params_lib.zeros((c,), (None,)),
      "blocks": blocks,
      "final_ln": params_lib.ones((d,), (None,)),
      "final_adaln_w": params_lib.zeros((c, 2 * d), (None, None)),
      "final_adaln_b": params_lib.zeros((2 * d,), (None,)),
      "out_w": params_lib.zeros((d, v), ("embed", "vocab")),
      "out_b": out_b,
  }


def _block(p: dict, x_BLD: jax.Array, c_BC: jax.Array, rope: tuple, cfg: DenoiserConfig) -> jax.Array:
  dt = jnp.dtype(cfg.compute_dtype)
  mod = layers.dense(c_BC, p["adaln_w"], p["adaln_b"], dtype=dt)
  sh1, sc1, g1, sh2, sc2, g2 = jnp.split(mod, 6, axis=-1)

  h = layers.modulate(layers.layer_norm(x_BLD, p["ln1"]), sh1, sc1)
  qkv = jnp.einsum("bld,dthk->tblhk", h.astype(dt), p["qkv"].astype(dt))
  q = layers.apply_rope(qkv[0], *rope)
  k = layers.apply_rope(qkv[1], *rope)
  att = layers.attention(q, k, qkv[2], causal=cfg.causal)
  att = jnp.einsum("blhk,hkd->bld", att, p["attn_out"].astype(dt), preferred_element_type=jnp.float32)
  x_BLD = x_BLD + g1[:, None, :] * att

  h = layers.modulate(layers.layer_norm(x_BLD, p["ln2"]), sh2, sc2)
  h = layers.gelu_tanh(layers.dense(h, p["mlp_w1"], p["mlp_b1"], dtype=dt))
  h = layers.dense(h, p["mlp_w2"], p["mlp_b2"], dtype=dt)
  return x_BLD + g2[:, None, :] * h


def apply(
    p: dict,
    z_BLE: jax.Array,
    cond_B: jax.Array,
    x_sc_BLE: jax.Array,
    alpha2_B: jax.Array,
    sigma2_B: jax.Array,
    cfg: DenoiserConfig,
) -> jax.Array:
  """Network logits [B, L, V] (before the output prior)."""
  seq_len = z_BLE.shape[1]
  if seq_len > cfg.max_seq_len:
    raise ValueError(f"sequence length {seq_len} exceeds model.max_seq_len={cfg.max_seq_len}.")
  dt = jnp.dtype(cfg.compute_dtype)
  e = cfg.embed_dim
  scale_B = jax.lax.rsqrt(alpha2_B / e + sigma2_B)
  u = z_BLE * scale_B[:, None, None]
  x = layers.dense(u, p["in_proj"], dtype=dt) + layers.dense(x_sc_BLE * math.sqrt(e), p["sc_proj"], dtype=dt)

  c = layers.sinusoidal(cond_B, cfg.cond_freqs)
  c = jax.nn.silu(layers.dense(c, p["cond_w1"], p["cond_b1"]))
  c = jax.nn.silu(layers.dense(c, p["cond_w2"], p["cond_b2"]))

  rope = layers.rope_tables(seq_len, cfg.head_dim, cfg.rope_base)

  def body(x, block_params):
    return _block(block_params, x, c, rope, cfg), None

  if cfg.remat:
    body = jax.checkpoint(body)
  x, _ = jax.lax.scan(body, x, p["blocks"])

  shift, scale = jnp.split(layers.dense(c, p["final_adaln_w"], p["final_adaln_b"]), 2, axis=-1)
  h = layers.modulate(layers.layer_norm(x, p["final_ln"]), shift, scale)
  return layers.dense(h, p["out_w"], p["out_b"], dtype=dt)
