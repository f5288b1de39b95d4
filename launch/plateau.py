r"""Learning-curve studies: variants x seeds on one base config, with paired bounds and diagnostics.

  python launch/plateau.py --out=runs/plateau --base=configs/scaling_mini.py:XXS \
      --variant='clip0:optim.grad_clip=0' --variant='mdlm:objective=mdlm' --seeds=0,1,2 \
      --steps=100,300,500,1000

Each (variant, seed) runs in a fresh process (so one variant's compiled code or
state cannot leak into another) and writes OUT/VARIANT/seed<S>.json: the bound
(K = 2, the first 256 validation rows, one fixed key shared by every run) at
each step of --steps, the averaged training metrics between those steps (loss
terms, gradient norms per group, gamma bounds, embedding separation), and,
with --diagnostics, the per-noise-level comparison with the context-free
denoiser (replaid_jax/research/plateau.py). Finished runs are skipped, so a
study can be extended or resumed. `--report` prints and writes OUT/report.md
and OUT/summary.json: every variant's mean bound and its standard error over
seeds at each step, and the paired difference to --reference; OUT/curves.png
plots those bounds against the step.

A variant is NAME:KEY=VALUE[;KEY=VALUE...] with KEY a dotted config key;
VALUE is parsed as a Python literal when it is one, else taken as a string.
"""

from replaid_jax import hostenv

hostenv.reexec_with_huge_pages()  # first, before JAX allocates anything: see replaid_jax/hostenv.py

import ast
import json
import math
import os
import subprocess
import sys
import time

from absl import flags
import numpy as np

from replaid_jax import cli
from replaid_jax import paths

_OUT = flags.DEFINE_string("out", None, "Study directory.", required=True)
_BASE = flags.DEFINE_string("base", "configs/scaling_mini.py:XXS", "Base config file[:ARG].")
_VARIANTS = flags.DEFINE_multi_string("variant", [], "NAME:KEY=VALUE[;KEY=VALUE...] (repeatable).")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")
_STEPS = flags.DEFINE_string("steps", "100,300,500,1000", "Steps at which the bound is measured (a probe reports "
                             "every min(steps) steps up to max(steps)).")
_DIAG = flags.DEFINE_string("diagnostics", "", "Steps at which the per-noise-level diagnostic is computed.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at a time.")
_NOISE = flags.DEFINE_integer("noise_batches", 0, "At each step of --steps, also the gradient noise scale of the "
                              "training estimator from this many batches of fixed training rows (0: not measured).")
_TIME_BINS = flags.DEFINE_integer("noise_by_time", 0, "At each step of --steps, also where along t the training "
                                  "gradient is noisy, in this many cells of t (RePlaid; 0: not measured; "
                                  "research.plateau.noise_by_time).")
_PIN = flags.DEFINE_bool("pin", True, "Pin each run to one core with single-threaded XLA.")
_REPORT = flags.DEFINE_bool("report", False, "Only summarise the runs in --out.")
_REFERENCE = flags.DEFINE_string("reference", "", "Variant the report pairs every other variant with.")
_PROBE = flags.DEFINE_float("probe_gamma", None, "Instead of a study: train the denoiser alone at this noise "
                            "level with --probe_loss for the largest --steps, per seed and variant (see "
                            "research.plateau.fixed_level_probe).")
_PROBE_LOSS = flags.DEFINE_string("probe_loss", "ce", "Loss of the fixed-level probe: 'ce' or 'mse'.")
_ATTENTION = flags.DEFINE_bool("attention_profile", False, "Instead of a study: each variant's first-block "
                                "attention at initialisation by distance, on validation rows noised at "
                                "--probe_gamma (default 0), per seed (research.plateau.attention_by_distance).")
_ONE = flags.DEFINE_string("one", "", "(internal) run one VARIANT_SPEC|SEED in this process.")


def parse_variant(spec: str) -> tuple[str, dict]:
  if ":" not in spec:
    return spec, {}
  name, body = spec.split(":", 1)
  overrides = {}
  for item in filter(None, body.split(";")):
    key, _, value = item.partition("=")
    try:
      overrides[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key.strip()] = value
  return name, overrides


def load_base(base: str):
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  path, _, arg = base.partition(":")
  module = config_flags.config_flags._LoadConfigModule("base", path)  # pylint: disable=protected-access
  return module.get_config(arg) if arg else module.get_config()


def apply_overrides(cd, overrides: dict):
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = cd
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"unknown config key {key!r}")
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return cd


def _run_one(spec: str, seed: int, out_file: str) -> None:
  from replaid_jax import config_lib  # pylint: disable=g-import-not-at-top
  from replaid_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from replaid_jax.research import plateau  # pylint: disable=g-import-not-at-top
  name, overrides = parse_variant(spec)
  cd = apply_overrides(load_base(_BASE.value), overrides)
  cd.seed = seed
  c = config_lib.from_config_dict(cd)
  corpus = pipeline.load_corpus(c.data, workdir=os.path.dirname(out_file))
  steps = [int(s) for s in _STEPS.value.split(",")]
  diag = [int(s) for s in _DIAG.value.split(",") if s]

  def show(p):
    print(f"{name} seed {seed} step {p.step}: bound {p.bound:.4f} ± {p.stderr:.4f} ({p.seconds:.0f}s)", flush=True)

  if _PROBE.value is not None:
    pts = plateau.fixed_level_probe(cd, corpus, gamma=_PROBE.value, steps=max(steps), loss=_PROBE_LOSS.value,
                                    every=min(steps), seed=seed)
    for p in pts:
      print(f"{name} seed {seed} step {p['step']}: ce {p['ce']:.4f}, context-free {p['context_free_ce']:.4f}",
            flush=True)
    # In the report a probe's value is its CE gain over the context-free denoiser (positive: uses context).
    res = {"probe": {"gamma": _PROBE.value, "loss": _PROBE_LOSS.value},
           "points": [{"step": p["step"], "bound": p["gain"], "stderr": float("nan"), "seconds": 0.0, "train": p}
                      for p in pts], "unigram": 0.0}
  else:
    res = plateau.train_curve(cd, corpus, eval_steps=steps, on_point=show, diagnostics_at=diag,
                              noise_batches=_NOISE.value, time_bins=_TIME_BINS.value)
  res.update(variant=name, overrides=overrides, seed=seed, base=_BASE.value)
  paths.write_text_atomic(out_file, json.dumps(res))


def _attention_profiles() -> None:
  """Prints and writes OUT/attention_profile.json: the weight on each distance, mean over seeds, per head."""
  from replaid_jax import config_lib  # pylint: disable=g-import-not-at-top
  from replaid_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from replaid_jax.research import plateau  # pylint: disable=g-import-not-at-top
  gamma = 0.0 if _PROBE.value is None else _PROBE.value
  out = {}
  for spec in _VARIANTS.value or ["base"]:
    name, overrides = parse_variant(spec)
    cd = apply_overrides(load_base(_BASE.value), overrides)
    corpus = pipeline.load_corpus(config_lib.from_config_dict(cd).data, workdir=_OUT.value)
    runs = [plateau.attention_by_distance(cd, corpus, gamma=gamma, seed=int(s)) for s in _SEEDS.value.split(",")]
    heads = [{"by_distance": [sum(r["heads"][h]["by_distance"][d] for r in runs) / len(runs)
                              for d in range(len(runs[0]["uniform_by_distance"]))],
              "farther": sum(r["heads"][h]["farther"] for r in runs) / len(runs)} for h in range(len(runs[0]["heads"]))]
    out[name] = {"heads": heads, "uniform_by_distance": runs[0]["uniform_by_distance"], "runs": runs}
    uni = runs[0]["uniform_by_distance"]
    print(f"{name} (gamma={gamma:g}, {len(runs)} seeds): weight by distance 0..{len(uni) - 1}, then farther; "
          f"uniform {' '.join(f'{u:.3f}' for u in uni)}")
    for h, hd in enumerate(heads):
      print(f"  head {h}: {' '.join(f'{x:.3f}' for x in hd['by_distance'])} | {hd['farther']:.3f}")
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "attention_profile.json"), "w") as f:
    json.dump(out, f, indent=1)


def _launch_all() -> None:
  seeds = [int(s) for s in _SEEDS.value.split(",")]
  jobs = []
  for spec in _VARIANTS.value:
    name, _ = parse_variant(spec)
    os.makedirs(os.path.join(_OUT.value, name), exist_ok=True)
    with open(os.path.join(_OUT.value, name, "variant.json"), "w") as f:
      json.dump({"spec": spec, "base": _BASE.value}, f)
    for seed in seeds:
      out_file = os.path.join(_OUT.value, name, f"seed{seed}.json")
      if not os.path.exists(out_file):
        jobs.append((spec, seed, out_file))
  print(f"{len(jobs)} run(s) to do", flush=True)
  running = []
  passthrough = [f"--base={_BASE.value}", f"--steps={_STEPS.value}", f"--diagnostics={_DIAG.value}",
                 f"--out={_OUT.value}", f"--probe_loss={_PROBE_LOSS.value}", f"--noise_batches={_NOISE.value}",
                 f"--noise_by_time={_TIME_BINS.value}"]
  if _PROBE.value is not None:
    passthrough.append(f"--probe_gamma={_PROBE.value}")
  while jobs or running:
    while jobs and len(running) < _PARALLEL.value:
      spec, seed, out_file = jobs.pop(0)
      log = open(out_file.replace(".json", ".log"), "w")
      cmd = [sys.executable, __file__, *passthrough, f"--one={spec}|{seed}|{out_file}"]
      env = dict(os.environ)
      # Seeds of one variant compile identical programs: share them through XLA's persistent cache.
      env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_OUT.value, ".xla_cache"))
      env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
      if _PIN.value:
        # Small models run best on one core each: pin run i to core i % cores, single-threaded XLA.
        busy = {slot for *_, slot in running}
        slot = min(set(range(_PARALLEL.value)) - busy)
        cmd = ["taskset", "-c", str(slot % os.cpu_count()), *cmd]
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
      else:
        slot = len(running)
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
      running.append((proc, spec, seed, log, slot))
    for item in list(running):
      proc, spec, seed, log, _ = item
      if proc.poll() is not None:
        log.close()
        running.remove(item)
        print(f"{parse_variant(spec)[0]} seed {seed}: {'done' if proc.returncode == 0 else 'FAILED'}", flush=True)
    if running:
      time.sleep(1.0)


def summarize(out: str, reference: str = "") -> dict:
  """{variant: {step: {mean, se, n, seeds, paired_diff?, paired_se?}}} from OUT/*/seed*.json."""
  runs = {}
  for name in sorted(os.listdir(out)):
    d = os.path.join(out, name)
    if not os.path.isdir(d):
      continue
    for fn in sorted(os.listdir(d)):
      if fn.startswith("seed") and fn.endswith(".json"):
        with open(os.path.join(d, fn)) as f:
          r = json.load(f)
        runs.setdefault(name, {})[r["seed"]] = r
  summary = {}
  for name, by_seed in runs.items():
    steps = sorted({p["step"] for r in by_seed.values() for p in r["points"]})
    unigram = next(iter(by_seed.values()))["unigram"]
    rows = {}
    for s in steps:
      vals = {seed: p["bound"] for seed, r in by_seed.items() for p in r["points"] if p["step"] == s}
      v = list(vals.values())
      row = {"mean": sum(v) / len(v), "n": len(v), "values": vals,
             "se": (sum((x - sum(v) / len(v)) ** 2 for x in v) / (len(v) - 1) / len(v)) ** 0.5 if len(v) > 1 else
             float("nan"), "max_below_unigram": unigram - max(v), "min_below_unigram": unigram - min(v)}
      if reference and reference in runs and name != reference:
        ref = {seed: p["bound"] for seed, r in runs[reference].items() for p in r["points"] if p["step"] == s}
        diffs = [vals[k] - ref[k] for k in vals if k in ref]
        if diffs:
          m = sum(diffs) / len(diffs)
          row["paired_diff"] = m
          row["paired_se"] = (sum((x - m) ** 2 for x in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5 if len(
              diffs) > 1 else float("nan")
      rows[s] = row
    summary[name] = {"unigram": unigram, "steps": rows}
    profiles = [r["noise_by_time"] for r in by_seed.values() if r.get("noise_by_time")]
    if profiles:  # --noise_by_time: the per-cell profile, mean over seeds
      summary[name]["noise_by_time"] = {
          step: {"t": profiles[0][step]["t"], "seeds": sum(step in p for p in profiles),
                 **{k: np.mean([p[step][k] for p in profiles if step in p], axis=0).tolist()
                    for k in profiles[0][step] if k != "t"}}
          for step in profiles[0]}
  return summary


def report(out: str, reference: str = "") -> str:
  summary = summarize(out, reference)
  steps = sorted({s for v in summary.values() for s in v["steps"]})
  unigram = next(iter(summary.values()))["unigram"] if summary else float("nan")
  lines = [f"unigram cross-entropy of the evaluated rows: {unigram:.3f} nats/token", "",
           "| variant | seeds | " + " | ".join(f"step {s}" for s in steps) + " |",
           "|---|---|" + "---|" * len(steps)]
  for name, v in summary.items():
    cells = []
    for s in steps:
      r = v["steps"].get(s)
      if r is None:
        cells.append("")
        continue
      cell = f"{r['mean']:.3f} ± {r['se']:.3f}" if not math.isnan(r["se"]) else f"{r['mean']:.3f}"
      if "paired_diff" in r:
        cell += f" ({r['paired_diff']:+.3f} ± {r['paired_se']:.3f})"
      cells.append(cell)
    n = max(r["n"] for r in v["steps"].values())
    lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
  text = "\n".join(lines)
  paths.write_text_atomic(os.path.join(out, "report.md"), text + "\n")
  paths.write_text_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=1, default=str))
  if summary:
    save_curves(summary, os.path.join(out, "curves.png"), title=os.path.basename(os.path.normpath(out)))
  if any("noise_by_time" in v for v in summary.values()):
    save_noise_by_time(summary, os.path.join(out, "noise_by_time.png"))
  return text


def save_curves(summary: dict, path: str, *, title: str = "") -> str:
  """The bound against the step for every variant (mean over seeds, ± one standard error), with the unigram."""
  plt = paths.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
  for name, v in summary.items():
    steps = sorted(v["steps"], key=int)
    mean = [v["steps"][s]["mean"] for s in steps]
    se = [0.0 if math.isnan(v["steps"][s]["se"]) else v["steps"][s]["se"] for s in steps]
    n = max(r["n"] for r in v["steps"].values())
    ax.errorbar([int(s) for s in steps], mean, yerr=se, marker="o", ms=3, capsize=2, label=f"{name} ({n} seeds)")
  ax.axhline(next(iter(summary.values()))["unigram"], color="k", ls=":", lw=1, label="unigram")
  ax.set_xscale("log")
  ax.set_xlabel("optimizer step")
  ax.set_ylabel("bound (nats/token; AR: NLL)")
  ax.set_title(title)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  paths.save_figure(fig, path)
  plt.close(fig)
  return path


def save_noise_by_time(summary: dict, path: str) -> str:
  """Per variant with a --noise_by_time profile: the training gradient's within-cell variance against t, one
  line per step (mean over seeds), with the factor the best time density would give."""
  plt = paths.pyplot()
  names = [n for n, v in summary.items() if "noise_by_time" in v]
  fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.8), dpi=110, squeeze=False)
  for ax, name in zip(axes[0], names):
    for step, prof in sorted(summary[name]["noise_by_time"].items(), key=lambda kv: int(kv[0])):
      ax.plot(prof["t"], np.maximum(prof["grad_within"], 1e-12), marker="o", ms=2,
              label=f"step {step} (best density x{prof['gain_grad_best']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("gradient variance within a cell of t (per row)")
    ax.set_title(name, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
  fig.tight_layout()
  paths.save_figure(fig, path)
  plt.close(fig)
  return path


def main(argv):
  del argv
  if _ONE.value:
    spec, seed, out_file = _ONE.value.split("|")
    _run_one(spec, int(seed), out_file)
    return
  if _ATTENTION.value:
    _attention_profiles()
    return
  if not _REPORT.value:
    _launch_all()
  print(report(_OUT.value, _REFERENCE.value))


if __name__ == "__main__":
  cli.run(main)
