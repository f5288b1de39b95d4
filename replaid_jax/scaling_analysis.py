"""The scaling laws of a sweep: isoFLOP optima per budget, laws per method, comparisons with a reference.

`analyze` groups a sweep's runs by method and budget, fits each budget's
parabola (`scaling.isoflop_fit`) to the sizes around its best run
(`fit_window`), rejects optima that the losses cannot locate
(`flat_within_noise`, `unbracketed`), fits L*(C) and N*(C) over the budgets
left (`scaling.power_law_fit`), and compares every method with the reference:
compute gaps, parameter ratios and `best_run_gaps`.
"""

import collections
import math
from typing import Any, Sequence

import numpy as np

from replaid_jax import scaling

_RUN_KEYS = ("method", "size", "num_params", "budget", "loss")


def budget_key(budget: float) -> float:
  """A budget rounded to 6 significant digits, so that runs of one budget group together."""
  return float(f"{float(budget):.6g}")


def group_runs(runs: list[dict[str, Any]]) -> dict[str, dict[float, list[dict[str, Any]]]]:
  """Runs by method, then by `budget_key`, each budget's runs sorted by size.

  Raises:
    ValueError: a run lacks one of the keys `analyze` needs.
  """
  groups: dict[str, dict[float, list]] = collections.defaultdict(lambda: collections.defaultdict(list))
  for i, run in enumerate(runs):
    missing = [k for k in _RUN_KEYS if k not in run]
    if missing:
      raise ValueError(f"run {i} ({run.get('method')}, {run.get('size')}) lacks {missing}.")
    groups[str(run["method"])][budget_key(run["budget"])].append(run)
  return {m: {b: sorted(rs, key=lambda r: r["num_params"]) for b, rs in sorted(bs.items())}
          for m, bs in sorted(groups.items())}


def _jsonable(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple, np.ndarray)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  return obj


def best_run_gaps(info: dict[str, Any], ref_loss_law: dict[str, Any], ref_losses: list[float]) -> list[dict]:
  """Per budget: the method's best observed loss and the compute multiple C / C_ref(L) that reaches it.

  Needs only the reference's L*(C) law, so it also applies to a method
  without laws of its own (no valid isoFLOP optimum). It is conservative for
  the method when its best observed run is not its true optimum. `extrapolated`
  marks losses outside the range of the reference's own optima.
  """
  lo, hi = (min(ref_losses), max(ref_losses)) if ref_losses else (math.nan, math.nan)
  out = []
  for e in info["budgets"]:
    i = int(np.argmin(e["losses"]))
    loss = float(e["losses"][i])
    c_ref = float(scaling.invert_law(ref_loss_law, loss))
    out.append({"budget": e["budget"], "size": e["sizes"][i], "loss": loss, "reference_flops": c_ref,
                "gap": e["budget"] / c_ref if c_ref > 0 else math.nan, "extrapolated": not lo <= loss <= hi})
  return out


def fit_window(losses: Sequence[float], window: int) -> tuple[int, int]:
  """[start, stop) of the `window` consecutive sizes centred on the lowest loss (all sizes when window is 0).

  Sizes far from the optimum (a model too large to leave the unigram plateau
  within the budget, say) bend the curve away from a parabola; fitting the
  neighbourhood of the best run keeps the fit local, as the optimum is.
  """
  n = len(losses)
  if window <= 0 or window >= n:
    return 0, n
  if window < 3:
    raise ValueError(f"an isoFLOP fit window needs at least 3 sizes, got {window}.")
  best = int(np.argmin(np.asarray(losses, dtype=np.float64)))
  start = min(max(best - window // 2, 0), n - window)
  return start, start + window


def flat_within_noise(losses: Sequence[float], stderrs: Sequence[float], z: float) -> str:
  """Why a budget's losses cannot locate an optimum ('' when they can): the best and the worst fitted size
  differ by less than z standard errors of their difference (every size is on a plateau, say)."""
  y, se = np.asarray(losses, np.float64), np.asarray(stderrs, np.float64)
  if z <= 0 or not np.all(np.isfinite(se)):
    return ""
  lo, hi = int(np.argmin(y)), int(np.argmax(y))
  spread, noise = y[hi] - y[lo], math.hypot(se[hi], se[lo])
  if spread >= z * noise:
    return ""
  return (f"flat within noise: the fitted sizes' losses span {spread:.3g}, under {z:g} SE of that difference "
          f"({noise:.2g})")


def unbracketed(losses: Sequence[float], sizes: Sequence[str]) -> str:
  """Why the fitted sizes do not bracket the optimum ('' when they do): the lowest loss is at an end."""
  best = int(np.argmin(np.asarray(losses, np.float64)))
  if 0 < best < len(losses) - 1:
    return ""
  end, fix = ("smallest", "smaller") if best == 0 else ("largest", "larger")
  return f"not bracketed: the best run ({sizes[best]}) is the {end} size fitted; add {fix} models"


def analyze(runs: list[dict[str, Any]], reference: str = "ar", window: int = 0,
            min_z: float = 2.0) -> dict[str, Any]:
  """IsoFLOP optima, power laws and compute gaps of a sweep.

  Args:
    runs: dicts with `method`, `size` (label), `num_params` (non-embedding
      parameters), `budget` (FLOPs), `loss` (final validation nats/token) and
      optionally `stderr`.
    reference: the method every other one is compared with (skipped, with a
      note, when absent).
    window: fit each budget's parabola to this many consecutive sizes around
      its best run (`fit_window`); 0 fits all sizes.
    min_z: a budget whose fitted losses are `flat_within_noise` at this z
      gives no optimum (0 turns the check off; runs without stderr skip it).
      A budget whose best run is the smallest or largest size fitted gives
      none either (`unbracketed`): the vertex would be an extrapolation.

  Returns:
    A JSON-able dict (NaN written as None): `methods` (per method: `budgets`,
    each with its points and `isoflop_fit`; `loss_law` and `params_law`, the
    fits of L*(C) and N*(C) over the budgets with a valid optimum, or None
    with a `note`), `comparisons` (per non-reference method: compute gap at
    matched loss, gap at the method's own optima, parameter ratios) and
    `notes`.
  """
  groups = group_runs(runs)
  result: dict[str, Any] = {"reference": reference, "window": int(window), "min_z": float(min_z), "methods": {},
                            "comparisons": {}, "notes": []}
  for method, by_budget in groups.items():
    info = _method_laws([_budget_entry(rs, window, min_z) for rs in by_budget.values()])
    if info["note"]:
      result["notes"].append(f"{method}: {info['note']}")
    result["methods"][method] = info
  if reference not in groups:
    result["notes"].append(f"reference method {reference!r} is absent: no compute gaps or parameter ratios")
    return _jsonable(result)
  _compare_with_reference(result)
  return _jsonable(result)


def _budget_entry(rs: list[dict[str, Any]], window: int, min_z: float) -> dict[str, Any]:
  """One budget of one method: its points and the isoFLOP fit of the sizes in its window (or why there is none)."""
  entry = {
      "budget": float(rs[0]["budget"]), "sizes": [str(r["size"]) for r in rs],
      "num_params": [int(r["num_params"]) for r in rs], "losses": [float(r["loss"]) for r in rs],
      "stderrs": [float(r.get("stderr", math.nan)) for r in rs],
  }
  try:
    lo, hi = fit_window(entry["losses"], window)
    entry["fit_sizes"] = entry["sizes"][lo:hi]
    entry["isoflop_fit"] = scaling.isoflop_fit(np.log(entry["num_params"][lo:hi]), entry["losses"][lo:hi])
    why = (flat_within_noise(entry["losses"][lo:hi], entry["stderrs"][lo:hi], min_z)
           or unbracketed(entry["losses"][lo:hi], entry["fit_sizes"]))
    if why and entry["isoflop_fit"]["valid"]:
      entry["isoflop_fit"].update(valid=False, reason=why)
  except ValueError as e:
    entry["isoflop_fit"] = {"valid": False, "extrapolated": False, "reason": str(e)}
  return entry


def _method_laws(entries: list[dict[str, Any]]) -> dict[str, Any]:
  """A method's budgets and its laws L*(C) and N*(C) over the valid optima (None, with a note, under 2)."""
  valid = [e for e in entries if e["isoflop_fit"]["valid"]]
  info: dict[str, Any] = {"budgets": entries, "loss_law": None, "params_law": None, "note": ""}
  if len(valid) >= 2:
    c = [e["budget"] for e in valid]
    info["loss_law"] = scaling.power_law_fit(c, [e["isoflop_fit"]["loss_opt"] for e in valid])
    info["params_law"] = scaling.power_law_fit(c, [e["isoflop_fit"]["n_opt"] for e in valid])
  else:
    info["note"] = (f"{len(valid)} budget(s) with a valid isoFLOP optimum; the laws L*(C) and N*(C) need at "
                    "least 2")
  return info


def _compare_with_reference(result: dict[str, Any]) -> None:
  """Fills `best_run_gaps` and `comparisons` (and their notes) of every method against `result["reference"]`."""
  reference = result["reference"]
  ref = result["methods"][reference]
  ref_losses = [e["isoflop_fit"]["loss_opt"] for e in ref["budgets"] if e["isoflop_fit"]["valid"]]
  if ref["loss_law"] is not None:
    result["best_run_gaps"] = {m: best_run_gaps(info, ref["loss_law"], ref_losses)
                               for m, info in result["methods"].items() if m != reference}
  for method, info in result["methods"].items():
    if method == reference:
      continue
    if info["loss_law"] is None or ref["loss_law"] is None:
      missing = reference if ref["loss_law"] is None else method
      result["comparisons"][method] = {"note": f"no laws for {missing}: no comparison"}
      continue
    comp = _comparison(info, ref, ref_losses)
    matched = comp["gap_at_matched_loss"]
    if not math.isfinite(matched["gap"]):
      result["notes"].append(f"{method} vs {reference}: {matched['note']}; see gap_at_method_optima (extrapolated)")
    result["comparisons"][method] = comp


def _comparison(info: dict[str, Any], ref: dict[str, Any], ref_losses: list[float]) -> dict[str, Any]:
  """One method against the reference: the compute gap at matched loss and at its own optima, parameter ratios."""
  valid = [e for e in info["budgets"] if e["isoflop_fit"]["valid"]]
  own_losses = [e["isoflop_fit"]["loss_opt"] for e in valid]
  own_budgets = [e["budget"] for e in valid]
  matched = scaling.gap_at_matched_loss(info["loss_law"], ref["loss_law"], own_losses, ref_losses)
  comp = {
      "gap_at_matched_loss": matched,
      "gap_at_method_optima": {"losses": own_losses,
                               "gap": scaling.compute_gap(info["loss_law"], ref["loss_law"], own_losses)},
      "param_ratio_at_budget": {"budgets": own_budgets,
                                "ratio": scaling.param_ratio(ref["params_law"], info["params_law"], own_budgets)},
  }
  comp["param_ratio_at_budget"]["geomean"] = scaling.geomean(comp["param_ratio_at_budget"]["ratio"])
  if math.isfinite(matched["gap"]):
    grid = scaling.loss_grid(matched["loss_lo"], matched["loss_hi"], 101)
    comp["param_ratio_at_matched_loss"] = scaling.geomean(scaling.param_ratio_at_loss(
        ref["params_law"], info["params_law"], ref["loss_law"], info["loss_law"], grid))
  else:
    comp["param_ratio_at_matched_loss"] = math.nan
  return comp
