"""The RePlaid model: embeddings, noise schedule, bounds and denoiser, as one `nnx.Module`.

Training, evaluation and sampling work on its parameters as a pytree of arrays
(nested dicts named like the modules' attributes, which is also the checkpoint
layout). A network's structure (graph definition, shapes, logical axis names) is
kept once per process and configuration: `init` keeps that of the module it
builds (the train loop traces it once, for the train state's shardings and
values), and `abstract` returns it, or traces the init with `nnx.eval_shape`
when the process has built none (inference, evaluation).

`predict` is the denoiser as the ELBO and the samplers see it: from (z_t, gamma_t)
and the self-conditioning input to the logits (network logits plus the output
prior) and the expected embedding x_hat = softmax(logits) E (categorical
reparameterisation).
"""

import dataclasses
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp

from replaid_jax.models import denoiser
from replaid_jax.models import embedding
from replaid_jax.models import model_config
from replaid_jax.models import noise_schedule

ModelConfig = model_config.ModelConfig


class Model(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, gamma_0: float, gamma_1: float, key: jax.Array,
               output_bias: jax.Array | None = None):
    k_emb, k_sched, k_den = jax.random.split(key, 3)
    self.embedding = embedding.Embedding(cfg.vocab_size, cfg.embed_dim, key=k_emb)
    self.schedule = noise_schedule.NoiseSchedule(cfg.schedule_hidden, key=k_sched)
    self.bounds = noise_schedule.Bounds(gamma_0, gamma_1)
    self.denoiser = denoiser.Denoiser(cfg, key=k_den, output_bias=output_bias)


@dataclasses.dataclass(frozen=True)
class Abstract:
  """A module's structure without values: `graphdef` to rebuild it from parameters; `shapes` (ShapeDtypeStructs) and
  `axes` (logical axis names) in the tree of its parameters."""

  graphdef: Any
  shapes: dict
  axes: dict


# The structure of each network this process has built or traced, by (module class, config). Graph definitions,
# shapes and axis names only: no arrays, and no tracers, also when the init was traced under jit.
_ABSTRACTS: dict[tuple[type, Any], Abstract] = {}


def parameters(module: nnx.Module) -> tuple[dict, dict]:
  """(parameter pytree, logical axes in the same tree) of a module."""
  state = nnx.state(module, nnx.Param)
  axes = jax.tree.map(tuple, nnx.get_partition_spec(state))
  return nnx.to_pure_dict(state), nnx.to_pure_dict(axes)


def abstract_of(build: Callable[[], nnx.Module]) -> Abstract:
  """`build` traced by `nnx.eval_shape`: nothing is drawn or allocated."""
  module = nnx.eval_shape(build)
  shapes, axes = parameters(module)
  return Abstract(nnx.graphdef(module), shapes, axes)


def built(module: nnx.Module, cfg: Any) -> tuple[dict, dict]:
  """(parameters, logical axes) of a module built with values (arrays, or tracers under jit), whose structure is
  kept as that of its class and `cfg`: `cached` then returns it without tracing the init again."""
  params, axes = parameters(module)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  _ABSTRACTS.setdefault((type(module), cfg), Abstract(nnx.graphdef(module), shapes, axes))
  return params, axes


def cached(cls: type, cfg: Any, build: Callable[[], nnx.Module]) -> Abstract:
  """The structure of the `cls` network of `cfg`: the one `built` kept, else `build` (which makes a `cls`) traced by
  `nnx.eval_shape`, once per process. Values that do not change the structure (keys, bounds, an output bias) do
  not matter here."""
  key = (cls, cfg)
  if key not in _ABSTRACTS:
    _ABSTRACTS[key] = abstract_of(build)
  return _ABSTRACTS[key]


def count(params: dict) -> int:
  """Number of parameters in a parameter pytree."""
  return int(sum(x.size for x in jax.tree.leaves(params)))


def bind(graphdef: Any, params: dict) -> nnx.Module:
  """The module of `graphdef` holding `params` (arrays or tracers): the boundary from the pure maths to the modules."""
  return nnx.merge(graphdef, params)


def abstract(cfg: ModelConfig) -> Abstract:
  """The RePlaid model of `cfg`: the structure `init` kept, else its init traced once per process."""
  return cached(Model, cfg, lambda: Model(cfg, gamma_0=0.0, gamma_1=1.0, key=jax.random.key(0)))


def init(
    key: jax.Array,
    cfg: ModelConfig,
    *,
    gamma_0: float,
    gamma_1: float,
    output_bias: jax.Array | None = None,
) -> tuple[dict, dict]:
  """Returns (params, logical axes) with the same tree structure; the model's structure is kept for `abstract`."""
  return built(Model(cfg, gamma_0=gamma_0, gamma_1=gamma_1, key=key, output_bias=output_bias), cfg)


def _select_detached(mask_B: jax.Array | None, fn, table_VE: jax.Array) -> jax.Array:
  """fn(E), with E detached for the examples where mask is set."""
  live = fn(table_VE)
  if mask_B is None:
    return live
  dead = fn(jax.lax.stop_gradient(table_VE))
  return jnp.where(mask_B[:, None, None], dead, live)


def predict(
    params: dict,
    z_BLE: jax.Array,
    gamma_B: jax.Array,
    x_sc_BLE: jax.Array,
    *,
    cfg: ModelConfig,
    prior_scale: jax.Array | float,
    t_B: jax.Array | None = None,
    use_output_prior: bool = True,
    detach_embeddings_B: jax.Array | None = None,
    unroll: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """(logits [B, L, V], x_hat [B, L, d_e]) at noise level gamma.

  The noise level gamma is the model's one input besides z and x_sc: it sets
  the input scaling, the output prior and the adaLN conditioning. `t_B` serves
  only the `model.cond_input='t'` ablation, whose adaLN sees the time t with
  gamma(t) = gamma_B instead; such a model cannot be called without it.
  `detach_embeddings_B` marks examples whose output prior and x_hat must not
  send gradient into the embedding matrix (self-conditioned training rows).
  """
  if cfg.cond_input == "t" and t_B is None:
    raise ValueError("this model was configured with model.cond_input='t' (adaLN on the time t, an ablation): "
                     "pass t_B, the time at which the schedule gives gamma_B")
  net = bind(abstract(cfg).graphdef, params)
  table = net.embedding()
  alpha2, sigma2 = noise_schedule.alpha_sigma2(gamma_B)
  cond = t_B if cfg.cond_input == "t" else gamma_B
  # log N(z; alpha e_v, sigma^2 I) = (alpha / sigma^2) z.e_v + const for unit-norm e_v.
  coef_B = jnp.sqrt(alpha2) / sigma2
  if use_output_prior or cfg.input_posterior:
    z_dot_e = _select_detached(detach_embeddings_B, lambda tab: jnp.einsum("ble,ve->blv", z_BLE, tab), table)
  posterior = jax.nn.softmax(coef_B[:, None, None] * z_dot_e, axis=-1) if cfg.input_posterior else None
  logits = net.denoiser(z_BLE, cond, x_sc_BLE, alpha2, sigma2, posterior_BLV=posterior, unroll=unroll)
  if use_output_prior:
    logits = logits + (prior_scale * coef_B)[:, None, None] * z_dot_e
  probs = jax.nn.softmax(logits, axis=-1)
  x_hat = _select_detached(detach_embeddings_B, lambda tab: jnp.einsum("blv,ve->ble", probs, tab), table)
  return logits, x_hat
