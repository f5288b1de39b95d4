"""Plots a person would rather look at than read: the learned noise schedule, the loss, the bound against time."""

import numpy as np

from replaid_jax import paths
from replaid_jax.diffusion import sampler


def save_schedule_plot(params: dict, schedule: str, path: str, step: int, num_points: int = 200) -> str:
  """The noise schedule gamma(t) = -log SNR(t) of the (EMA) parameters over t in [0, 1], as a PNG.

  The left axis reads gamma, the right axis the same curve as log-SNR = -gamma.
  """
  plt = paths.pyplot()

  gammas = sampler.gamma_grid(params, num_points, schedule)
  t = np.linspace(0.0, 1.0, num_points + 1)
  fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
  ax.plot(t, gammas, label=f"gamma(t): gamma_0 = {gammas[0]:.2f}, gamma_1 = {gammas[-1]:.2f}")
  ax.set_xlabel("t")
  ax.set_ylabel("gamma(t)")
  right = ax.secondary_yaxis("right", functions=(np.negative, np.negative))
  right.set_ylabel("log SNR(t) = -gamma(t)")
  ax.set_title(f"learned noise schedule, step {step}")
  ax.legend(fontsize=8, loc="upper left")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  paths.save_figure(fig, path)
  plt.close(fig)
  return path


def read_metrics(workdir: str) -> list[dict]:
  """Every row of <workdir>/train/metrics.jsonl, in order."""
  import json  # pylint: disable=g-import-not-at-top
  path = paths.join(workdir, "train", "metrics.jsonl")
  if not paths.exists(path):
    return []
  with paths.open_file(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def save_loss_curve(rows: list[dict], path: str) -> str:
  """The training loss against steps (with the validation bound where it was measured), as a PNG."""
  plt = paths.pyplot()

  train = [r for r in rows if "train/loss" in r]
  val = [r for r in rows if "val/nats_per_token" in r]
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  if train:
    ax.plot([r["step"] for r in train], [r["train/loss"] for r in train], lw=1, label="training loss (batch)")
  if val:
    ax.errorbar([r["step"] for r in val], [r["val/nats_per_token"] for r in val],
                yerr=[2 * r.get("val/stderr", 0.0) for r in val], fmt="o", capsize=3,
                label="validation bound ± 2 SE, nats/token")
  ax.set_xlabel("step")
  ax.set_ylabel("nats/token")
  ax.set_title("loss")
  ax.grid(alpha=0.3)
  if train or val:
    ax.legend(fontsize=8)
  fig.tight_layout()
  paths.save_figure(fig, path)
  plt.close(fig)
  return path


def read_validation_curve(workdir: str) -> list[dict]:
  """The run's validation rows from <workdir>/train/metrics.jsonl, in order."""
  return [r for r in read_metrics(workdir) if "val/nats_per_token" in r]


def save_bound_curve(runs: dict[str, list[dict]], path: str) -> str:
  """Validation bound (± 2 SE) and its ratio to the unigram cross-entropy against wall-clock minutes."""
  plt = paths.pyplot()

  fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
  for name, rows in runs.items():
    if not rows:
      continue
    x = np.array([r["val/minutes"] for r in rows])
    y = np.array([r["val/nats_per_token"] for r in rows])
    se = np.array([r["val/stderr"] for r in rows])
    uni = (np.array([r["val/unigram_nats_per_token"] for r in rows]) if "val/unigram_nats_per_token" in rows[0]
           else None)
    if len(rows) == 1:  # one evaluation: a marked point with its error bar, and a note, rather than a lone dot
      bar = ax.errorbar(x, y, yerr=2 * se, fmt="o", ms=8, capsize=5, label=f"{name}: bound ± 2 SE")
      color = bar[0].get_color()
      ax.annotate(f"{y[0]:.3f} ± {2 * se[0]:.3f}", (x[0], y[0]), xytext=(10, 10), textcoords="offset points",
                  fontsize=8)
      if uni is not None:
        ax.plot(x, uni, marker="_", ms=20, ls="none", color=color, label=f"{name}: unigram CE, same tokens")
        ax_r.errorbar(x, y / uni, yerr=2 * se / uni, fmt="o", ms=8, capsize=5, color=color, label=name)
      for a in (ax, ax_r):
        a.set_xlim(0, max(2 * x[0], 1.0))
        a.text(0.02, 0.97, "a single evaluation so far: the curve grows with the next ones", fontsize=7,
               va="top", transform=a.transAxes)
      continue
    line, = ax.plot(x, y, marker="o", label=f"{name}: bound ± 2 SE")
    ax.fill_between(x, y - 2 * se, y + 2 * se, color=line.get_color(), alpha=0.2)
    if uni is not None:
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
  paths.save_figure(fig, path)
  plt.close(fig)
  return path
