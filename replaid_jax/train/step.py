"""The train state and the pure train step.

`TrainState` holds arrays only. `train_step` is a pure function of the state and
a global batch; every random number comes from fold_in(base_key, step), so a
resumed run repeats an uninterrupted one exactly.

A step whose loss, gradient norm or update norm is not finite is not applied:
the parameters, EMA, optimizer state and loss statistics stay as they were (only
the step counter advances, past the offending batch), and the metrics carry
`nonfinite` = 1. A non-finite train state therefore never exists; the loop reads
the flag with the metrics it fetches anyway and decides whether to stop.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from replaid_jax.diffusion import elbo
from replaid_jax.objectives import base as objectives_base


@flax.struct.dataclass
class LossStats:
  """Bias-corrected EMAs of the per-example reconstruction and diffusion terms and their squares."""

  recon_m1: jax.Array
  recon_m2: jax.Array
  diff_m1: jax.Array
  diff_m2: jax.Array
  weight: jax.Array  # 1 - decay^n: divides the raw EMAs into unbiased ones

  @classmethod
  def zeros(cls) -> "LossStats":
    z = jnp.zeros((), jnp.float32)
    return cls(z, z, z, z, z)

  def update(self, terms: elbo.Terms, decay: float) -> "LossStats":
    r = terms.is_recon.astype(jnp.float32)
    d = 1.0 - r
    nr, nd = jnp.maximum(r.sum(), 1.0), jnp.maximum(d.sum(), 1.0)
    ema = lambda old, new: decay * old + (1.0 - decay) * new
    return LossStats(
        recon_m1=ema(self.recon_m1, jnp.sum(r * terms.recon) / nr),
        recon_m2=ema(self.recon_m2, jnp.sum(r * terms.recon**2) / nr),
        diff_m1=ema(self.diff_m1, jnp.sum(d * terms.diffusion) / nd),
        diff_m2=ema(self.diff_m2, jnp.sum(d * terms.diffusion**2) / nd),
        weight=ema(self.weight, 1.0),
    )

  def stds(self) -> tuple[jax.Array, jax.Array]:
    w = jnp.maximum(self.weight, 1e-12)
    var = lambda m1, m2: jnp.maximum(m2 / w - (m1 / w) ** 2, 0.0)
    return jnp.sqrt(var(self.recon_m1, self.recon_m2)), jnp.sqrt(var(self.diff_m1, self.diff_m2))


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  loss_stats: LossStats


def init_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=jax.tree.map(jnp.copy, params),
      opt_state=tx.init(params),
      loss_stats=LossStats.zeros(),
  )


def train_step(
    state: TrainState,
    tokens_BL: jax.Array,
    base_key: jax.Array,
    *,
    tx: optax.GradientTransformation,
    objective: objectives_base.Objective,
    grad_accum_steps: int,
    ema_decay: float,
    draws_per_sequence: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step of `objective` (see `replaid_jax.objectives`) on a global batch.

  The objective's per-step setup (times, row roles, weights) is drawn once for
  the global batch and sliced into the accumulation micro-batches, whose losses
  and gradients add up to the step's.

  With `draws_per_sequence` K > 1 the batch is tiled K times before the setup,
  so each sequence is estimated at K times of the lattice (spread 1/K apart)
  with independent noise: the same data, K times the estimator draws and the
  compute (a variance-reduction study switch; K = 1 is the plain estimator).
  """
  if draws_per_sequence > 1:
    tokens_BL = jnp.tile(tokens_BL, (draws_per_sequence, 1))
  batch = tokens_BL.shape[0]
  k_setup, k_noise = jax.random.split(jax.random.fold_in(base_key, state.step))
  setup = objective.setup(state, batch, k_setup)
  loss, terms, grads = _loss_and_grads(state, tokens_BL, setup, k_noise, objective, grad_accum_steps)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if ema_decay > 0:
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
  else:
    ema = params
  grad_norm = optax.tree_utils.tree_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree_utils.tree_norm(updates))
  keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = TrainState(
      step=state.step + 1,
      params=keep_old(params, state.params),
      ema_params=keep_old(ema, state.ema_params),
      opt_state=keep_old(opt_state, state.opt_state),
      loss_stats=keep_old(objective.update_stats(state.loss_stats, terms), state.loss_stats),
  )
  metrics = {"loss": loss, **objective.metrics(terms, setup, params), "grad_norm": grad_norm,
             "nonfinite": (~finite).astype(jnp.int32),
             **{f"grad_norm_{k}": optax.tree_utils.tree_norm(v) for k, v in grads.items()}}
  return new_state, metrics


def _loss_and_grads(state: TrainState, tokens_BL: jax.Array, setup: Any, k_noise: jax.Array,
                    objective: objectives_base.Objective, grad_accum_steps: int) -> tuple[jax.Array, Any, Any]:
  """The loss, per-example terms and gradients of the global batch, over `grad_accum_steps` micro-batches.

  With accumulation, micro-batch i draws its noise from fold_in(k_noise, i);
  the losses and gradients are summed and the terms laid out as for one batch.
  """
  if grad_accum_steps == 1:
    return objective.loss_and_grads(state.params, tokens_BL, setup, k_noise)
  batch = tokens_BL.shape[0]
  micro = batch // grad_accum_steps
  tokens_ABL = tokens_BL.reshape(grad_accum_steps, micro, -1)

  def one(carry, i):
    loss_acc, grads_acc = carry
    loss_i, terms_i, grads_i = objective.loss_and_grads(
        state.params, tokens_ABL[i], setup.micro(i, micro), jax.random.fold_in(k_noise, i))
    return (loss_acc + loss_i, jax.tree.map(jnp.add, grads_acc, grads_i)), terms_i

  zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
  (loss, grads), terms_A = jax.lax.scan(one, zero, jnp.arange(grad_accum_steps))
  terms = jax.tree.map(lambda x: x.reshape((batch,) + x.shape[2:]), terms_A)
  return loss, terms, grads
