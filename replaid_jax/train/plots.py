"""Plots a person would rather look at than read: the learned noise schedule."""

import os

import numpy as np

from replaid_jax import paths
from replaid_jax.diffusion import sampler


def _save(fig, path: str) -> None:
  """savefig to a local path or a bucket URI."""
  if paths.is_uri(path):
    with paths.open_file(path, "wb") as f:
      fig.savefig(f, format="png")
  else:
    fig.savefig(path)


def save_schedule_plot(params: dict, schedule: str, path: str, step: int, num_points: int = 200) -> str:
  """gamma(t) and log-SNR(t) of the (EMA) parameters, as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  gammas = sampler.gamma_grid(params, num_points, schedule)
  t = np.linspace(0.0, 1.0, num_points + 1)
  paths.makedirs(os.path.dirname(path))
  fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
  ax.plot(t, gammas, label="gamma(t)")
  ax.set_xlabel("t")
  ax.set_ylabel("gamma = -log SNR")
  ax.set_title(f"noise schedule, step {step}: gamma_0={gammas[0]:.2f}, gamma_1={gammas[-1]:.2f}")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)
  return path


def read_validation_curve(workdir: str) -> list[dict]:
  """The run's validation rows from <workdir>/train/metrics.jsonl, in order."""
  import json  # pylint: disable=g-import-not-at-top
  path = paths.join(workdir, "train", "metrics.jsonl")
  if not paths.exists(path):
    return []
  with paths.open_file(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if "val/nats_per_token" in r]


def save_bound_curve(runs: dict[str, list[dict]], path: str) -> str:
  """Validation bound (± 2 SE) and its ratio to the unigram cross-entropy against wall-clock minutes."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  paths.makedirs(os.path.dirname(path) or ".")
  fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
  for name, rows in runs.items():
    if not rows:
      continue
    x = np.array([r["val/minutes"] for r in rows])
    y = np.array([r["val/nats_per_token"] for r in rows])
    se = np.array([r["val/stderr"] for r in rows])
    line, = ax.plot(x, y, marker="o", label=f"{name}: bound ± 2 SE")
    ax.fill_between(x, y - 2 * se, y + 2 * se, color=line.get_color(), alpha=0.2)
    if "val/unigram_nats_per_token" in rows[0]:
      uni = np.array([r["val/unigram_nats_per_token"] for r in rows])
      ax.plot(x, uni, ls="--", lw=1, color=line.get_color(), label=f"{name}: unigram CE, same tokens")
      ax_r.plot(x, y / uni, marker="o", color=line.get_color(), label=name)
      ax_r.fill_between(x, (y - 2 * se) / uni, (y + 2 * se) / uni, color=line.get_color(), alpha=0.2)
  ax_r.axhline(1.0, color="k", lw=1)
  ax.set_xlabel("wall-clock minutes (setup, compilation, evaluations included)")
  ax.set_ylabel("validation NELBO, nats/token")
  ax_r.set_xlabel("wall-clock minutes")
  ax_r.set_ylabel("bound / unigram cross-entropy")
  for a in (ax, ax_r):
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)
  return path
