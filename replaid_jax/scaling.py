"""Scaling laws from isoFLOP sweeps: the fits and the arithmetic of the fitted laws.

For each method and FLOP budget C, a parabola in log N through the final
losses of models of different sizes gives the compute-optimal size N*(C) and
loss L*(C) (`isoflop_fit`). Power laws fitted to these optima across budgets
(`power_law_fit`) give L*(C) = A C^alpha and N*(C) = A C^alpha, and inverting
the loss laws of two methods gives the FLOP multiple one needs to reach the
loss of the other (`compute_gap`). `scaling_analysis.analyze` does all of it
for a list of runs; `scaling_report` writes the result as tables and plots.

Only numpy and scipy.
"""

import math
from typing import Any, Iterable

import numpy as np


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


def geomean(v: Iterable[float]) -> float:
  """The geometric mean of the finite, positive entries of `v` (NaN when there are none)."""
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


def loss_grid(lo: float, hi: float, num: int) -> np.ndarray:
  """`num` log-spaced losses from lo to hi (only lo when the two are equal)."""
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
  gaps = compute_gap(law_method, law_ref, loss_grid(*span, num))
  return {"gap": geomean(gaps), "gap_min": float(np.nanmin(gaps)), "gap_max": float(np.nanmax(gaps)),
          "loss_lo": span[0], "loss_hi": span[1], "note": ""}


def param_ratio(nlaw_ref: dict[str, Any], nlaw_method: dict[str, Any], budgets: Iterable[float]) -> np.ndarray:
  """N*_ref(C) / N*_method(C) at each budget C: how many times fewer parameters the method's optimum uses."""
  return evaluate_law(nlaw_ref, budgets) / evaluate_law(nlaw_method, budgets)


def param_ratio_at_loss(nlaw_ref: dict[str, Any], nlaw_method: dict[str, Any], llaw_ref: dict[str, Any],
                        llaw_method: dict[str, Any], losses: Iterable[float]) -> np.ndarray:
  """N*_ref(C_ref(L)) / N*_method(C_method(L)): the same ratio between optima that reach the same loss L."""
  return (evaluate_law(nlaw_ref, invert_law(llaw_ref, losses))
          / evaluate_law(nlaw_method, invert_law(llaw_method, losses)))
