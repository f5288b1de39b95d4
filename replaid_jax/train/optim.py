"""AdamW with per-module parameter groups and one warm-up + decay shape.

Groups (top-level keys of the parameter tree): the backbone ("denoiser"), the
embedding matrix, the noise-schedule MLP and the gamma bounds, each with its
own peak learning rate and weight decay. Backbone weight decay touches matrices
only. Frozen groups (fixed schedule, fixed bounds) get no update at all.
"""

import jax
import optax

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


def _decay_mask(params):
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make(cfg, *, total_steps: int, frozen: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """`cfg` is an OptimConfig; `frozen` lists group names that must not move."""
  def adamw(peak: float, wd: float, mask=None):
    sched = lr_schedule(peak, warmup=cfg.warmup_steps, total=total_steps, decay=cfg.decay,
                        final_fraction=cfg.final_lr_fraction)
    return optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=mask)

  transforms = {
      "backbone": adamw(cfg.lr, cfg.weight_decay, _decay_mask),
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
