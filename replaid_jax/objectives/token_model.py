"""The shared DiT read through a token table: the network of the AR and masked-diffusion baselines.

Input ids 0..V-1 are tokens; id V is the extra symbol of the objective (BOS
for AR, [MASK] for masked diffusion), so the table has V + 1 rows while the
output layer predicts the V tokens only.
"""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp

from replaid_jax.models import denoiser
from replaid_jax.models import model as model_lib
from replaid_jax.models import model_config


def extra_id(vocab_size: int) -> int:
  return vocab_size


class TokenNetwork(nnx.Module):
  """The denoiser with a V + 1-row input table."""

  def __init__(self, cfg: model_config.ModelConfig, *, key: jax.Array, output_bias: jax.Array | None = None):
    self.denoiser = denoiser.Denoiser(cfg, key=key, output_bias=output_bias, token_vocab=cfg.vocab_size + 1)


def init(key: jax.Array, model_cfg, output_bias: jax.Array | None, *, causal: bool) -> tuple[dict, dict]:
  """(params, logical axes); the network's structure is kept for `abstract`."""
  cfg = config(model_cfg, causal=causal)
  return model_lib.built(TokenNetwork(cfg, key=key, output_bias=output_bias), cfg)


def abstract(cfg: model_config.ModelConfig) -> model_lib.Abstract:
  """The token network of `cfg`: the structure `init` kept, else its init traced once per process."""
  return model_lib.cached(TokenNetwork, cfg, lambda: TokenNetwork(cfg, key=jax.random.key(0)))


def config(model_cfg: model_config.ModelConfig, *, causal: bool) -> model_config.ModelConfig:
  return dataclasses.replace(model_cfg, causal=causal)


def logits(params: dict, inputs_BL: jax.Array, cond_B: jax.Array, model_cfg, *, causal: bool,
           unroll: bool = False) -> jax.Array:
  """Logits [B, L, V] in float32."""
  cfg = config(model_cfg, causal=causal)
  out = model_lib.bind(abstract(cfg).graphdef, params).denoiser.tokens(inputs_BL, cond_B, unroll=unroll)
  return out.astype(jnp.float32)


def token_nll(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
  """-log softmax(logits)[target] per position, [B, L]."""
  logp = jax.nn.log_softmax(logits_BLV, axis=-1)
  return -jnp.take_along_axis(logp, targets_BL[..., None], axis=-1)[..., 0]
