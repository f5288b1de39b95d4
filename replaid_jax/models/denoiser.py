"""The DiT backbone of MDLM/Duo with RePlaid's input layer.

  u   = z_t / sqrt(alpha_t^2 / d_e + sigma_t^2)              (input scaling)
  h_0 = W_in u + W_sc (x_sc sqrt(d_e))                       (W_sc zero-initialised)
  c   = SiLU(MLP(sinusoidal(gamma_t)))                       (adaLN conditioning)
  h   = DiT blocks (adaLN-Zero, RoPE, weight-only LN, GELU-tanh MLP with biases)
  out = W_out(modulate(LN(h), c)) + b_out                    (W_out zero-initialised)

Token-input models (the AR and masked-diffusion baselines) replace the first
line and W_in, W_sc by a table lookup h_0 = T[x] (`init(..., token_vocab=V')`,
`apply_tokens`); everything after h_0 is shared.

`block = "plaid"` restores the original Plaid block for ablations: RMSNorm,
MLP without biases, residual branches scaled by 1/sqrt(num_layers) instead of
adaLN gates, the noise level added to h_0 through a zero-initialised linear map
of its sinusoidal embedding, and a float32 output head.

The blocks' parameters are stacked on a leading "layers" axis and run with
`lax.scan`, so compile time does not grow with depth (`unroll` traces them
one by one, for FLOP counting).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from replaid_jax.models import layers
from replaid_jax.models import params as params_lib
from replaid_jax.models import partitioning

REMAT_POLICIES = {
    "full": None,  # save only each block's input; recompute the rest
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute elementwise work
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls only
}
ACT = ("batch", None, "act_embed")  # [B, L, D] residual stream

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
  block: str = "dit"
  remat_policy: str = "full"
  head_init_scale: float = 0.0
  gate_init: float = 0.0
  input_posterior: bool = False

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


def init(key: jax.Array, cfg: DenoiserConfig, output_bias: jax.Array | None = None,
         token_vocab: int | None = None) -> dict:
  """Parameters as `Param` leaves; `token_vocab` builds a token-input model with that many input ids."""
  if cfg.width % cfg.num_heads:
    raise ValueError(f"model.width={cfg.width} is not divisible by model.num_heads={cfg.num_heads}.")
  d, c, n = cfg.width, cfg.cond_dim, cfg.num_layers
  h, k, f, v = cfg.num_heads, cfg.head_dim, cfg.mlp_ratio * cfg.width, cfg.vocab_size
  keys = iter(jax.random.split(key, 8))
  nrm = params_lib.normal
  if cfg.block == "plaid":
    return _init_plaid(keys, cfg, _output_bias(cfg, output_bias), token_vocab)
  blocks = {
      "ln1": params_lib.ones((n, d), ("layers", None)),
      "adaln_w": params_lib.zeros((n, c, 6 * d), ("layers", None, None)),
      "adaln_b": _adaln_bias(n, d, cfg.gate_init),
      "qkv": nrm(next(keys), (n, d, 3, h, k), d**-0.5, ("layers", "embed", None, "heads", None)),
      "attn_out": nrm(next(keys), (n, h, k, d), d**-0.5, ("layers", "heads", None, "embed")),
      "ln2": params_lib.ones((n, d), ("layers", None)),
      "mlp_w1": nrm(next(keys), (n, d, f), d**-0.5, ("layers", "embed", "mlp")),
      "mlp_b1": params_lib.zeros((n, f), ("layers", "mlp")),
      "mlp_w2": nrm(next(keys), (n, f, d), f**-0.5, ("layers", "mlp", "embed")),
      "mlp_b2": params_lib.zeros((n, d), ("layers", None)),
  }
  tree = {
      **_input_params(keys, cfg, token_vocab),
      "cond_w1": nrm(next(keys), (2 * cfg.cond_freqs, c), (2 * cfg.cond_freqs) ** -0.5, (None, None)),
      "cond_b1": params_lib.zeros((c,), (None,)),
      "cond_w2": nrm(next(keys), (c, c), c**-0.5, (None, None)),
      "cond_b2": params_lib.zeros((c,), (None,)),
      "blocks": blocks,
      "final_ln": params_lib.ones((d,), (None,)),
      "final_adaln_w": params_lib.zeros((c, 2 * d), (None, None)),
      "final_adaln_b": params_lib.zeros((2 * d,), (None,)),
      "out_w": _head(next(keys), d, v, cfg.head_init_scale),
      "out_b": _output_bias(cfg, output_bias),
  }
  return tree


def _adaln_bias(n: int, d: int, gate: float) -> P:
  """adaLN biases (shift1, scale1, gate1, shift2, scale2, gate2); the gates start at `gate` (0: adaLN-Zero)."""
  b = jnp.zeros((n, 6, d), jnp.float32).at[:, (2, 5), :].set(gate)
  return P(b.reshape(n, 6 * d), ("layers", None))


def _head(key: jax.Array, d: int, v: int, scale: float) -> P:
  """Output projection: zeros (DiT), or N(0, (scale / sqrt(d))^2) to start with a non-zero readout."""
  if scale == 0:
    return params_lib.zeros((d, v), ("embed", "vocab"))
  return params_lib.normal(key, (d, v), scale * d**-0.5, ("embed", "vocab"))


def _output_bias(cfg: DenoiserConfig, output_bias: jax.Array | None) -> P:
  if output_bias is None:
    return params_lib.zeros((cfg.vocab_size,), ("vocab",))
  if output_bias.shape != (cfg.vocab_size,):
    raise ValueError(f"output bias has shape {output_bias.shape}, expected ({cfg.vocab_size},).")
  return P(jnp.asarray(output_bias, jnp.float32), ("vocab",))


def _input_params(keys, cfg: DenoiserConfig, token_vocab: int | None) -> dict:
  d, e = cfg.width, cfg.embed_dim
  if token_vocab:
    return {"tok_embed": params_lib.normal(next(keys), (token_vocab, d), d**-0.5, ("vocab", "embed"))}
  k_in = next(keys)
  out = {
      "in_proj": params_lib.normal(k_in, (e, d), e**-0.5, (None, "embed")),
      "sc_proj": params_lib.zeros((e, d), (None, "embed")),
  }
  if cfg.input_posterior:
    # A table that embeds each position's single-position token posterior (see `apply`).
    out["in_post"] = params_lib.normal(jax.random.fold_in(k_in, 1), (cfg.vocab_size, d), d**-0.5,
                                       ("vocab", "embed"))
  return out


def _init_plaid(keys, cfg: DenoiserConfig, out_b: P, token_vocab: int | None) -> dict:
  d, n, h, k, f = cfg.width, cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.mlp_ratio * cfg.width
  nrm = params_lib.normal
  blocks = {
      "rms1": params_lib.ones((n, d), ("layers", None)),
      "qkv": nrm(next(keys), (n, d, 3, h, k), d**-0.5, ("layers", "embed", None, "heads", None)),
      "attn_out": nrm(next(keys), (n, h, k, d), d**-0.5, ("layers", "heads", None, "embed")),
      "rms2": params_lib.ones((n, d), ("layers", None)),
      "mlp_w1": nrm(next(keys), (n, d, f), d**-0.5, ("layers", "embed", "mlp")),
      "mlp_w2": nrm(next(keys), (n, f, d), f**-0.5, ("layers", "mlp", "embed")),
  }
  return {
      **_input_params(keys, cfg, token_vocab),
      "cond_proj": params_lib.zeros((2 * cfg.cond_freqs, d), (None, "embed")),
      "blocks": blocks,
      "final_ln": params_lib.ones((d,), (None,)),
      "out_w": params_lib.zeros((d, cfg.vocab_size), ("embed", "vocab")),
      "out_b": out_b,
  }


def _attention(p: dict, h: jax.Array, rope: tuple, cfg: DenoiserConfig) -> jax.Array:
  dt = jnp.dtype(cfg.compute_dtype)
  qkv = jnp.einsum("bld,dthk->tblhk", h.astype(dt), p["qkv"].astype(dt))
  qkv = partitioning.constrain(qkv, (None, "batch", None, "heads", None))
  q = layers.apply_rope(qkv[0], *rope)
  k = layers.apply_rope(qkv[1], *rope)
  att = layers.attention(q, k, qkv[2], causal=cfg.causal)
  return jnp.einsum("blhk,hkd->bld", att, p["attn_out"].astype(dt), preferred_element_type=jnp.float32)


def _plaid_block(p: dict, x_BLD: jax.Array, rope: tuple, cfg: DenoiserConfig) -> jax.Array:
  dt = jnp.dtype(cfg.compute_dtype)
  scale = cfg.num_layers ** -0.5
  x_BLD = x_BLD + scale * _attention(p, layers.rms_norm(x_BLD, p["rms1"]), rope, cfg)
  h = layers.gelu_tanh(layers.dense(layers.rms_norm(x_BLD, p["rms2"]), p["mlp_w1"], dtype=dt))
  h = partitioning.constrain(h, ("batch", None, "mlp"))
  return partitioning.constrain(x_BLD + scale * layers.dense(h, p["mlp_w2"], dtype=dt), ACT)


def _block(p: dict, x_BLD: jax.Array, c_BC: jax.Array, rope: tuple, cfg: DenoiserConfig) -> jax.Array:
  dt = jnp.dtype(cfg.compute_dtype)
  mod = layers.dense(c_BC, p["adaln_w"], p["adaln_b"], dtype=dt)
  sh1, sc1, g1, sh2, sc2, g2 = jnp.split(mod, 6, axis=-1)

  h = layers.modulate(layers.layer_norm(x_BLD, p["ln1"]), sh1, sc1)
  x_BLD = x_BLD + g1[:, None, :] * _attention(p, h, rope, cfg)

  h = layers.modulate(layers.layer_norm(x_BLD, p["ln2"]), sh2, sc2)
  h = layers.gelu_tanh(layers.dense(h, p["mlp_w1"], p["mlp_b1"], dtype=dt))
  h = partitioning.constrain(h, ("batch", None, "mlp"))
  h = layers.dense(h, p["mlp_w2"], p["mlp_b2"], dtype=dt)
  return partitioning.constrain(x_BLD + g2[:, None, :] * h, ACT)


def apply(
    p: dict,
    z_BLE: jax.Array,
    cond_B: jax.Array,
    x_sc_BLE: jax.Array,
    alpha2_B: jax.Array,
    sigma2_B: jax.Array,
    cfg: DenoiserConfig,
    *,
    posterior_BLV: jax.Array | None = None,
    unroll: bool = False,
) -> jax.Array:
  """Network logits [B, L, V] (before the output prior) from a noisy embedding sequence.

  With `cfg.input_posterior`, `posterior_BLV` (each position's token posterior
  given its own z_t alone) is embedded by a V x D table and added to h_0.
  """
  dt = jnp.dtype(cfg.compute_dtype)
  e = cfg.embed_dim
  scale_B = jax.lax.rsqrt(alpha2_B / e + sigma2_B)
  u = z_BLE * scale_B[:, None, None]
  x = layers.dense(u, p["in_proj"], dtype=dt) + layers.dense(x_sc_BLE * math.sqrt(e), p["sc_proj"], dtype=dt)
  if cfg.input_posterior:
    x = x + layers.dense(posterior_BLV, p["in_post"], dtype=dt)
  return trunk(p, x, cond_B, cfg, unroll=unroll)


def apply_tokens(p: dict, tokens_BL: jax.Array, cond_B: jax.Array, cfg: DenoiserConfig, *,
                 unroll: bool = False) -> jax.Array:
  """Network logits [B, L, V] from input token ids (token-input models)."""
  return trunk(p, jnp.take(p["tok_embed"], tokens_BL, axis=0), cond_B, cfg, unroll=unroll)


def trunk(p: dict, x_BLD: jax.Array, cond_B: jax.Array, cfg: DenoiserConfig, *, unroll: bool = False) -> jax.Array:
  """Blocks and output layer: from the input activations h_0 [B, L, D] to logits [B, L, V]."""
  seq_len = x_BLD.shape[1]
  if seq_len > cfg.max_seq_len:
    raise ValueError(f"sequence length {seq_len} exceeds model.max_seq_len={cfg.max_seq_len}.")
  dt = jnp.dtype(cfg.compute_dtype)
  rope = layers.rope_tables(seq_len, cfg.head_dim, cfg.rope_base)
  emb = layers.sinusoidal(cond_B, cfg.cond_freqs)
  if cfg.block == "plaid":
    x_BLD = x_BLD + layers.dense(emb, p["cond_proj"])[:, None, :]
    body = lambda x, bp: (_plaid_block(bp, x, rope, cfg), None)
  else:
    c = jax.nn.silu(layers.dense(emb, p["cond_w1"], p["cond_b1"]))
    c = jax.nn.silu(layers.dense(c, p["cond_w2"], p["cond_b2"]))
    body = lambda x, bp: (_block(bp, x, c, rope, cfg), None)
  if cfg.remat:
    body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat_policy])
  x_BLD = partitioning.constrain(x_BLD, ACT)
  x, _ = jax.lax.scan(body, x_BLD, p["blocks"], unroll=cfg.num_layers if unroll else 1)

  if cfg.block == "plaid":
    h = layers.layer_norm(x, p["final_ln"])
    return partitioning.constrain(layers.dense(h, p["out_w"], p["out_b"], dtype=jnp.float32), ("batch", None, "vocab"))
  shift, scale = jnp.split(layers.dense(c, p["final_adaln_w"], p["final_adaln_b"]), 2, axis=-1)
  h = layers.modulate(layers.layer_norm(x, p["final_ln"]), shift, scale)
  return partitioning.constrain(layers.dense(h, p["out_w"], p["out_b"], dtype=dt), ("batch", None, "vocab"))
