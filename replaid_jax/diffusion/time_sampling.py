"""Which rows of a batch do what: reconstruction rows, diffusion times, self-conditioning.

A `Plan` is built once per optimizer step over the *global* batch (under jit)
and sliced into accumulation micro-batches, so every device and micro-batch
sees one low-discrepancy lattice of times.
"""

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Plan:
  t: jax.Array  # [B] float32 diffusion time; 0 on reconstruction rows
  is_recon: jax.Array  # [B] bool, rows that give the reconstruction term at t = 0
  is_sc: jax.Array  # [B] bool, self-conditioned rows: rows r with r % sc_period == sc_offset
  sc_offset: jax.Array  # [] int32
  sc_period: int = flax.struct.field(pytree_node=False, default=0)  # 0: no self-conditioning

  def micro(self, i: jax.Array | int, size: int) -> "Plan":
    """Rows [i*size, (i+1)*size) as a plan of their own (size must be a multiple of sc_period)."""
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, i * size, size)
    return Plan(take(self.t), take(self.is_recon), take(self.is_sc), self.sc_offset, self.sc_period)

  def tiled(self, k: int) -> "Plan":
    """The plan's rows repeated k times in blocks (a row's role and time recur every B rows)."""
    if self.sc_period and self.t.shape[0] % self.sc_period:
      raise ValueError(f"a plan of {self.t.shape[0]} rows does not tile with self-conditioning period {self.sc_period}")
    tile = lambda x: jnp.tile(x, k)
    return Plan(tile(self.t), tile(self.is_recon), tile(self.is_sc), self.sc_offset, self.sc_period)


def lattice(k: jax.Array | int, u: jax.Array, n: int) -> jax.Array:
  """t = (k + u) / n: the point at offset u in [0, 1) of cell k of the n equal cells of [0, 1).

  The one lattice of the project: training draws one u for cells 0..n-1 over the batch
  (`low_discrepancy`); the evaluators draw one u per sequence and visit the cells k in turn.
  """
  return (k + u) / n


def low_discrepancy(u: jax.Array, n: int) -> jax.Array:
  """t_i = (i + u) / n, i = 0..n-1: one point in each of n equal cells of [0, 1)."""
  return lattice(jnp.arange(n, dtype=jnp.float32), u, n)


def selfcond_period(fraction: float) -> int:
  """0 for no self-conditioning, else n with fraction = 1/n."""
  if fraction == 0:
    return 0
  period = round(1.0 / fraction)
  if period < 1 or abs(1.0 / period - fraction) > 1e-9:
    raise ValueError(f"selfcond_fraction must be 0 or 1/n for an integer n, got {fraction}.")
  return period


def train_plan(key: jax.Array, batch: int, n_recon: jax.Array, sc_period: int) -> Plan:
  """The first n_recon rows reconstruct; the rest share one lattice of times.

  n_recon may be traced (the adaptive split changes it from step to step); the
  lattice then has B - n_recon cells, the rows in order.
  """
  k_u, k_sc = jax.random.split(key)
  u = jax.random.uniform(k_u, (), jnp.float32)
  idx = jnp.arange(batch)
  is_recon = idx < n_recon
  n_diff = (batch - n_recon).astype(jnp.float32)
  t = jnp.where(is_recon, 0.0, (idx - n_recon + u) / n_diff).astype(jnp.float32)
  if sc_period:
    offset = jax.random.randint(k_sc, (), 0, sc_period)
    is_sc = idx % sc_period == offset
  else:
    offset = jnp.zeros((), jnp.int32)
    is_sc = jnp.zeros((batch,), bool)
  return Plan(t, is_recon, is_sc, offset.astype(jnp.int32), sc_period)


def eval_plan(t_B: jax.Array, *, recon: bool) -> Plan:
  """Every row self-conditioned (period 1); all rows reconstruct or all diffuse."""
  batch = t_B.shape[0]
  return Plan(
      t=t_B.astype(jnp.float32),
      is_recon=jnp.full((batch,), recon),
      is_sc=jnp.ones((batch,), bool),
      sc_offset=jnp.zeros((), jnp.int32),
      sc_period=1,
  )
