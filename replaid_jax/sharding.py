"""The only module that knows mesh axis names.

Model code labels parameter dimensions with logical names ("embed", "mlp",
"heads", "vocab", "layers", ...); config rules map logical names to mesh axes.
Names without a rule are replicated.
"""

import functools
import math
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from replaid_jax import errors
from replaid_jax.models import partitioning

PyTree = Any


def make_mesh(axes: tuple[str, ...], shape: tuple[int, ...], devices: list | None = None) -> Mesh:
  """A mesh over all (or the given) devices, laid out by `jax.make_mesh` along the accelerators' topology.

  One -1 in `shape` takes what is left. A shape without -1 that asks for fewer
  devices than there are uses the first ones (single-process runs only).
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  shape = list(shape)
  if shape.count(-1) > 1:
    raise errors.ConfigError(f"mesh.shape {tuple(shape)} may hold at most one -1.")
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    if n % rest:
      raise errors.ConfigError(f"mesh.shape {tuple(shape)} does not divide the {n} available devices.")
    shape[shape.index(-1)] = n // rest
  need = math.prod(shape)
  if need < n and jax.process_count() == 1:
    devices, n = devices[:need], need  # a fully specified smaller mesh uses the first devices
  if need != n:
    raise errors.ConfigError(f"mesh.shape {tuple(shape)} needs {need} devices; {n} are available.")
  return jax.make_mesh(tuple(shape), tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(axes),
                       devices=devices)


def logical_to_spec(axes: tuple[str | None, ...], rules: tuple[tuple[str, Any], ...], mesh: Mesh) -> PartitionSpec:
  """PartitionSpec for one array; a mesh axis is used at most once, size-1 axes are dropped."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in axes:
    target = table.get(name) if name is not None else None
    names = (target,) if isinstance(target, str) else tuple(target or ())
    names = tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
    used.update(names)
    out.append(None if not names else names[0] if len(names) == 1 else names)
  return PartitionSpec(*out)


def _fits(shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  """Drops the sharding of dimensions that the mesh axes do not divide."""
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    size = math.prod(mesh.shape[a] for a in names)
    out.append(entry if names and dim % size == 0 else None)
  return PartitionSpec(*out)


def is_logical_axes(x) -> bool:
  """True for one parameter's logical axes (a tuple of axis names or None): the leaves of an axes tree."""
  return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def param_shardings(values: PyTree, axes: PyTree, rules, mesh: Mesh) -> PyTree:
  """NamedShardings for a parameter tree (values may be arrays or ShapeDtypeStructs)."""
  def one(v, ax):
    return NamedSharding(mesh, _fits(v.shape, logical_to_spec(ax, rules, mesh), mesh))
  return jax.tree.map(one, values, axes, is_leaf=is_logical_axes)


def derived_shardings(fn, abstract_params: PyTree, params_sh: PyTree, mesh: Mesh) -> PyTree:
  """Shardings of `fn(params)`'s outputs (e.g. the optimizer state), from the parameters' shardings.

  `fn` is traced abstractly with the parameter shardings as part of the array
  types (an Explicit-axes copy of `mesh`), so every output that JAX derives from
  a parameter (Adam's moments, an EMA copy) carries that parameter's sharding;
  outputs made from nothing (step counters) are replicated. Only the abstract
  mesh is set around that trace (`jax.set_mesh` is refused under jit), so this
  also runs inside a jitted function, such as the train state's init.
  """
  explicit = Mesh(mesh.devices, mesh.axis_names, axis_types=(jax.sharding.AxisType.Explicit,) * len(mesh.axis_names))
  typed = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(explicit, sh.spec)),
                       abstract_params, params_sh)
  with jax.sharding.use_abstract_mesh(explicit.abstract_mesh):
    out = jax.eval_shape(fn, typed)
  return jax.tree.map(lambda o: NamedSharding(mesh, o.sharding.spec if o.sharding is not None else PartitionSpec()),
                      out)


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
  spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh, rules) -> int:
  """How many ways the batch dimension is split."""
  spec = logical_to_spec(("batch",), rules, mesh)
  entry = spec[0]
  names = (entry,) if isinstance(entry, str) else tuple(entry or ())
  return math.prod(mesh.shape[a] for a in names)


def constrain_fn(mesh: Mesh, rules):
  """(x, logical axes) -> x with the sharding the rules give those axes (dimensions they do not divide stay whole)."""
  def fn(x, logical_axes):
    spec = _fits(x.shape, logical_to_spec(logical_axes, rules, mesh), mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return fn


def with_activation_sharding(fn, mesh: Mesh, rules):
  """`fn` whose traced activations follow the logical rules on `mesh` (see models/partitioning.py)."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with partitioning.activation_rules(constrain_fn(mesh, rules)):
      return fn(*args, **kwargs)
  return wrapped


def specs_as_strings(shardings: PyTree) -> dict[str, str]:
  """{'path/to/param': 'PartitionSpec(...)'} for golden files and logs."""
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): str(s.spec) for path, s in flat}
