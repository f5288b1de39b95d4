"""Where the train step's time goes: XLA's per-op timing from a profiler trace, grouped by kind of op.

  python launch/profile_step.py --config=configs/demo.py --out=/tmp/profile
  python launch/profile_step.py --config=configs/demo.py --config.model.remat=False --out=/tmp/profile_noremat

Builds the config's run on random tokens (as launch/benchmark.py does), runs
`--steps` compiled train steps under `jax.profiler.trace`, and reads the
Perfetto trace back: every XLA op's time is attributed to a class (matmuls,
split into the forward pass, the backward pass and the rest by the op's
`transpose(jvp(...))` origin in the compiled HLO; layout copies and transposes;
broadcasts, which are mostly the zero-filled buffers a scan stacks its
per-block activations into; the scan's dynamic slices and updates;
concatenations; reductions; other elementwise fusions). Prints the table and
the most expensive ops, and writes OUT/profile.json and the trace itself
(open OUT/plugins/profile/*/perfetto_trace.json.gz in ui.perfetto.dev).
Timing only: the step's numerics are untouched.
"""

from replaid_jax import hostenv

hostenv.reexec_with_huge_pages()  # first, before JAX allocates anything: see replaid_jax/hostenv.py

import collections
import glob
import gzip
import json
import os
import re
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from replaid_jax import benchmark
from replaid_jax import cli
from replaid_jax.train import build as build_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:arg]).",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Folder for the trace and profile.json.")
_STEPS = flags.DEFINE_integer("steps", 5, "Traced steps (after 3 untimed ones).")
_TOP = flags.DEFINE_integer("top", 15, "How many of the most expensive ops to list.")
flags.mark_flags_as_required(["config", "out"])

_HOST_EVENTS = ("ThunkExecutor", "SlinkyThreadPool", "$")


def op_class(name: str, origin: str) -> str:
  """The class of an XLA op from its (fusion) name and the JAX op it came from."""
  base = re.sub(r"\.\d+$", "", name)
  if base.startswith(("ynn_fusion", "xnn_fusion", "onednn", "dot", "custom-call", "__onednn")) or "dot" in base:
    side = "backward" if "transpose(jvp" in origin else "forward" if origin else "other"
    return f"matmul ({side})"
  if "dynamic-update-slice" in base:
    return "scan: dynamic-update-slice"
  if "dynamic-slice" in base:
    return "scan: dynamic-slice"
  if base.startswith(("copy", "transpose")) or "transpose" in base:
    return "copy / transpose"
  if base.startswith("wrapped_broadcast") or base.startswith("broadcast"):
    return "broadcast (zero fills)"
  if "concatenate" in base:
    return "concatenate"
  if "reduce" in base:
    return "reduce"
  if base.startswith("while") or base.startswith("call") or base.startswith("conditional"):
    return "control flow"
  return "elementwise / other fusions"


def origins(hlo_text: str) -> dict[str, str]:
  """{instruction name: the op_name metadata of the JAX op it came from} from compiled HLO text."""
  out = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*?op_name=\"([^\"]+)\"", hlo_text, re.M):
    out[m.group(1)] = m.group(2)
  return out


def summarise(trace_file: str, hlo_text: str, steps: int) -> dict:
  """Per-class and per-op milliseconds per step from a Perfetto trace of `steps` steps."""
  with gzip.open(trace_file) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  where = origins(hlo_text)
  per_op, calls = collections.defaultdict(float), collections.Counter()
  for e in events:
    if e.get("ph") != "X" or e["name"].startswith(_HOST_EVENTS):
      continue
    per_op[e["name"]] += e.get("dur", 0.0) / 1e3 / steps
    calls[e["name"]] += 1
  classes = collections.defaultdict(float)
  for name, ms in per_op.items():
    classes[op_class(name, where.get(name, ""))] += ms
  total = sum(classes.values())
  return {
      "ms_per_step_total": total,
      "classes": {k: {"ms": v, "share": v / total} for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
      "ops": [{"name": n, "ms": ms, "calls_per_step": calls[n] / steps, "class": op_class(n, where.get(n, "")),
               "origin": where.get(n, "")} for n, ms in sorted(per_op.items(), key=lambda kv: -kv[1])],
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  c, run_, batches = benchmark.synthetic_run(cli.config(_CONFIG))
  b = c.train.batch_size
  key = jax.random.key(c.seed)
  compiled = build_lib.compile_step(run_).lower(run_.state, batches[0], key).compile()
  state = run_.state
  for i in range(3):
    state, m = compiled(state, batches[i % 2], key)
  jax.block_until_ready(m)
  os.makedirs(_OUT.value, exist_ok=True)
  t0 = time.perf_counter()
  jax.profiler.start_trace(_OUT.value, create_perfetto_trace=True)
  for i in range(_STEPS.value):
    state, m = compiled(state, batches[i % 2], key)
    jax.block_until_ready(m)
  jax.profiler.stop_trace()
  wall = (time.perf_counter() - t0) / _STEPS.value
  trace = sorted(glob.glob(os.path.join(_OUT.value, "plugins", "profile", "*", "perfetto_trace.json.gz")))[-1]
  result = summarise(trace, compiled.as_text(), _STEPS.value)
  result.update({"config": config_flags.get_config_filename(flags.FLAGS["config"]), "steps": _STEPS.value,
                 "wall_ms_per_step_traced": 1e3 * wall, "batch_size": b, "seq_len": c.data.seq_len,
                 "trace": trace, "device_kind": jax.devices()[0].device_kind,
                 "overrides": {k: repr(v) for k, v in config_flags.get_override_values(flags.FLAGS["config"]).items()}})
  print(f"{result['ms_per_step_total']:.1f} ms of XLA ops per step ({1e3 * wall:.1f} ms wall, traced)")
  for k, v in result["classes"].items():
    print(f"  {k:30s} {v['ms']:8.1f} ms  {v['share']:6.1%}")
  print(f"the {_TOP.value} most expensive ops (ms per step, calls per step, class, origin):")
  for op in result["ops"][:_TOP.value]:
    print(f"  {op['ms']:7.1f}  x{op['calls_per_step']:<3g} {op['name']:32s} {op['class']:28s} {op['origin'][-60:]}")
  with open(os.path.join(_OUT.value, "profile.json"), "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  cli.run(main)
