"""Per-noise-level diagnostics of a RePlaid model: where along the noise level it beats a context-free denoiser.

The diffusion loss written as an integral over the noise level,

  L_diff = int_{gamma_0}^{gamma_1} 1/2 exp(-gamma) mse(gamma) d gamma,
  mse(gamma) = E ||e - x_hat(z_gamma)||^2 (mean over positions),

does not depend on the schedule's shape. `denoiser_gain_by_level` splits it into
bins and compares it, bin by bin, with the same integral for the context-free
Bayes denoiser: each position's posterior under the unigram prior given its own
z alone, logits = log p(v) + (alpha / sigma^2) z.e_v, which is what the network
computes at initialisation (log-unigram output bias, zero head). A model "on
the plateau" has the context-free loss in every bin; the bins where it is lower
are where it uses context. Also: the separation of the embedding rows.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from replaid_jax import paths
from replaid_jax.diffusion import sampler
from replaid_jax.models import embedding
from replaid_jax.models import model as model_lib
from replaid_jax.models import noise_schedule


def embedding_separation(params: dict, max_rows: int = 4096) -> dict[str, float]:
  """Min and mean pairwise distance between unit-norm embedding rows (2: antipodal, sqrt 2: orthogonal).

  Large vocabularies use their first `max_rows` rows.
  """
  table = np.asarray(embedding.normalized(params["embedding"]), np.float64)[:max_rows]
  sq = np.clip(2.0 - 2.0 * table @ table.T, 0.0, None)
  iu = np.triu_indices(table.shape[0], 1)
  d = np.sqrt(sq[iu])
  return {"embed_min_dist": float(d.min()), "embed_mean_dist": float(d.mean())}


def _gamma_grid(g0: float, g1: float, bins: int, per_bin: int) -> tuple[np.ndarray, np.ndarray]:
  """Midpoint nodes (bins * per_bin) on [g0, g1] and the bin edges."""
  edges = np.linspace(g0, g1, bins + 1)
  width = (g1 - g0) / (bins * per_bin)
  nodes = g0 + width * (np.arange(bins * per_bin) + 0.5)
  return nodes, edges


def context_free_logits(log_unigram, z_BLE, table_VE, alpha2_B, sigma2_B):
  """log p(v) + (alpha / sigma^2) z.e_v: each position's token posterior given its own z alone (up to a constant)."""
  return log_unigram + (jnp.sqrt(alpha2_B) / sigma2_B)[:, None, None] * jnp.einsum("ble,ve->blv", z_BLE, table_VE)


@functools.partial(jax.jit, static_argnames=("model_cfg", "selfcond", "use_output_prior"))
def _level_mse(params, tokens, log_unigram, g, t, key, *, model_cfg, selfcond, use_output_prior):
  """(model, context-free) mean ||e - x_hat||^2 at noise level g (time t), one shared noise draw."""
  table = embedding.normalized(params["embedding"])
  e = embedding.lookup(table, tokens)
  g_B = jnp.full((tokens.shape[0],), g, jnp.float32)
  alpha2, sigma2 = noise_schedule.alpha_sigma2(g_B)
  z = jnp.sqrt(alpha2)[:, None, None] * e + jnp.sqrt(sigma2)[:, None, None] * jax.random.normal(key, e.shape)
  pred = lambda x_sc: model_lib.predict(params, z, g_B, x_sc, cfg=model_cfg, prior_scale=1.0,
                                        t_B=jnp.full_like(g_B, t), use_output_prior=use_output_prior)[1]
  x_hat = pred(jnp.zeros_like(z))
  if selfcond:
    x_hat = pred(x_hat)
  free = jax.nn.softmax(context_free_logits(log_unigram, z, table, alpha2, sigma2), axis=-1) @ table
  mse = lambda xh: jnp.mean(jnp.sum(jnp.square(e - xh), -1))
  return mse(x_hat), mse(free)


def denoiser_gain_by_level(params: dict, tokens_BL: np.ndarray, log_unigram: np.ndarray, key: jax.Array, *,
                           model_cfg: model_lib.ModelConfig, schedule: str = "learned", bins: int = 12,
                           per_bin: int = 4, selfcond: bool = True, use_output_prior: bool = True) -> dict[str, Any]:
  """Per-bin diffusion loss (nats/token) of the model and of the context-free Bayes denoiser.

  The integral over gamma in [gamma_0, gamma_1] is a midpoint rule with
  `bins * per_bin` nodes, one noise draw per node shared by both denoisers.
  `schedule` (the config's `diffusion.schedule`) only matters to a t-conditioned
  model, which is evaluated at the time where the schedule gives each node.
  Returns lists over bins: gamma edges, model, context_free and their
  difference `gain` (positive where the model beats the context-free denoiser).
  """
  g0 = float(params["bounds"]["gamma_0"])
  g1 = float(params["bounds"]["gamma_1"])
  nodes, edges = _gamma_grid(g0, g1, bins, per_bin)
  dgamma = (g1 - g0) / len(nodes)
  tokens = jnp.asarray(tokens_BL, jnp.int32)
  logu = jnp.asarray(log_unigram, jnp.float32)
  times = sampler.time_of_gamma(params, nodes, schedule)
  model_d, free_d = [], []
  for i, (g, t) in enumerate(zip(nodes, times)):
    m, f = _level_mse(params, tokens, logu, jnp.float32(g), jnp.float32(t), jax.random.fold_in(key, i),
                      model_cfg=model_cfg, selfcond=selfcond, use_output_prior=use_output_prior)
    w = 0.5 * math.exp(-g) * dgamma
    model_d.append(w * float(m))
    free_d.append(w * float(f))
  model_b = np.asarray(model_d).reshape(bins, per_bin).sum(1)
  free_b = np.asarray(free_d).reshape(bins, per_bin).sum(1)
  return {"gamma_edges": edges.tolist(), "model": model_b.tolist(), "context_free": free_b.tolist(),
          "gain": (free_b - model_b).tolist(), "model_total": float(model_b.sum()),
          "context_free_total": float(free_b.sum())}


def plot_gain_by_level(curves: dict[str, dict], path: str, title: str = "") -> None:
  """Bars of the context-free per-bin loss and lines of each model's, against the noise level gamma (-log SNR)."""
  plt = paths.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  first = next(iter(curves.values()))
  edges = np.asarray(first["gamma_edges"])
  mids = 0.5 * (edges[1:] + edges[:-1])
  ax.bar(mids, first["context_free"], width=0.9 * (edges[1] - edges[0]), color="0.85",
         label=f"context-free denoiser ({first['context_free_total']:.2f} nats)")
  for name, d in curves.items():
    m = 0.5 * (np.asarray(d["gamma_edges"][1:]) + np.asarray(d["gamma_edges"][:-1]))
    ax.plot(m, d["model"], marker="o", ms=3, label=f"{name} ({d['model_total']:.2f} nats)")
  ax.set_xlabel("noise level gamma = -log SNR (bins)")
  ax.set_ylabel("diffusion loss in the bin (nats/token)")
  ax.set_title(title or "where along the noise level the denoiser beats the context-free one", fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  paths.save_figure(fig, path)
  plt.close(fig)
