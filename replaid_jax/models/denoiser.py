"""The DiT backbone of MDLM/Duo with RePlaid's input layer.

  u   = z_t / sqrt(alpha_t^2 / d_e + sigma_t^2)              (input scaling)
  h_0 = W_in u + W_sc (x_sc sqrt(d_e))                       (W_sc zero-initialised)
  c   = SiLU(MLP(sinusoidal(gamma_t)))                       (adaLN conditioning)
  h   = DiT blocks (adaLN-Zero, RoPE, weight-only LN, GELU-tanh MLP with biases)
  out = W_out(modulate(LN(h), c)) + b_out                    (W_out zero-initialised)

Token-input models (the AR and masked-diffusion baselines) replace the first
line and W_in, W_sc by a table lookup h_0 = T[x] (`Denoiser(..., token_vocab=V')`,
`Denoiser.tokens`); everything after h_0 is shared.

`block = "plaid"` restores the original Plaid block for ablations: RMSNorm,
MLP without biases, residual branches scaled by 1/sqrt(num_layers) instead of
adaLN gates, the noise level added to h_0 through a zero-initialised linear map
of its sinusoidal embedding, and a float32 output head.

The blocks' parameters are stacked on a leading "layers" axis and run with
`nnx.scan` (under `nnx.remat` when `remat` is set), so compile time does not
grow with depth (`unroll` traces them one by one, for FLOP counting).

The modules hold parameters and forward maths only; `model.predict` and
`token_model.logits` run them on a parameter pytree (what the ELBO
differentiates) through `nnx.merge` (`model.bind`).
"""

import math

from flax import nnx
import jax
import jax.numpy as jnp

from replaid_jax.models import layers
from replaid_jax.models import model_config
from replaid_jax.models import partitioning

REMAT_POLICIES = {
    "full": None,  # save only each block's input; recompute the rest
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute elementwise work
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls only
}
ACT = ("batch", None, "act_embed")  # [B, L, D] residual stream

class DitBlocks(nnx.Module):
  """`num_layers` DiT blocks (adaLN-Zero, RoPE, weight-only LN, GELU-tanh MLP with biases), stacked on "layers"."""

  def __init__(self, cfg: model_config.ModelConfig, keys):
    d, c, n = cfg.width, cfg.cond_dim, cfg.num_layers
    h, k, f = cfg.num_heads, cfg.head_dim, cfg.mlp_ratio * cfg.width
    self.cfg = cfg
    self.ln1 = layers.ones((n, d), ("layers", None))
    self.adaln_w = layers.zeros((n, c, 6 * d), ("layers", None, None))
    # adaLN biases (shift1, scale1, gate1, shift2, scale2, gate2); the gates start at gate_init (0: adaLN-Zero).
    bias = jnp.zeros((n, 6, d), jnp.float32).at[:, (2, 5), :].set(cfg.gate_init)
    self.adaln_b = layers.fixed(bias.reshape(n, 6 * d), ("layers", None))
    self.qkv = layers.normal(next(keys), (n, d, 3, h, k), d**-0.5, ("layers", "embed", None, "heads", None))
    self.attn_out = layers.normal(next(keys), (n, h, k, d), d**-0.5, ("layers", "heads", None, "embed"))
    self.ln2 = layers.ones((n, d), ("layers", None))
    self.mlp_w1 = layers.normal(next(keys), (n, d, f), d**-0.5, ("layers", "embed", "mlp"))
    self.mlp_b1 = layers.zeros((n, f), ("layers", "mlp"))
    self.mlp_w2 = layers.normal(next(keys), (n, f, d), f**-0.5, ("layers", "mlp", "embed"))
    self.mlp_b2 = layers.zeros((n, d), ("layers", None))
    _add_relative_bias(self, cfg)

  def layer(self, x_BLD: jax.Array, c_BC: jax.Array, rope: tuple) -> jax.Array:
    """One block; `self` holds one layer's slice of the parameters (inside `run_stack`)."""
    dt = jnp.dtype(self.cfg.compute_dtype)
    mod = layers.dense(c_BC, self.adaln_w[...], self.adaln_b[...], dtype=dt)
    sh1, sc1, g1, sh2, sc2, g2 = jnp.split(mod, 6, axis=-1)

    h = layers.modulate(layers.layer_norm(x_BLD, self.ln1[...]), sh1, sc1)
    x_BLD = x_BLD + g1[:, None, :] * _attention(self, h, rope)

    h = layers.modulate(layers.layer_norm(x_BLD, self.ln2[...]), sh2, sc2)
    h = layers.gelu_tanh(layers.dense(h, self.mlp_w1[...], self.mlp_b1[...], dtype=dt))
    h = partitioning.constrain(h, ("batch", None, "mlp"))
    h = layers.dense(h, self.mlp_w2[...], self.mlp_b2[...], dtype=dt)
    return partitioning.constrain(x_BLD + g2[:, None, :] * h, ACT)


class PlaidBlocks(nnx.Module):
  """The original Plaid blocks: RMSNorm, MLP without biases, residual branches scaled by 1/sqrt(num_layers)."""

  def __init__(self, cfg: model_config.ModelConfig, keys):
    d, n, h, k, f = cfg.width, cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.mlp_ratio * cfg.width
    self.cfg = cfg
    self.rms1 = layers.ones((n, d), ("layers", None))
    self.qkv = layers.normal(next(keys), (n, d, 3, h, k), d**-0.5, ("layers", "embed", None, "heads", None))
    self.attn_out = layers.normal(next(keys), (n, h, k, d), d**-0.5, ("layers", "heads", None, "embed"))
    self.rms2 = layers.ones((n, d), ("layers", None))
    self.mlp_w1 = layers.normal(next(keys), (n, d, f), d**-0.5, ("layers", "embed", "mlp"))
    self.mlp_w2 = layers.normal(next(keys), (n, f, d), f**-0.5, ("layers", "mlp", "embed"))
    _add_relative_bias(self, cfg)

  def layer(self, x_BLD: jax.Array, c_BC: None, rope: tuple) -> jax.Array:
    del c_BC  # the noise level entered h_0
    dt = jnp.dtype(self.cfg.compute_dtype)
    scale = self.cfg.num_layers ** -0.5
    x_BLD = x_BLD + scale * _attention(self, layers.rms_norm(x_BLD, self.rms1[...]), rope)
    h = layers.gelu_tanh(layers.dense(layers.rms_norm(x_BLD, self.rms2[...]), self.mlp_w1[...], dtype=dt))
    h = partitioning.constrain(h, ("batch", None, "mlp"))
    return partitioning.constrain(x_BLD + scale * layers.dense(h, self.mlp_w2[...], dtype=dt), ACT)


def _add_relative_bias(blocks: "DitBlocks | PlaidBlocks", cfg: model_config.ModelConfig) -> None:
  """model.attention_bias='learned': a trained [H, max_seq_len] bias by distance per block, alibi at the start."""
  if cfg.attention_bias == "learned":
    init = layers.relative_bias_init(cfg.num_layers, cfg.num_heads, cfg.max_seq_len)
    blocks.rel_bias = layers.fixed(init, ("layers", "heads", None))


def attention_operands(cfg: model_config.ModelConfig, qkv_DTHK: jax.Array, h_BLD: jax.Array, rope: tuple,
                       rel_bias_HR: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
  """(q, k, v [B, L, H, K], additive bias [H, L, L] or None) of one block's attention: the projection of the
  normalised residual stream, RoPE on q and k, and model.attention_bias (`rel_bias_HR`: the block's learned
  bias by distance, for "learned")."""
  dt = jnp.dtype(cfg.compute_dtype)
  qkv = jnp.einsum("bld,dthk->tblhk", h_BLD.astype(dt), qkv_DTHK.astype(dt))
  qkv = partitioning.constrain(qkv, (None, "batch", None, "heads", None))
  q = layers.apply_rope(qkv[0], *rope)
  k = layers.apply_rope(qkv[1], *rope)
  bias = None
  if cfg.attention_bias == "alibi":
    bias = layers.alibi_bias(h_BLD.shape[1], cfg.num_heads)
  elif cfg.attention_bias == "learned":
    bias = layers.relative_bias(rel_bias_HR, h_BLD.shape[1])
  return q, k, qkv[2], bias


def _attention(blk: DitBlocks | PlaidBlocks, h: jax.Array, rope: tuple) -> jax.Array:
  cfg = blk.cfg
  rel = blk.rel_bias[...] if cfg.attention_bias == "learned" else None
  q, k, v, bias = attention_operands(cfg, blk.qkv[...], h, rope, rel)
  att = layers.attention(q, k, v, causal=cfg.causal, bias_HLL=bias)
  dt = jnp.dtype(cfg.compute_dtype)
  return jnp.einsum("blhk,hkd->bld", att, blk.attn_out[...].astype(dt), preferred_element_type=jnp.float32)


def run_stack(blocks: DitBlocks | PlaidBlocks, x_BLD: jax.Array, c_BC: jax.Array | None, rope: tuple, *,
              unroll: bool = False) -> jax.Array:
  """The blocks in order: `nnx.scan` over the "layers" axis of their parameters, each under `nnx.remat`."""
  cfg = blocks.cfg

  def one(x, blk):
    return blk.layer(x, c_BC, rope)

  if cfg.remat:
    one = nnx.remat(one, policy=REMAT_POLICIES[cfg.remat_policy])
  scan = nnx.scan(one, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, unroll=cfg.num_layers if unroll else 1,
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
  return scan(x_BLD, blocks)


class Denoiser(nnx.Module):
  """Input layer, conditioning MLP, blocks and output head; the parameter names are the checkpoint's."""

  def __init__(self, cfg: model_config.ModelConfig, *, key: jax.Array, output_bias: jax.Array | None = None,
               token_vocab: int | None = None):
    """`token_vocab` builds a token-input model with that many input ids."""
    keys = iter(jax.random.split(key, 8))
    if cfg.width % cfg.num_heads:
      raise ValueError(f"model.width={cfg.width} is not divisible by model.num_heads={cfg.num_heads}.")
    d, c, e, v = cfg.width, cfg.cond_dim, cfg.embed_dim, cfg.vocab_size
    self.cfg = cfg
    self.blocks = (PlaidBlocks if cfg.block == "plaid" else DitBlocks)(cfg, keys)
    if token_vocab:
      self.tok_embed = layers.normal(next(keys), (token_vocab, d), d**-0.5, ("vocab", "embed"))
    else:
      k_in = next(keys)
      self.in_proj = layers.normal(k_in, (e, d), e**-0.5, (None, "embed"))
      self.sc_proj = layers.zeros((e, d), (None, "embed"))
      if cfg.input_posterior:
        # A table that embeds each position's single-position token posterior (see `apply`).
        self.in_post = layers.normal(jax.random.fold_in(k_in, 1), (v, d), d**-0.5, ("vocab", "embed"))
    if cfg.block == "plaid":
      self.cond_proj = layers.zeros((2 * cfg.cond_freqs, d), (None, "embed"))
    else:
      f = 2 * cfg.cond_freqs
      self.cond_w1 = layers.normal(next(keys), (f, c), f**-0.5, (None, None))
      self.cond_b1 = layers.zeros((c,), (None,))
      self.cond_w2 = layers.normal(next(keys), (c, c), c**-0.5, (None, None))
      self.cond_b2 = layers.zeros((c,), (None,))
      self.final_adaln_w = layers.zeros((c, 2 * d), (None, None))
      self.final_adaln_b = layers.zeros((2 * d,), (None,))
    head_key = next(keys)  # drawn whatever the head's init, so that the switch changes nothing else
    self.final_ln = layers.ones((d,), (None,))
    if cfg.head_init_scale == 0 or cfg.block == "plaid":
      self.out_w = layers.zeros((d, v), ("embed", "vocab"))  # DiT's zero readout
    else:  # N(0, (scale / sqrt(d))^2): a non-zero readout from the start
      self.out_w = layers.normal(head_key, (d, v), cfg.head_init_scale * d**-0.5, ("embed", "vocab"))
    if output_bias is None:
      self.out_b = layers.zeros((v,), ("vocab",))
    elif output_bias.shape != (v,):
      raise ValueError(f"output bias has shape {output_bias.shape}, expected ({v},).")
    else:
      self.out_b = layers.fixed(output_bias, ("vocab",))

  def __call__(self, z_BLE: jax.Array, cond_B: jax.Array, x_sc_BLE: jax.Array, alpha2_B: jax.Array,
               sigma2_B: jax.Array, *, posterior_BLV: jax.Array | None = None, unroll: bool = False) -> jax.Array:
    """Network logits [B, L, V] (before the output prior) from a noisy embedding sequence.

    With `cfg.input_posterior`, `posterior_BLV` (each position's token posterior
    given its own z_t alone) is embedded by a V x D table and added to h_0.
    """
    return self.trunk(self.inputs(z_BLE, x_sc_BLE, alpha2_B, sigma2_B, posterior_BLV=posterior_BLV), cond_B,
                      unroll=unroll)

  def inputs(self, z_BLE: jax.Array, x_sc_BLE: jax.Array, alpha2_B: jax.Array, sigma2_B: jax.Array, *,
             posterior_BLV: jax.Array | None = None) -> jax.Array:
    """h_0 [B, L, D]: the scaled noisy embeddings and the self-conditioning input, projected to the width."""
    cfg = self.cfg
    dt = jnp.dtype(cfg.compute_dtype)
    e = cfg.embed_dim
    scale_B = jax.lax.rsqrt(alpha2_B / e + sigma2_B)
    u = z_BLE * scale_B[:, None, None]
    x = layers.dense(u, self.in_proj[...], dtype=dt) + layers.dense(x_sc_BLE * math.sqrt(e), self.sc_proj[...],
                                                                    dtype=dt)
    if cfg.input_posterior:
      x = x + layers.dense(posterior_BLV, self.in_post[...], dtype=dt)
    return x

  def tokens(self, tokens_BL: jax.Array, cond_B: jax.Array, *, unroll: bool = False) -> jax.Array:
    """Network logits [B, L, V] from input token ids (token-input models)."""
    return self.trunk(jnp.take(self.tok_embed[...], tokens_BL, axis=0), cond_B, unroll=unroll)

  def trunk(self, x_BLD: jax.Array, cond_B: jax.Array, *, unroll: bool = False) -> jax.Array:
    """Blocks and output layer: from the input activations h_0 [B, L, D] to logits [B, L, V]."""
    cfg = self.cfg
    seq_len = x_BLD.shape[1]
    if seq_len > cfg.max_seq_len:
      raise ValueError(f"sequence length {seq_len} exceeds model.max_seq_len={cfg.max_seq_len}.")
    dt = jnp.dtype(cfg.compute_dtype)
    rope = layers.rope_tables(seq_len, cfg.head_dim, cfg.rope_base)
    emb = layers.sinusoidal(cond_B, cfg.cond_freqs)
    if cfg.block == "plaid":
      x_BLD = x_BLD + layers.dense(emb, self.cond_proj[...])[:, None, :]
      c = None
    else:
      c = jax.nn.silu(layers.dense(emb, self.cond_w1[...], self.cond_b1[...]))
      c = jax.nn.silu(layers.dense(c, self.cond_w2[...], self.cond_b2[...]))
    x_BLD = partitioning.constrain(x_BLD, ACT)
    x = run_stack(self.blocks, x_BLD, c, rope, unroll=unroll)

    if cfg.block == "plaid":
      h = layers.layer_norm(x, self.final_ln[...])
      out = layers.dense(h, self.out_w[...], self.out_b[...], dtype=jnp.float32)
      return partitioning.constrain(out, ("batch", None, "vocab"))
    shift, scale = jnp.split(layers.dense(c, self.final_adaln_w[...], self.final_adaln_b[...]), 2, axis=-1)
    h = layers.modulate(layers.layer_norm(x, self.final_ln[...]), shift, scale)
    return partitioning.constrain(layers.dense(h, self.out_w[...], self.out_b[...], dtype=dt), ("batch", None, "vocab"))
