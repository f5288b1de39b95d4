"""AdamW with per-module parameter groups and one warm-up + decay shape.

Groups (top-level keys of the parameter tree): the backbone ("denoiser"), the
embedding matrix, the noise-schedule MLP and the gamma bounds, each with its
own peak learning rate and weight decay. Backbone weight decay touches matrices
only: parameters of rank 2 or more once the "layers" axis, on which the blocks'
parameters are stacked, is left out (so a stacked LayerNorm scale or bias is a
vector and is not decayed; a stacked weight matrix is). Frozen groups (fixed
schedule, fixed bounds) get no update at all.
"""

import jax
import optax

from replaid_jax import sharding

GROUPS = {"denoiser": "backbone", "embedding": "embedding", "schedule": "schedule", "bounds": "bounds"}


def lr_schedule(peak: float, *, warmup: int, total: int, decay: str, final_fraction: float) -> optax.Schedule:
  """Linear warm-up to `peak`, then cosine / linear decay to final_fraction * peak, or constant."""
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  rest = max(total - warmup, 1)
  end = peak * final_fraction
  if decay == "cosine":
    tail = optax.cosine_decay_schedule(peak, rest, alpha=final_fraction)
  elif decay == "linear":
    tail = optax.linear_schedule(peak, end, rest)
  elif decay == "constant":
    tail = optax.constant_schedule(peak)
  else:
    raise ValueError(f"unknown decay {decay!r}")
  return optax.join_schedules([warm, tail], [warmup])


STACK_AXIS = "layers"  # the logical axis the blocks' parameters are stacked on


def matrix_mask(axes):
  """The weight-decay mask of a parameter tree, from its logical axes (the same tree, a tuple of axis names per
  parameter): True where the parameter has two or more axes besides the "layers" stacking axis."""
  return jax.tree.map(lambda ax: sum(a != STACK_AXIS for a in ax) >= 2, axes, is_leaf=sharding.is_logical_axes)


def _decay_mask(axes):
  """A mask function for optax: it sees the parameters (with the other groups' leaves masked out) and looks each
  one up by its path in the mask built from `axes` (a tree, or a function returning one, called on first use)."""
  by_path = {}

  def mask(params):
    if not by_path:
      tree = axes() if callable(axes) else axes
      by_path.update((jax.tree_util.keystr(k), v)
                     for k, v in jax.tree_util.tree_flatten_with_path(matrix_mask(tree))[0])

    def one(path, _):
      name = jax.tree_util.keystr(path)
      if name not in by_path:
        raise ValueError(f"parameter {name} has no logical axes; the optimizer's weight-decay mask needs them")
      return by_path[name]
    return jax.tree_util.tree_map_with_path(one, params)
  return mask


def make(cfg, *, total_steps: int, axes, frozen: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """`cfg` is an OptimConfig; `axes` the parameters' logical axes (the model's `axes` tree, which sets the
  weight-decay mask), or a function returning them when the optimizer first needs them (after the model's init
  has been traced); `frozen` lists group names that must not move."""
  def adamw(peak: float, wd: float, mask=None):
    sched = lr_schedule(peak, warmup=cfg.warmup_steps, total=total_steps, decay=cfg.decay,
                        final_fraction=cfg.final_lr_fraction)
    return optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=mask)

  transforms = {
      "backbone": adamw(cfg.lr, cfg.weight_decay, _decay_mask(axes)),
      "embedding": adamw(cfg.embedding_lr, cfg.embedding_weight_decay),
      "schedule": adamw(cfg.schedule_lr, cfg.schedule_weight_decay),
      "bounds": adamw(cfg.bounds_lr, cfg.bounds_weight_decay),
  }
  for name in frozen:
    transforms[name] = optax.set_to_zero()
  labels = lambda params: {k: jax.tree.map(lambda _: GROUPS[k], v) for k, v in params.items()}
  chain = [optax.multi_transform(transforms, labels)]
  if cfg.grad_clip > 0:
    chain.insert(0, optax.clip_by_global_norm(cfg.grad_clip))
  return optax.chain(*chain)


def learning_rates(cfg, *, total_steps: int):
  """{group: schedule} for logging."""
  peaks = {"backbone": cfg.lr, "embedding": cfg.embedding_lr, "schedule": cfg.schedule_lr, "bounds": cfg.bounds_lr}
  return {k: lr_schedule(v, warmup=cfg.warmup_steps, total=total_steps, decay=cfg.decay,
                         final_fraction=cfg.final_lr_fraction) for k, v in peaks.items()}
