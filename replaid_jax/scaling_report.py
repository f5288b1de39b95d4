"""The result of `scaling_analysis.analyze` as markdown tables and plots.

`markdown_tables` gives the isoFLOP optima per budget, the laws per method and
the gaps against the reference; `plot` draws isoflop.png and laws.png. Only
`plot` imports matplotlib.
"""

import math
import os
from typing import Any

import numpy as np

from replaid_jax import paths
from replaid_jax import scaling
from replaid_jax import scaling_analysis


def _fmt(x: Any, spec: str = ".4g") -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "–"
  return format(x, spec)


def _times(v: Any) -> str:
  return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{_fmt(v, '.3g')}x"


def markdown_tables(result: dict[str, Any]) -> str:
  """The optima per budget, the laws per method and the gaps against the reference as markdown tables."""
  lines = _optima_table(result) + _laws_table(result) + _comparison_table(result) + _best_run_table(result)
  if result["notes"]:
    lines += ["", "Notes:", ""] + [f"- {n}" for n in result["notes"]]
  return "\n".join(lines) + "\n"


def _optima_table(result: dict[str, Any]) -> list[str]:
  lines = ["## IsoFLOP optima", "",
           "| method | budget (FLOPs) | sizes fitted | N* (non-embedding) | L* (nats/token) | curvature a | status |",
           "|---|---|---|---|---|---|---|"]
  for method, info in result["methods"].items():
    for e in info["budgets"]:
      f = e["isoflop_fit"]
      status = "ok" if f["valid"] else f.get("reason", "invalid")
      fitted = e.get("fit_sizes", e["sizes"])
      lines.append(f"| {method} | {_fmt(e['budget'], '.3g')} | {','.join(fitted)} | {_fmt(f.get('n_opt'), '.4g')} | "
                   f"{_fmt(f.get('loss_opt'), '.4f')} | {_fmt(f.get('a'), '.3g')} | {status} |")
  return lines


def _laws_table(result: dict[str, Any]) -> list[str]:
  lines = ["", "## Scaling laws (over the budgets with a valid optimum)", "",
           "| method | law | A | exponent ± SE | r² | budgets |", "|---|---|---|---|---|---|"]
  for method, info in result["methods"].items():
    if info["loss_law"] is None:
      lines.append(f"| {method} | – | – | – | – | {info['note']} |")
      continue
    for name, law in (("L*(C) = A C^α", info["loss_law"]), ("N*(C) = A C^α", info["params_law"])):
      lines.append(f"| {method} | {name} | {_fmt(law['A'], '.4g')} | {_fmt(law['alpha'], '.4g')} ± "
                   f"{_fmt(law['se_alpha'], '.2g')} | {_fmt(law['r2'], '.4f')} | {law['num_points']} |")
  return lines


def _comparison_table(result: dict[str, Any]) -> list[str]:
  ref = result["reference"]
  lines = ["", f"## Against {ref}", ""]
  if not result["comparisons"]:
    return lines + ["No comparisons."]
  lines += [f"| method | compute gap C/C_{ref} at matched loss (geo. mean) | gap range | loss overlap | "
            f"N*_{ref}/N* at equal C (geo. mean) | N*_{ref}/N* at matched loss |", "|---|---|---|---|---|---|"]
  for method, comp in result["comparisons"].items():
    if "note" in comp:
      lines.append(f"| {method} | {comp['note']} | – | – | – | – |")
      continue
    m = comp["gap_at_matched_loss"]
    if m["gap"] is None or (isinstance(m["gap"], float) and math.isnan(m["gap"])):
      at_optima = ", ".join(_times(g) for g in comp["gap_at_method_optima"]["gap"])
      gap, span, overlap = f"no loss overlap; at {method}'s optima {at_optima} (extrapolated)", "–", "–"
    else:
      gap, span = _times(m["gap"]), f"{_fmt(m['gap_min'], '.3g')}–{_fmt(m['gap_max'], '.3g')}"
      overlap = f"{_fmt(m['loss_lo'], '.4f')}–{_fmt(m['loss_hi'], '.4f')}"
    lines.append(f"| {method} | {gap} | {span} | {overlap} | {_times(comp['param_ratio_at_budget']['geomean'])} | "
                 f"{_times(comp['param_ratio_at_matched_loss'])} |")
  return lines


def _best_run_table(result: dict[str, Any]) -> list[str]:
  if not result.get("best_run_gaps"):
    return []
  ref = result["reference"]
  lines = ["", f"## Best run per budget against {ref}'s L*(C)", "",
           f"| method | budget (FLOPs) | best size | loss | C_{ref} reaching it | gap C/C_{ref} |",
           "|---|---|---|---|---|---|"]
  for method, rows in result["best_run_gaps"].items():
    for r in rows:
      flag = " (extrapolated)" if r["extrapolated"] else ""
      lines.append(f"| {method} | {_fmt(r['budget'], '.3g')} | {r['size']} | {_fmt(r['loss'], '.4f')} | "
                   f"{_fmt(r['reference_flops'], '.3g')} | {_fmt(r['gap'], '.3g')}x{flag} |")
  return lines


# ---- plots.


def _law_or_none(law: dict | None) -> dict | None:
  """A law read back from JSON (None for NaN) usable by the law functions."""
  if not law or law.get("A") is None or law.get("alpha") is None:
    return None
  return {**law, "E": law.get("E") or 0.0}


def plot(result: dict[str, Any], runs: list[dict[str, Any]], out_dir: str) -> list[str]:
  """Writes isoflop.png (loss vs N per method, fitted parabolas, optima) and laws.png (L*(C), N*(C)).

  Invalid fits are drawn dotted (or not at all when they have no parabola);
  returns the paths written.
  """
  plt = paths.pyplot()

  os.makedirs(out_dir, exist_ok=True)
  groups = scaling_analysis.group_runs(runs) if runs else {}
  return [_save(plt, _isoflop_figure(plt, result, groups), os.path.join(out_dir, "isoflop.png")),
          _save(plt, _laws_figure(plt, result), os.path.join(out_dir, "laws.png"))]


def _save(plt, fig, path: str) -> str:
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=120)
  plt.close(fig)
  return path


def _isoflop_figure(plt, result: dict[str, Any], groups: dict[str, dict[float, list[dict[str, Any]]]]):
  """One panel per method: its runs' losses against N, coloured by budget, with the fitted parabolas."""
  methods = sorted(set(groups) | set(result["methods"]))
  all_budgets = sorted({scaling_analysis.budget_key(e["budget"]) for m in result["methods"].values()
                        for e in m["budgets"]} | {b for bs in groups.values() for b in bs})
  cmap = plt.get_cmap("viridis")
  colour = {b: cmap(i / max(len(all_budgets) - 1, 1) * 0.9) for i, b in enumerate(all_budgets)}
  ncols = max(min(len(methods), 3), 1)
  nrows = max(math.ceil(len(methods) / ncols), 1)
  fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows), squeeze=False)
  for ax in axes.ravel()[len(methods):]:
    ax.set_visible(False)
  for ax, method in zip(axes.ravel(), methods):
    _isoflop_panel(ax, result["methods"].get(method, {}), groups.get(method, {}), colour)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(method)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  return fig


def _isoflop_panel(ax, info: dict[str, Any], by_budget: dict[float, list[dict[str, Any]]],
                   colour: dict[float, Any]) -> None:
  """One method's runs, parabolas (dotted when invalid) and optima (hollow when invalid) per budget."""
  fits = {scaling_analysis.budget_key(e["budget"]): e["isoflop_fit"] for e in info.get("budgets", [])}
  for budget in sorted(set(by_budget) | set(fits)):
    col = colour[budget]
    rs = by_budget.get(budget, [])
    if rs:
      ax.plot([r["num_params"] for r in rs], [r["loss"] for r in rs], "o", color=col, label=f"C={budget:.3g}")
    f = fits.get(budget, {})
    if f.get("a") is not None and f.get("log_n_min") is not None:
      pad = 0.1 * (f["log_n_max"] - f["log_n_min"])
      xs = np.linspace(f["log_n_min"] - pad, f["log_n_max"] + pad, 100)
      ax.plot(np.exp(xs), np.polyval([f["a"], f["b"], f["c"]], xs), "-" if f["valid"] else ":", color=col)
    near = f.get("log_n_min") is not None and f.get("n_opt") is not None and (
        f["log_n_min"] - 1.0 <= math.log(f["n_opt"]) <= f["log_n_max"] + 1.0)
    if near and f.get("loss_opt") is not None:  # optima far outside the sampled sizes are in the tables only
      ax.plot([f["n_opt"]], [f["loss_opt"]], "*", ms=14, color=col if f["valid"] else "none",
              markeredgecolor=col)


def _laws_figure(plt, result: dict[str, Any]):
  """L*(C) and N*(C): each method's valid optima and its fitted law, on log-log axes."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  fig, (ax_l, ax_n) = plt.subplots(1, 2, figsize=(11, 4))
  for i, method in enumerate(sorted(result["methods"])):
    info = result["methods"][method]
    col = plt.get_cmap("tab10")(i % 10)
    valid = [e for e in info["budgets"] if e["isoflop_fit"]["valid"]]
    c = np.array([e["budget"] for e in valid])
    for ax, key, law_key in ((ax_l, "loss_opt", "loss_law"), (ax_n, "n_opt", "params_law")):
      law = _law_or_none(info.get(law_key))
      label = method if law is None else f"{method}: α = {law['alpha']:.3f} ± {_fmt(law.get('se_alpha'), '.1g')}"
      if c.size:
        ax.plot(c, [e["isoflop_fit"][key] for e in valid], "o", color=col, label=label)
      if law is not None and c.size:
        xs = np.geomspace(c.min() / 1.5, c.max() * 1.5, 50)
        ax.plot(xs, scaling.evaluate_law(law, xs), "-", color=col)
  for ax, ylabel in ((ax_l, "L*(C) (nats/token)"), (ax_n, "N*(C)")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    if ax is ax_l and ax.has_data():  # a loss spans less than a decade: linear-spaced labels on the log axis
      lo, hi = ax.get_ylim()
      ax.yaxis.set_major_locator(ticker.FixedLocator(ticker.MaxNLocator(6).tick_values(lo, hi)))
      ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
      ax.yaxis.set_minor_locator(ticker.NullLocator())
      ax.set_ylim(lo, hi)
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  return fig
