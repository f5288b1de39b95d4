"""Plots a person would rather look at than read: the learned noise schedule."""

import os

import numpy as np

from replaid_jax.diffusion import sampler


def save_schedule_plot(params: dict, schedule: str, path: str, step: int, num_points: int = 200) -> str:
  """gamma(t) and log-SNR(t) of the (EMA) parameters, as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  gammas = sampler.gamma_grid(params, num_points, schedule)
  t = np.linspace(0.0, 1.0, num_points + 1)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
  ax.plot(t, gammas, label="gamma(t)")
  ax.set_xlabel("t")
  ax.set_ylabel("gamma = -log SNR")
  ax.set_title(f"noise schedule, step {step}: gamma_0={gammas[0]:.2f}, gamma_1={gammas[-1]:.2f}")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
