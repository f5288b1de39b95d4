"""Compares finished runs at equal compute (an ablation table): final bounds with standard errors.

  python launch/sweeps/compare.py --sweeps=runs/mini_sweep,runs/mini_ablation --budget=6.75e12 --size=S \
      --reference=replaid [--paired] --out=runs/mini_ablation/compare

Picks every finished run of the given sweeps at that budget and size, and
writes compare.json and compare.md: each run's bound ± SE, its difference to
the reference run with the standard error of the difference, and the z-score,
sorted from best to worst.

By default the numbers are the runs' own final evaluations (eval/final.json),
treated as independent estimates: the SEs of a difference add in quadrature.
With --paired they come from the eval binary's whole-split results
(`python launch/eval.py --workdir=RUN` on each run's last checkpoint), which
evaluate every checkpoint on the same sequences with the same random draws;
a difference is then the mean of the per-sequence differences, and its SE
leaves out the variation between sequences that the runs share.
"""

import glob
import json
import math
import os
import sys

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from launch.sweeps import analyze  # pylint: disable=g-import-not-at-top,wrong-import-position


def eval_binary_result(workdir: str, step: int) -> tuple[dict, np.ndarray]:
  """The eval binary's whole-split validation result for `step` of a run and its per-sequence bounds."""
  found = []
  for path in sorted(glob.glob(os.path.join(workdir, "eval", f"*_step{step}.json"))):
    with open(path, encoding="utf-8") as f:
      res = json.load(f)
    if res.get("split") and res.get("per_sequence_file") and res.get("protocol", {}).get("complete"):
      found.append((path, res))
  if len(found) != 1:
    raise SystemExit(f"--paired needs exactly one whole-split eval-binary result with per-sequence bounds for step "
                     f"{step} of {workdir}, found {len(found)}: run `python launch/eval.py --workdir={workdir} "
                     f"--step={step}` (and remove stale results).")
  path, res = found[0]
  return res, np.load(os.path.join(os.path.dirname(path), res["per_sequence_file"]))


def compare(sweep_dirs: list[str], *, budget: float, size: str, reference: str, paired: bool = False) -> dict:
  runs = []
  for d in sweep_dirs:
    found, _ = analyze.collect(d)
    runs += [r for r in found if r["size"] == size and math.isclose(r["budget"], budget, rel_tol=1e-9)]
  by_method = {r["method"]: r for r in runs}
  if reference not in by_method:
    raise SystemExit(f"no finished run of method {reference!r} at budget {budget:g}, size {size} in {sweep_dirs}; "
                     f"found: {sorted(by_method)}")
  per = {}
  if paired:
    protocols = {}
    for r in runs:
      res, per[r["method"]] = eval_binary_result(r["workdir"], r["step"])
      proto = res["protocol"]
      protocols[r["method"]] = (proto.get("tokens_sha256"), proto.get("key"), proto.get("seed"))
      r["loss"] = float(per[r["method"]].mean())
      r["stderr"] = float(per[r["method"]].std(ddof=1) / math.sqrt(per[r["method"]].size))
    if len(set(protocols.values())) != 1 or None in protocols[reference]:
      raise SystemExit(f"--paired needs every run evaluated on the same tokens with the same key; got {protocols}.")
  ref = by_method[reference]
  rows = []
  for r in sorted(runs, key=lambda r: r["loss"]):
    if paired:
      d = per[r["method"]] - per[reference]
      diff, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))
    else:
      diff, se = r["loss"] - ref["loss"], math.hypot(r["stderr"], ref["stderr"])
    rows.append({"method": r["method"], "name": r["name"], "loss": r["loss"], "stderr": r["stderr"],
                 "diff_to_reference": diff, "diff_stderr": se, "z": diff / se if se > 0 else float("nan")})
  return {"budget": budget, "size": size, "reference": reference, "paired": paired,
          "num_sequences": int(per[reference].size) if paired else None, "rows": rows}


def markdown(result: dict) -> str:
  how = (f"paired over the same {result['num_sequences']} sequences and draws (eval binary)" if result.get("paired")
         else "independent final evaluations")
  lines = [f"Equal compute: C = {result['budget']:.3g} FLOPs, size {result['size']}; reference `{result['reference']}`; "
           f"{how}.", "", "| run | bound (nats/token) | vs reference | z |", "|---|---|---|---|"]
  for r in result["rows"]:
    vs = "—" if r["method"] == result["reference"] else f"{r['diff_to_reference']:+.4f} ± {r['diff_stderr']:.4f}"
    z = "—" if r["method"] == result["reference"] else f"{r['z']:+.1f}"
    lines.append(f"| {r['method']} | {r['loss']:.4f} ± {r['stderr']:.4f} | {vs} | {z} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  result = compare([d for d in f.sweeps.split(",") if d], budget=f.budget, size=f.size, reference=f.reference,
                   paired=f.paired)
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
  flags.DEFINE_bool("paired", False, "Use the eval binary's per-sequence bounds: paired differences.")
  app.run(main)
