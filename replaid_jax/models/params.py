"""Parameters as plain pytrees, each leaf born with its logical sharding axes.

Models in this package are pure functions over nested dicts of arrays. An init
function builds a tree of `Param(value, axes)` leaves; `split` separates it into
the value tree (what training updates) and the axes tree (what
`replaid_jax.sharding` maps onto a device mesh).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


class Param(NamedTuple):
  value: jax.Array
  axes: tuple[str | None, ...]


def is_param(x: Any) -> bool:
  return isinstance(x, Param)


def split(tree: PyTree) -> tuple[PyTree, PyTree]:
  """Splits a tree of `Param` leaves into (values, logical axes)."""
  values = jax.tree.map(lambda p: p.value, tree, is_leaf=is_param)
  axes = jax.tree.map(lambda p: p.axes, tree, is_leaf=is_param)
  return values, axes


def normal(key: jax.Array, shape: tuple[int, ...], std: float, axes: tuple[str | None, ...]) -> Param:
  assert len(shape) == len(axes), (shape, axes)
  return Param(std * jax.random.normal(key, shape, jnp.float32), axes)


def zeros(shape: tuple[int, ...], axes: tuple[str | None, ...]) -> Param:
  assert len(shape) == len(axes), (shape, axes)
  return Param(jnp.zeros(shape, jnp.float32), axes)


def ones(shape: tuple[int, ...], axes: tuple[str | None, ...]) -> Param:
  assert len(shape) == len(axes), (shape, axes)
  return Param(jnp.ones(shape, jnp.float32), axes)


def count(values: PyTree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(values)))
