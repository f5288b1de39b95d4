"""Compares finished runs at equal compute (an ablation table): final bounds with standard errors.

  python launch/sweeps/compare.py --sweeps=runs/mini_sweep,runs/mini_ablation --budget=6.75e12 --size=S \
      --reference=replaid --out=runs/mini_ablation/compare

Picks every finished run of the given sweeps at that budget and size, and
writes compare.json and compare.md: each run's bound ± SE, its difference to
the reference run with the standard error of the difference (independent
held-out estimates: SEs add in quadrature) and the z-score, sorted from best to
worst.
"""

import json
import math
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from launch.sweeps import analyze  # pylint: disable=g-import-not-at-top,wrong-import-position


def compare(sweep_dirs: list[str], *, budget: float, size: str, reference: str) -> dict:
  runs = []
  for d in sweep_dirs:
    found, _ = analyze.collect(d)
    runs += [r for r in found if r["size"] == size and math.isclose(r["budget"], budget, rel_tol=1e-9)]
  by_method = {r["method"]: r for r in runs}
  if reference not in by_method:
    raise SystemExit(f"no finished run of method {reference!r} at budget {budget:g}, size {size} in {sweep_dirs}; "
                     f"found: {sorted(by_method)}")
  ref = by_method[reference]
  rows = []
  for r in sorted(runs, key=lambda r: r["loss"]):
    diff = r["loss"] - ref["loss"]
    se = math.hypot(r["stderr"], ref["stderr"])
    rows.append({"method": r["method"], "name": r["name"], "loss": r["loss"], "stderr": r["stderr"],
                 "diff_to_reference": diff, "diff_stderr": se, "z": diff / se if se > 0 else float("nan")})
  return {"budget": budget, "size": size, "reference": reference, "rows": rows}


def markdown(result: dict) -> str:
  lines = [f"Equal compute: C = {result['budget']:.3g} FLOPs, size {result['size']}; reference `{result['reference']}`.",
           "", "| run | bound (nats/token) | vs reference | z |", "|---|---|---|---|"]
  for r in result["rows"]:
    vs = "—" if r["method"] == result["reference"] else f"{r['diff_to_reference']:+.4f} ± {r['diff_stderr']:.4f}"
    z = "—" if r["method"] == result["reference"] else f"{r['z']:+.1f}"
    lines.append(f"| {r['method']} | {r['loss']:.4f} ± {r['stderr']:.4f} | {vs} | {z} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  result = compare([d for d in f.sweeps.split(",") if d], budget=f.budget, size=f.size, reference=f.reference)
  out = f.out or os.path.join(f.sweeps.split(",")[-1], "compare")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "compare.json"), "w", encoding="utf-8") as fh:
    json.dump(result, fh, indent=1)
  text = markdown(result)
  with open(os.path.join(out, "compare.md"), "w", encoding="utf-8") as fh:
    fh.write(text)
  print(text)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  flags.DEFINE_string("sweeps", None, "Comma-separated sweep directories.", required=True)
  flags.DEFINE_float("budget", None, "FLOP budget of the runs to compare.", required=True)
  flags.DEFINE_string("size", None, "Size label of the runs to compare.", required=True)
  flags.DEFINE_string("reference", "replaid", "Method the others are compared with.")
  flags.DEFINE_string("out", "", "Output directory (default: <last sweep>/compare).")
  app.run(main)
