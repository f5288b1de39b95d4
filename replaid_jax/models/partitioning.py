"""Logical sharding annotations for activations, without knowledge of any mesh.

Model code calls `constrain(x, ("batch", None, "mlp"))` at the points where the
layout of an activation matters. Outside an `activation_rules` context (set up by
`replaid_jax.sharding` around tracing) this is the identity, so the maths stays
independent of devices; inside, the annotation becomes a sharding constraint
through the same logical-to-mesh rules as the parameters.
"""

import contextlib
from typing import Callable

import jax

_CONSTRAIN: list[Callable[[jax.Array, tuple], jax.Array]] = []


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
  if not _CONSTRAIN:
    return x
  return _CONSTRAIN[-1](x, logical_axes)


@contextlib.contextmanager
def activation_rules(fn: Callable[[jax.Array, tuple], jax.Array]):
  """Makes `constrain` apply `fn(x, logical_axes)` while the context is open (nesting allowed)."""
  _CONSTRAIN.append(fn)
  try:
    yield
  finally:
    _CONSTRAIN.pop()
