"""Learned token embeddings whose rows are renormalised to unit norm on every use."""

from flax import nnx
import jax
import jax.numpy as jnp

from replaid_jax.models import layers

_EPS = 1e-8


class Embedding(nnx.Module):
  """The table E~ [V, d_e], drawn N(0, 1) and normalised once; `normalized` is applied again on every use."""

  def __init__(self, vocab_size: int, embed_dim: int, *, key: jax.Array):
    raw = jax.random.normal(key, (vocab_size, embed_dim), jnp.float32)
    self.table = layers.fixed(raw / (jnp.linalg.norm(raw, axis=-1, keepdims=True) + _EPS), ("vocab", None))

  def __call__(self) -> jax.Array:
    return normalized({"table": self.table[...]})


def normalized(p: dict[str, jax.Array]) -> jax.Array:
  """E = E~ / (||E~_row|| + 1e-8): [V, d_e] with unit-norm rows."""
  table = p["table"].astype(jnp.float32)
  return table / (jnp.linalg.norm(table, axis=-1, keepdims=True) + _EPS)


def lookup(table_VE: jax.Array, tokens_BL: jax.Array) -> jax.Array:
  """e = xE: [B, L, d_e]."""
  return jnp.take(table_VE, tokens_BL, axis=0)
