"""Fits the scaling laws of a finished (or partly finished) isoFLOP sweep.

  python launch/sweeps/analyze.py --sweep=runs/isoflop [--reference=ar] [--window=3] [--out=DIR]

Reads DIR/sweep.json and each run's workdir/eval/final.json (nats_per_token,
stderr); runs without one are listed as missing. --window=K fits each
budget's parabola to the K consecutive sizes around its best run (default:
all sizes of the budget); a budget whose fitted sizes' losses differ by less
than --min_z standard errors (all on a plateau), or whose best run is the
smallest or largest size fitted, gives no optimum. Writes analysis.json (the
isoFLOP optima, the laws L*(C) and N*(C) per method, the compute gap and
parameter ratio of every method against the reference), tables.md,
runs.md (every run, long and as a budget x size grid), isoflop.png and laws.png
to --out, and prints the tables.
"""

import json
import os
import sys
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from replaid_jax import scaling_analysis  # pylint: disable=g-import-not-at-top,wrong-import-position
from replaid_jax import scaling_report  # pylint: disable=g-import-not-at-top,wrong-import-position


def collect(sweep_dir: str) -> tuple[list[dict[str, Any]], list[str]]:
  """The finished runs of a sweep in `scaling_analysis.analyze`'s format, and the names of the missing ones."""
  with open(os.path.join(sweep_dir, "sweep.json"), encoding="utf-8") as f:
    sweep = json.load(f)
  runs, missing = [], []
  for r in sweep:
    path = os.path.join(r["workdir"], "eval", "final.json")
    if not os.path.exists(path):
      missing.append(r["name"])
      continue
    with open(path, encoding="utf-8") as f:
      final = json.load(f)
    runs.append({"name": r["name"], "method": r["method"], "size": r["size"],
                 "num_params": int(r["non_embedding_params"]), "budget": float(r["budget"]),
                 "num_steps": r.get("num_steps"), "workdir": r["workdir"], "step": final.get("step"),
                 "loss": float(final["nats_per_token"]), "stderr": float(final.get("stderr", float("nan")))})
  return runs, missing


def runs_table(runs: list[dict[str, Any]]) -> str:
  """Every finished run: loss ± standard error by method, budget and size."""
  lines = ["| method | budget (FLOPs) | size | N (non-embedding) | steps | loss (nats/token) |",
           "|---|---|---|---|---|---|"]
  for r in sorted(runs, key=lambda r: (r["method"], r["budget"], r["num_params"])):
    lines.append(f"| {r['method']} | {r['budget']:.3g} | {r['size']} | {r['num_params']:,} | "
                 f"{r.get('num_steps') or '–'} | {r['loss']:.4f} ± {r['stderr']:.4f} |")
  return "\n".join(lines) + "\n"


def grid_table(runs: list[dict[str, Any]], result: dict[str, Any] | None = None) -> str:
  """Loss ± SE with budgets and sizes as rows and methods as columns; each budget's best run per method in bold,
  and runs outside that budget's isoFLOP fit window in parentheses."""
  methods = sorted({r["method"] for r in runs})
  cell = {(r["method"], scaling_analysis.budget_key(r["budget"]), r["size"]): r for r in runs}
  fitted = {}
  for m, info in ((result or {}).get("methods") or {}).items():
    for e in info["budgets"]:
      fitted[(m, scaling_analysis.budget_key(e["budget"]))] = set(e.get("fit_sizes", e["sizes"]))
  best = {}
  for r in runs:
    k = (r["method"], scaling_analysis.budget_key(r["budget"]))
    if k not in best or r["loss"] < best[k]["loss"]:
      best[k] = r
  sizes = sorted({(r["num_params"], r["size"]) for r in runs})
  lines = ["| budget (FLOPs) | size | N | " + " | ".join(methods) + " |", "|---" * (3 + len(methods)) + "|"]
  for budget in sorted({scaling_analysis.budget_key(r["budget"]) for r in runs}):
    first = True
    for n, size in sizes:
      row = [cell.get((m, budget, size)) for m in methods]
      if not any(row):
        continue
      cells = []
      for m, r in zip(methods, row):
        if r is None:
          cells.append("")
          continue
        text = f"{r['loss']:.3f} ± {r['stderr']:.3f}"
        if best[(m, budget)] is r:
          text = f"**{text}**"
        if (m, budget) in fitted and size not in fitted[(m, budget)]:
          text = f"({text})"
        cells.append(text)
      lines.append(f"| {f'{budget:.3g}' if first else ''} | {size} | {n:,} | " + " | ".join(cells) + " |")
      first = False
  return "\n".join(lines) + "\n"


def analyze_sweep(sweep_dir: str, reference: str = "ar", out_dir: str | None = None,
                  window: int = 0, min_z: float = 2.0) -> dict[str, Any]:
  """Fits the laws of a sweep and writes analysis.json, tables.md and the plots to out_dir."""
  out_dir = out_dir or os.path.join(sweep_dir, "analysis")
  runs, missing = collect(sweep_dir)
  result = scaling_analysis.analyze(runs, reference=reference, window=window, min_z=min_z)
  result["missing_runs"] = missing
  if missing:
    result["notes"].append(f"{len(missing)} run(s) without eval/final.json left out: {', '.join(missing)}")
  os.makedirs(out_dir, exist_ok=True)
  result["plots"] = scaling_report.plot(result, runs, out_dir)
  with open(os.path.join(out_dir, "analysis.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(out_dir, "tables.md"), "w", encoding="utf-8") as f:
    f.write(scaling_report.markdown_tables(result))
  with open(os.path.join(out_dir, "runs.md"), "w", encoding="utf-8") as f:
    f.write(runs_table(runs) + "\n" + grid_table(runs, result))
  return result


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("sweep", None, "Sweep directory holding sweep.json.")
  flags.DEFINE_string("reference", "ar", "Method the others are compared with.")
  flags.DEFINE_string("out", None, "Output directory (default: SWEEP/analysis).")
  flags.DEFINE_integer("window", 0, "Sizes per isoFLOP fit, centred on each budget's best run (0: all).")
  flags.DEFINE_float("min_z", 2.0, "A budget whose best and worst fitted sizes differ by under this many standard "
                     "errors gives no optimum (0: off).")
  flags.mark_flags_as_required(["sweep"])
  return flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  out_dir = FLAGS.out or os.path.join(FLAGS.sweep, "analysis")
  result = analyze_sweep(FLAGS.sweep, FLAGS.reference, out_dir, FLAGS.window, FLAGS.min_z)
  print(scaling_report.markdown_tables(result))
  print(f"wrote {', '.join(['analysis.json', 'tables.md'] + [os.path.basename(p) for p in result['plots']])} "
        f"to {out_dir}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  FLAGS = _define_flags()
  app.run(main)
