"""Scaling laws from isoFLOP sweeps: optima per budget, power laws across budgets, compute gaps.

For each method and FLOP budget C, a parabola in log N through the final
losses of models of different sizes gives the compute-optimal size N*(C) and
loss L*(C) (`isoflop_fit`). Power laws fitted to these optima across budgets
(`power_law_fit`) give L*(C) = A C^alpha and N*(C) = A C^alpha, and inverting
the loss laws of two methods gives the FLOP multiple one needs to reach the
loss of the other (`compute_gap`). `analyze` does all of it for a list of runs.

Only numpy and scipy; matplotlib is imported by `plot` alone.
"""

import collections
import math
import os
from typing import Any, Iterable, Sequence

import numpy as np

_RUN_KEYS = ("method", "size", "num_params", "budget", "loss")


def non_embedding_params(width: int, num_layers: int, mlp_ratio: int = 4, cond_dim: int = 128) -> int:
  """Parameters of the transformer blocks: the N of the scaling laws.

  Per block of width D: 4 D^2 (QKV and attention output), 2 r D^2 (the two MLP
  matrices, hidden width r D), r D + D (MLP biases), 2 D (the two layer-norm
  scales) and cond_dim * 6 D + 6 D (the adaLN projection to shift, scale and
  gate of both sub-blocks). Excludes the V x D input/output matrices, the
  embedding table, the d_e -> D projections, the conditioning MLP and the final
  norm/adaLN, whose size does not grow with depth.
  """
  d, r = int(width), int(mlp_ratio)
  per_block = 4 * d * d + 2 * r * d * d + (r * d + d) + 2 * d + (int(cond_dim) * 6 * d + 6 * d)
  return int(num_layers) * per_block


def isoflop_fit(log_n: Iterable[float], loss: Iterable[float]) -> dict[str, Any]:
  """Fits loss = a (ln N)^2 + b ln N + c at one budget and returns its minimum.

  Args:
    log_n: natural log of the (non-embedding) parameter counts.
    loss: the final loss of each model.

  Returns:
    a, b, c; log_n_opt, n_opt = exp(-b / 2a) and loss_opt = the parabola there;
    the sampled range (n_min, n_max); rms_residual; `valid` (a > 0 and N*
    inside the sampled range), `extrapolated` (N* outside it, still reported)
    and `reason` (empty when valid).

  Raises:
    ValueError: fewer than 3 points, fewer than 3 distinct sizes, or
      non-finite values.
  """
  x = np.asarray(log_n, dtype=np.float64).ravel()
  y = np.asarray(loss, dtype=np.float64).ravel()
  if x.shape != y.shape:
    raise ValueError(f"log_n and loss differ in length ({x.size} vs {y.size}).")
  if x.size < 3:
    raise ValueError(f"an isoFLOP fit needs at least 3 model sizes per budget, got {x.size}.")
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
    raise ValueError("log_n and loss must be finite.")
  if np.unique(x).size < 3:
    raise ValueError(f"an isoFLOP fit needs at least 3 distinct model sizes, got {np.unique(x).size}.")
  a, b, c = (float(v) for v in np.polyfit(x, y, 2))
  resid = y - np.polyval([a, b, c], x)
  lo, hi = float(x.min()), float(x.max())
  out = {
      "a": a, "b": b, "c": c, "num_points": int(x.size), "log_n_min": lo, "log_n_max": hi,
      "n_min": math.exp(lo), "n_max": math.exp(hi), "rms_residual": float(np.sqrt(np.mean(resid**2))),
  }
  if a <= 0:
    out.update(log_n_opt=math.nan, n_opt=math.nan, loss_opt=math.nan, valid=False, extrapolated=False,
               reason=f"no minimum: the fitted curvature a = {a:.3g} is not positive")
    return out
  x_opt = -b / (2 * a)
  extrapolated = not lo <= x_opt <= hi
  out.update(log_n_opt=x_opt, n_opt=math.exp(x_opt), loss_opt=c - b * b / (4 * a), valid=not extrapolated,
             extrapolated=extrapolated,
             reason=(f"extrapolated: N* = {math.exp(x_opt):.3g} lies outside the sampled range "
                     f"[{math.exp(lo):.3g}, {math.exp(hi):.3g}]") if extrapolated else "")
  return out


def _check_positive(x: np.ndarray, y: np.ndarray, min_points: int) -> None:
  if x.shape != y.shape:
    raise ValueError(f"x and y differ in length ({x.size} vs {y.size}).")
  if x.size < min_points:
    raise ValueError(f"a power-law fit needs at least {min_points} points, got {x.size}.")
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0) and np.all(y > 0)):
    raise ValueError("a power-law fit needs finite, positive x and y.")
  if np.unique(x).size < 2:
    raise ValueError("a power-law fit needs at least 2 distinct x values.")


def _loglog_fit(lx: np.ndarray, ly: np.ndarray) -> dict[str, float]:
  """Ordinary least squares ly = log_A + alpha lx with the textbook standard errors."""
  n = lx.size
  alpha, log_a = (float(v) for v in np.polyfit(lx, ly, 1))
  resid = ly - (log_a + alpha * lx)
  ssr = float(np.sum(resid**2))
  mean = float(np.mean(lx))
  sxx = float(np.sum((lx - mean) ** 2))
  sst = float(np.sum((ly - np.mean(ly)) ** 2))
  if n > 2:
    s2 = ssr / (n - 2)
    se_alpha, se_log_a, cov = math.sqrt(s2 / sxx), math.sqrt(s2 * (1.0 / n + mean**2 / sxx)), -mean * s2 / sxx
  else:
    se_alpha = se_log_a = cov = math.nan
  return {"alpha": alpha, "log_A": log_a, "se_alpha": se_alpha, "se_log_A": se_log_a, "cov_log_A_alpha": cov,
          "r2": 1.0 - ssr / sst if sst > 0 else math.nan}


def _offset_fit(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
  """y = E + A x^alpha with 0 <= E < min(y): a profile over E, then a joint least-squares refinement."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top

  lx, ly = np.log(x), np.log(y)

  def log_model(lx_, e, log_a, alpha):
    return np.log(e + np.exp(log_a + alpha * lx_))

  def ssr(e, log_a, alpha):
    return float(np.sum((ly - log_model(lx, e, log_a, alpha)) ** 2))

  best = None
  for e in np.linspace(0.0, float(y.min()), 201)[:-1]:
    alpha, log_a = np.polyfit(lx, np.log(y - e), 1)
    cand = (ssr(e, log_a, alpha), e, float(log_a), float(alpha))
    if best is None or cand[0] < best[0]:
      best = cand
  _, e, log_a, alpha = best
  se = {"se_E": math.nan, "se_log_A": math.nan, "se_alpha": math.nan}
  try:
    p, pcov = optimize.curve_fit(log_model, lx, ly, p0=(e, log_a, alpha),
                                 bounds=([0.0, -np.inf, -np.inf], [float(y.min()), np.inf, np.inf]), maxfev=10000)
    if ssr(*p) <= best[0] + 1e-15:
      e, log_a, alpha = (float(v) for v in p)
    if x.size > 3 and np.all(np.isfinite(pcov)):
      se = dict(zip(("se_E", "se_log_A", "se_alpha"), (float(v) for v in np.sqrt(np.diag(pcov)))))
  except (RuntimeError, ValueError, optimize.OptimizeWarning):
    pass  # keep the profile optimum, without standard errors
  sst = float(np.sum((ly - ly.mean()) ** 2))
  return {"E": e, "log_A": log_a, "alpha": alpha, **se,
          "r2": 1.0 - ssr(e, log_a, alpha) / sst if sst > 0 else math.nan}


def power_law_fit(x: Iterable[float], y: Iterable[float], offset: bool = False) -> dict[str, Any]:
  """Fits y = A x^alpha by least squares in log-log space (or y = E + A x^alpha with `offset`).

  Returns:
    A, alpha, log_A (natural log), their standard errors se_alpha and se_log_A
    from the residuals (NaN with only 2 points; for log_A at x = 1, so strongly
    correlated with alpha: cov_log_A_alpha), r2 in log space, E (0 without
    offset), num_points and the fitted x range.

  Raises:
    ValueError: too few points, or non-positive or non-finite values.
  """
  xa = np.asarray(x, dtype=np.float64).ravel()
  ya = np.asarray(y, dtype=np.float64).ravel()
  _check_positive(xa, ya, 3 if offset else 2)
  if offset:
    fit = _offset_fit(xa, ya)
    fit.setdefault("cov_log_A_alpha", math.nan)
  else:
    fit = {"E": 0.0, **_loglog_fit(np.log(xa), np.log(ya))}
  fit.update(A=math.exp(fit["log_A"]), offset=bool(offset), num_points=int(xa.size), x_min=float(xa.min()),
             x_max=float(xa.max()))
  return fit


def evaluate_law(law: dict[str, Any], x: Iterable[float] | float) -> np.ndarray:
  """E + A x^alpha of a `power_law_fit` result."""
  xa = np.asarray(x, dtype=np.float64)
  return law.get("E", 0.0) + law["A"] * xa ** law["alpha"]


def invert_law(law: dict[str, Any], y: Iterable[float] | float) -> np.ndarray:
  """The x at which a fitted law reaches y: ((y - E) / A)^(1 / alpha); NaN where y <= E."""
  ya = np.asarray(y, dtype=np.float64)
  above = ya - law.get("E", 0.0)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(above > 0, (np.abs(above) / law["A"]) ** (1.0 / law["alpha"]), np.nan)


def compute_gap(law_method: dict[str, Any], law_ref: dict[str, Any], losses: Iterable[float]) -> np.ndarray:
  """C_method(L) / C_ref(L): the FLOP multiple the method needs over the reference to reach each loss L.

  Both laws are L*(C) fits from `power_law_fit`; each is inverted at L.
  """
  return invert_law(law_method, losses) / invert_law(law_ref, losses)


def _geomean(v: np.ndarray) -> float:
  v = np.asarray(v, dtype=np.float64)
  v = v[np.isfinite(v) & (v > 0)]
  return float(np.exp(np.mean(np.log(v)))) if v.size else math.nan


def _overlap(losses_method: Iterable[float], losses_ref: Iterable[float]) -> tuple[float, float] | None:
  lm = np.asarray(list(losses_method), dtype=np.float64)
  lr = np.asarray(list(losses_ref), dtype=np.float64)
  if not lm.size or not lr.size:
    return None
  lo, hi = max(lm.min(), lr.min()), min(lm.max(), lr.max())
  return (float(lo), float(hi)) if lo <= hi else None


def _loss_grid(lo: float, hi: float, num: int) -> np.ndarray:
  return np.array([lo]) if lo == hi else np.geomspace(lo, hi, num)


def gap_at_matched_loss(law_method: dict[str, Any], law_ref: dict[str, Any], losses_method: Iterable[float],
                        losses_ref: Iterable[float], num: int = 101) -> dict[str, Any]:
  """The compute gap averaged (geometric mean) over the losses both methods actually reached.

  Args:
    law_method, law_ref: L*(C) laws.
    losses_method, losses_ref: the optimal losses L* each method reached.
    num: points of the log-spaced loss grid over the overlap.

  Returns:
    gap (geometric mean), gap_min, gap_max, loss_lo and loss_hi (the overlap);
    gap NaN with a `note` when the two loss ranges do not overlap.
  """
  span = _overlap(losses_method, losses_ref)
  if span is None:
    return {"gap": math.nan, "gap_min": math.nan, "gap_max": math.nan, "loss_lo": math.nan, "loss_hi": math.nan,
            "note": "the loss ranges reached by the two methods do not overlap"}
  gaps = compute_gap(law_method, law_ref, _loss_grid(*span, num))
  return {"gap": _geomean(gaps), "gap_min": float(np.nanmin(gaps)), "gap_max": float(np.nanmax(gaps)),
          "loss_lo": span[0], "loss_hi": span[1], "note": ""}


def param_ratio(nlaw_ref: dict[str, Any], nlaw_method: dict[str, Any], budgets: Iterable[float]) -> np.ndarray:
  """N*_ref(C) / N*_method(C) at each budget C: how many times fewer parameters the method's optimum uses."""
  return evaluate_law(nlaw_ref, budgets) / evaluate_law(nlaw_method, budgets)


def param_ratio_at_loss(nlaw_ref: dict[str, Any], nlaw_method: dict[str, Any], llaw_ref: dict[str, Any],
                        llaw_method: dict[str, Any], losses: Iterable[float]) -> np.ndarray:
  """N*_ref(C_ref(L)) / N*_method(C_method(L)): the same ratio between optima that reach the same loss L."""
  return (evaluate_law(nlaw_ref, invert_law(llaw_ref, losses))
          / evaluate_law(nlaw_method, invert_law(llaw_method, losses)))


def budget_key(budget: float) -> float:
  """A budget rounded to 6 significant digits, so that runs of one budget group together."""
  return float(f"{float(budget):.6g}")


def _group(runs: list[dict[str, Any]]) -> dict[str, dict[float, list[dict[str, Any]]]]:
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


def _law_or_none(law: dict | None) -> dict | None:
  """A law read back from JSON (None for NaN) usable by the law functions."""
  if not law or law.get("A") is None or law.get("alpha") is None:
    return None
  return {**law, "E": law.get("E") or 0.0}


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
    c_ref = float(invert_law(ref_loss_law, loss))
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
  groups = _group(runs)
  result: dict[str, Any] = {"reference": reference, "window": int(window), "min_z": float(min_z), "methods": {},
                            "comparisons": {}, "notes": []}
  for method, by_budget in groups.items():
    entries = []
    for rs in by_budget.values():
      entry = {
          "budget": float(rs[0]["budget"]), "sizes": [str(r["size"]) for r in rs],
          "num_params": [int(r["num_params"]) for r in rs], "losses": [float(r["loss"]) for r in rs],
          "stderrs": [float(r.get("stderr", math.nan)) for r in rs],
      }
      try:
        lo, hi = fit_window(entry["losses"], window)
        entry["fit_sizes"] = entry["sizes"][lo:hi]
        entry["isoflop_fit"] = isoflop_fit(np.log(entry["num_params"][lo:hi]), entry["losses"][lo:hi])
        why = (flat_within_noise(entry["losses"][lo:hi], entry["stderrs"][lo:hi], min_z)
               or unbracketed(entry["losses"][lo:hi], entry["fit_sizes"]))
        if why and entry["isoflop_fit"]["valid"]:
          entry["isoflop_fit"].update(valid=False, reason=why)
      except ValueError as e:
        entry["isoflop_fit"] = {"valid": False, "extrapolated": False, "reason": str(e)}
      entries.append(entry)
    valid = [e for e in entries if e["isoflop_fit"]["valid"]]
    info: dict[str, Any] = {"budgets": entries, "loss_law": None, "params_law": None, "note": ""}
    if len(valid) >= 2:
      c = [e["budget"] for e in valid]
      info["loss_law"] = power_law_fit(c, [e["isoflop_fit"]["loss_opt"] for e in valid])
      info["params_law"] = power_law_fit(c, [e["isoflop_fit"]["n_opt"] for e in valid])
    else:
      info["note"] = (f"{len(valid)} budget(s) with a valid isoFLOP optimum; the laws L*(C) and N*(C) need at "
                      "least 2")
      result["notes"].append(f"{method}: {info['note']}")
    result["methods"][method] = info

  if reference not in groups:
    result["notes"].append(f"reference method {reference!r} is absent: no compute gaps or parameter ratios")
    return _jsonable(result)
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
    valid = [e for e in info["budgets"] if e["isoflop_fit"]["valid"]]
    own_losses = [e["isoflop_fit"]["loss_opt"] for e in valid]
    own_budgets = [e["budget"] for e in valid]
    matched = gap_at_matched_loss(info["loss_law"], ref["loss_law"], own_losses, ref_losses)
    comp = {
        "gap_at_matched_loss": matched,
        "gap_at_method_optima": {"losses": own_losses,
                                 "gap": compute_gap(info["loss_law"], ref["loss_law"], own_losses)},
        "param_ratio_at_budget": {"budgets": own_budgets,
                                  "ratio": param_ratio(ref["params_law"], info["params_law"], own_budgets)},
    }
    comp["param_ratio_at_budget"]["geomean"] = _geomean(comp["param_ratio_at_budget"]["ratio"])
    if math.isfinite(matched["gap"]):
      grid = _loss_grid(matched["loss_lo"], matched["loss_hi"], 101)
      comp["param_ratio_at_matched_loss"] = _geomean(param_ratio_at_loss(
          ref["params_law"], info["params_law"], ref["loss_law"], info["loss_law"], grid))
    else:
      comp["param_ratio_at_matched_loss"] = math.nan
      result["notes"].append(f"{method} vs {reference}: {matched['note']}; see gap_at_method_optima (extrapolated)")
    result["comparisons"][method] = comp
  return _jsonable(result)


def _fmt(x: Any, spec: str = ".4g") -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "–"
  return format(x, spec)


def markdown_tables(result: dict[str, Any]) -> str:
  """The optima per budget, the laws per method and the gaps against the reference as markdown tables."""
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
  lines += ["", "## Scaling laws (over the budgets with a valid optimum)", "",
            "| method | law | A | exponent ± SE | r² | budgets |", "|---|---|---|---|---|---|"]
  for method, info in result["methods"].items():
    if info["loss_law"] is None:
      lines.append(f"| {method} | – | – | – | – | {info['note']} |")
      continue
    for name, law in (("L*(C) = A C^α", info["loss_law"]), ("N*(C) = A C^α", info["params_law"])):
      lines.append(f"| {method} | {name} | {_fmt(law['A'], '.4g')} | {_fmt(law['alpha'], '.4g')} ± "
                   f"{_fmt(law['se_alpha'], '.2g')} | {_fmt(law['r2'], '.4f')} | {law['num_points']} |")
  ref = result["reference"]
  lines += ["", f"## Against {ref}", ""]
  if result["comparisons"]:
    lines += [f"| method | compute gap C/C_{ref} at matched loss (geo. mean) | gap range | loss overlap | "
              f"N*_{ref}/N* at equal C (geo. mean) | N*_{ref}/N* at matched loss |", "|---|---|---|---|---|---|"]
    for method, comp in result["comparisons"].items():
      if "note" in comp:
        lines.append(f"| {method} | {comp['note']} | – | – | – | – |")
        continue
      m = comp["gap_at_matched_loss"]
      times = lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{_fmt(v, '.3g')}x"
      if m["gap"] is None or (isinstance(m["gap"], float) and math.isnan(m["gap"])):
        at_optima = ", ".join(times(g) for g in comp["gap_at_method_optima"]["gap"])
        gap, span, overlap = f"no loss overlap; at {method}'s optima {at_optima} (extrapolated)", "–", "–"
      else:
        gap, span = times(m["gap"]), f"{_fmt(m['gap_min'], '.3g')}–{_fmt(m['gap_max'], '.3g')}"
        overlap = f"{_fmt(m['loss_lo'], '.4f')}–{_fmt(m['loss_hi'], '.4f')}"
      lines.append(f"| {method} | {gap} | {span} | {overlap} | {times(comp['param_ratio_at_budget']['geomean'])} | "
                   f"{times(comp['param_ratio_at_matched_loss'])} |")
  else:
    lines.append("No comparisons.")
  if result.get("best_run_gaps"):
    lines += ["", f"## Best run per budget against {ref}'s L*(C)", "",
              f"| method | budget (FLOPs) | best size | loss | C_{ref} reaching it | gap C/C_{ref} |",
              "|---|---|---|---|---|---|"]
    for method, rows in result["best_run_gaps"].items():
      for r in rows:
        flag = " (extrapolated)" if r["extrapolated"] else ""
        lines.append(f"| {method} | {_fmt(r['budget'], '.3g')} | {r['size']} | {_fmt(r['loss'], '.4f')} | "
                     f"{_fmt(r['reference_flops'], '.3g')} | {_fmt(r['gap'], '.3g')}x{flag} |")
  if result["notes"]:
    lines += ["", "Notes:", ""] + [f"- {n}" for n in result["notes"]]
  return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], runs: list[dict[str, Any]], out_dir: str) -> list[str]:
  """Writes isoflop.png (loss vs N per method, fitted parabolas, optima) and laws.png (L*(C), N*(C)).

  Invalid fits are drawn dotted (or not at all when they have no parabola);
  returns the paths written.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  groups = _group(runs) if runs else {}
  methods = sorted(set(groups) | set(result["methods"]))
  all_budgets = sorted({budget_key(e["budget"]) for m in result["methods"].values() for e in m["budgets"]}
                       | {b for bs in groups.values() for b in bs})
  cmap = plt.get_cmap("viridis")
  colour = {b: cmap(i / max(len(all_budgets) - 1, 1) * 0.9) for i, b in enumerate(all_budgets)}
  paths = []

  ncols = max(min(len(methods), 3), 1)
  nrows = max(math.ceil(len(methods) / ncols), 1)
  fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows), squeeze=False)
  for ax in axes.ravel()[len(methods):]:
    ax.set_visible(False)
  for ax, method in zip(axes.ravel(), methods):
    fits = {budget_key(e["budget"]): e["isoflop_fit"] for e in result["methods"].get(method, {}).get("budgets", [])}
    for budget in sorted(set(groups.get(method, {})) | set(fits)):
      col = colour[budget]
      rs = groups.get(method, {}).get(budget, [])
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
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(method)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "isoflop.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)

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
        ax.plot(xs, evaluate_law(law, xs), "-", color=col)
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
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "laws.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  return paths
