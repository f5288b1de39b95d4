"""Information-loss curves: what the denoiser still knows at each noise level.

On held-out rows and a grid of t in [0, 1], with self-conditioning as in the bound:
  l(t)   = -1/2 SNR'(t) mean_l ||e_l - x_hat_l(z_t)||^2   diffusion loss per token (integrates to L_diff)
  CE(t)  = mean_l -log softmax(logits(z_t))_l[x_l]       token cross-entropy (CE(0) is L_recon)
  err(t) = mean_l [argmax logits(z_t)_l != x_l]          argmax decoding error rate
The paper's claim (method.md 1.7): with the learned schedule l(t) is nearly
constant and CE(t) nearly linear in t; `summarise` reports the R^2 of a linear
fit of CE(t) and the coefficient of variation of l(t).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from replaid_jax import paths
from replaid_jax.diffusion import elbo
from replaid_jax.eval import bound as bound_lib
from replaid_jax.models import embedding
from replaid_jax.models import model as model_lib
from replaid_jax.models import noise_schedule


def terms_at(params: dict, tokens_BL: jax.Array, t_B: jax.Array, key: jax.Array, *,
             model_cfg: model_lib.ModelConfig, cfg: elbo.DiffusionConfig, selfcond: bool = True
             ) -> dict[str, jax.Array]:
  """Per row at its time t: diffusion loss l(t), CE(t) and argmax error rate, each [B] (nats or fraction per token).

  Written independently of `elbo.per_example_terms` (same model, own assembly),
  so the two can check each other. `selfcond=False` skips the first pass (x_sc = 0).
  """
  bounds = params["bounds"]
  gt, dgt = noise_schedule.gamma_tilde_and_deriv(params["schedule"], t_B, cfg.schedule)
  g = noise_schedule.gamma(bounds, gt)
  gp = noise_schedule.gamma_prime(bounds, dgt)
  e = embedding.lookup(embedding.normalized(params["embedding"]), tokens_BL)
  alpha2, sigma2 = noise_schedule.alpha_sigma2(g)
  eps = jax.random.normal(key, e.shape, jnp.float32)
  z = jnp.sqrt(alpha2)[:, None, None] * e + jnp.sqrt(sigma2)[:, None, None] * eps
  run = functools.partial(model_lib.predict, params, z, g, cfg=model_cfg, prior_scale=1.0, t_B=t_B,
                          use_output_prior=cfg.output_prior)
  x_sc = run(jnp.zeros_like(z))[1] if selfcond else jnp.zeros_like(z)
  logits, x_hat = run(x_sc)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  ce = -jnp.mean(jnp.take_along_axis(logp, tokens_BL[..., None], axis=-1)[..., 0], axis=-1)
  err = jnp.mean((jnp.argmax(logits, axis=-1) != tokens_BL).astype(jnp.float32), axis=-1)
  diffusion = 0.5 * jnp.exp(-g) * gp * jnp.mean(jnp.sum(jnp.square(e - x_hat), axis=-1), axis=-1)
  return {"diffusion": diffusion, "ce": ce, "error": err}


def make_terms_fn(*, model_cfg, cfg, params_sharding=None, batch_sharding=None, selfcond: bool = True):
  """Jitted (params, tokens [B, L], t [B], key) -> terms_at(...)."""
  fn = functools.partial(terms_at, model_cfg=model_cfg, cfg=cfg, selfcond=selfcond)
  if params_sharding is None:
    return jax.jit(fn)
  return jax.jit(fn, in_shardings=(params_sharding, batch_sharding, None, None))


def compute(terms_fn, params, tokens: np.ndarray, key: jax.Array, *, num_points: int, batch_size: int,
            put=None, progress=None) -> dict:
  """Means and standard errors over the rows of `tokens` at t = linspace(0, 1, num_points)."""
  put = put or jnp.asarray
  n = tokens.shape[0]
  grid = np.linspace(0.0, 1.0, num_points)
  out = {name: {"mean": [], "stderr": []} for name in ("diffusion", "ce", "error")}
  for j, t in enumerate(grid):
    rows = {name: [] for name in out}
    for b, chunk, valid in bound_lib.padded_batches(tokens, batch_size):
      k = jax.random.fold_in(jax.random.fold_in(key, j), b)
      res = jax.device_get(terms_fn(params, put(chunk), jnp.full((batch_size,), t, jnp.float32), k))
      for name in rows:
        rows[name].append(np.asarray(res[name], np.float64)[:valid])
    for name, parts in rows.items():
      v = np.concatenate(parts)
      out[name]["mean"].append(float(v.mean()))
      out[name]["stderr"].append(float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan"))
    if progress is not None:
      progress(j + 1, num_points)
  return {"t": grid.tolist(), "num_sequences": int(n), "seq_len": int(tokens.shape[1]), **out}


def linear_fit(x: np.ndarray, y: np.ndarray) -> dict:
  """Least-squares y = a + b x and its R^2."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  b, a = np.polyfit(x, y, 1)
  resid = y - (a + b * x)
  total = float(np.sum(np.square(y - y.mean())))
  r2 = 1.0 - float(np.sum(np.square(resid))) / total if total > 0 else 1.0
  return {"intercept": float(a), "slope": float(b), "r2": r2}


def summarise(curves: dict) -> dict:
  """R^2 of a linear fit of CE(t); spread of l(t); the trapezoid integral of l(t) (an estimate of L_diff)."""
  t = np.asarray(curves["t"])
  ell = np.asarray(curves["diffusion"]["mean"])
  return {
      "ce_linear_fit": linear_fit(t, curves["ce"]["mean"]),
      "diffusion_mean": float(ell.mean()),
      "diffusion_cv": float(ell.std() / ell.mean()) if ell.mean() > 0 else float("nan"),
      "diffusion_integral_trapezoid": float(np.trapezoid(ell, t)),
  }


def save_plot(curves: dict, summary: dict, path: str, title: str) -> str:
  """Three panels against t: l(t), CE(t) with its linear fit, argmax error rate."""
  plt = paths.pyplot()

  t = np.asarray(curves["t"])
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=100)
  panels = (("diffusion", "diffusion loss l(t), nats/token"), ("ce", "CE(t), nats/token"),
            ("error", "argmax error rate"))
  for ax, (name, label) in zip(axes, panels):
    mean, se = np.asarray(curves[name]["mean"]), np.asarray(curves[name]["stderr"])
    ax.plot(t, mean, marker=".", label=label)
    ax.fill_between(t, mean - 1.96 * se, mean + 1.96 * se, alpha=0.25)
    ax.set_xlabel("t")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  fit = summary["ce_linear_fit"]
  axes[1].plot(t, fit["intercept"] + fit["slope"] * t, "--", color="gray", label=f"linear fit, R²={fit['r2']:.3f}")
  axes[1].legend(loc="best", fontsize=8)
  axes[0].set_title(f"CV of l(t) = {summary['diffusion_cv']:.2f}", fontsize=9)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  paths.save_figure(fig, path)
  plt.close(fig)
  return path
