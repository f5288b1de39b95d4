"""Learned token embeddings whose rows are renormalised to unit norm on every use."""

import jax
import jax.numpy as jnp

from replaid_jax.models import params as params_lib

_EPS = 1e-8


def init(key: jax.Array, vocab_size: int, embed_dim: int) -> dict[str, params_lib.Param]:
  """E~ ~ N(0, 1), stored unnormalised; `normalized` is applied on every use."""
  raw = jax.random.normal(key, (vocab_size, embed_dim), jnp.float32)
  raw = raw / (jnp.linalg.norm(raw, axis=-1, keepdims=True) + _EPS)
  return {"table": params_lib.Param(raw, ("vocab", None))}


def normalized(p: dict[str, jax.Array]) -> jax.Array:
  """E = E~ / (||E~_row|| + 1e-8): [V, d_e] with unit-norm rows."""
  table = p["table"].astype(jnp.float32)
  return table / (jnp.linalg.norm(table, axis=-1, keepdims=True) + _EPS)


def lookup(table_VE: jax.Array, tokens_BL: jax.Array) -> jax.Array:
  """e = xE: [B, L, d_e]."""
  return jnp.take(table_VE, tokens_BL, axis=0)
