"""Throughput of the real train step on synthetic tokens, chip peaks, and cost estimates.

`run(config_dict, ...)` builds a run exactly as the train loop does (mesh,
sharded state, optimizer), but on random tokens of the config's shape, so no
data files or tokenizer are needed; it compiles the train step, times it, and
reports tokens/s, FLOP/s by the analytic count (`flops.train_flops_per_step`),
XLA's forward count next to the analytic one, MFU against a chip peak, compile
time and peak memory. `estimate_table` turns FLOP budgets into chip-hours,
wall-clock time and dollars at an assumed MFU and stated list prices.
"""

import copy
import dataclasses
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

import replaid_jax
from replaid_jax import config_lib
from replaid_jax import objectives
from replaid_jax import errors
from replaid_jax import flops as flops_lib
from replaid_jax.data import pipeline
from replaid_jax.train import build as build_lib
from replaid_jax.models import model as model_lib


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator: dense peaks per chip and an assumed on-demand price.

  `fp32` is the rate of float32 matmuls at JAX's default precision where it
  differs from bf16: TF32 tensor cores on NVIDIA GPUs. On TPUs float32 matmuls
  at default precision run as bf16 passes, so bf16 is the peak either way.
  Prices are list prices per chip-hour to be checked before use.
  """

  name: str
  bf16: float
  fp32: float | None
  match: tuple[str, ...]  # lower-case substrings of jax's `device_kind`
  price: float  # USD per chip-hour, on demand (assumption)
  price_source: str


# Order matters: the first entry with a matching substring wins ("tpu v5 lite" before "tpu v5").
CHIPS: tuple[Chip, ...] = (
    Chip("tpu-v4", 275e12, None, ("tpu v4",), 3.22, "Cloud TPU v4 on demand, us-central2"),
    Chip("tpu-v5e", 197e12, None, ("v5 lite", "v5lite", "v5e"), 1.20, "Cloud TPU v5e on demand, us-central1"),
    Chip("tpu-v5p", 459e12, None, ("v5p", "tpu v5"), 4.20, "Cloud TPU v5p on demand, us-east5"),
    Chip("tpu-v6e", 918e12, None, ("v6 lite", "v6e", "tpu v6", "trillium"), 2.70, "Cloud TPU v6e on demand, us-east1"),
    Chip("a100", 312e12, 156e12, ("a100",), 4.10, "AWS p4d.24xlarge on demand / 8 (A100 40GB)"),
    Chip("h100", 989e12, 495e12, ("h100",), 6.90, "AWS p5.48xlarge on demand / 8, after the 2025 price cut"),
    Chip("h200", 989e12, 495e12, ("h200",), 8.00, "AWS p5e/p5en.48xlarge on demand / 8, approximate"),
)


def chip_for_kind(device_kind: str) -> Chip | None:
  """The table entry for a `jax.Device.device_kind` string, or None."""
  kind = device_kind.lower()
  for chip in CHIPS:
    if any(s in kind for s in chip.match):
      return chip
  return None


def chip_by_name(name: str) -> Chip:
  for chip in CHIPS:
    if chip.name == name.lower():
      return chip
  raise ValueError(f"unknown chip {name!r}; choose one of {', '.join(c.name for c in CHIPS)}.")


def check_peak_spec(spec: str) -> None:
  """Raises ValueError unless `spec` is "auto", a chip name or a positive number."""
  if spec == "auto":
    return
  try:
    value = float(spec)
  except ValueError:
    chip_by_name(spec)
    return
  if not value > 0:
    raise ValueError(f"a numeric peak must be positive FLOP/s per device, got {spec!r}.")


def _table_peak(chip: Chip, compute_dtype: str) -> tuple[float, str]:
  if compute_dtype == "float32" and chip.fp32:
    return chip.fp32, f"table: {chip.name} dense float32 matmul (TF32)"
  return chip.bf16, f"table: {chip.name} dense bf16"


def resolve_peak(spec: str, *, device_kind: str, platform: str, num_devices: int, compute_dtype: str = "bfloat16",
                 measure: Callable[[], float] = flops_lib.measure_matmul_flops) -> dict:
  """The peak FLOP/s that MFU is taken against, summed over `num_devices`.

  Args:
    spec: "auto" (the table entry for `device_kind`; on CPU, or for a kind not
      in the table, the measured 2048^2 float32 matmul rate), a chip name from
      `CHIPS`, or a number: FLOP/s per device.
    device_kind: `jax.devices()[0].device_kind`.
    platform: `jax.devices()[0].platform` ("cpu", "gpu", "tpu").
    num_devices: devices the step runs on.
    compute_dtype: `model.compute_dtype`; float32 picks a chip's `fp32` peak.
    measure: returns one device's measured matmul FLOP/s.

  Returns:
    {"flops_per_s", "per_device", "chip", "source"}.
  """
  chip = None
  if spec == "auto":
    chip = chip_for_kind(device_kind) if platform != "cpu" else None
    if chip is None:
      per = measure()
      why = "" if platform == "cpu" else f" ({device_kind!r} is not in the peaks table)"
      return {"flops_per_s": per * num_devices, "per_device": per, "chip": None,
              "source": f"measured: 2048^2 float32 matmul on one device{why}"}
  else:
    check_peak_spec(spec)
    try:
      per = float(spec)
    except ValueError:
      chip = chip_by_name(spec)
    else:
      return {"flops_per_s": per * num_devices, "per_device": per, "chip": None, "source": "given (--peak)"}
  per, source = _table_peak(chip, compute_dtype)
  return {"flops_per_s": per * num_devices, "per_device": per, "chip": chip.name, "source": source}


# ---- the measurement.


def synthetic_vocab(cd, vocab_size: int | None = None) -> int:
  """The vocabulary the run would have: the flag, model.vocab_size, the .npy size or the tokenizer's pieces."""
  if vocab_size:
    return int(vocab_size)
  if cd.model.vocab_size:
    return int(cd.model.vocab_size)
  if cd.data.source == "npy" and cd.data.npy_vocab_size:
    return int(cd.data.npy_vocab_size)
  if cd.data.source in ("shakespeare", "text") and not cd.data.tokenizer_path:
    return int(cd.data.tokenizer_vocab_size)
  raise errors.ConfigError(f"data.source={cd.data.source!r} takes its vocabulary from a tokenizer file or the data; "
                           "pass --vocab_size.")


def synthetic_corpus(vocab: int, seq_len: int, rows: int, seed: int = 0) -> pipeline.Corpus:
  """Uniformly random token rows standing in for the data: the step's cost does not depend on their values."""
  rng = np.random.default_rng(seed)
  train = rng.integers(0, vocab, (rows, seq_len), dtype=np.int32)
  return pipeline.Corpus(train=train, val=train[:1], vocab_size=vocab, tokenizer=None,
                         unigram_counts=np.bincount(train.reshape(-1), minlength=vocab).astype(np.float64),
                         info={"source": "synthetic", "seq_len": seq_len, "vocab_size": vocab})


def prepare_config(cd, *, vocab_size: int | None = None, mesh_shape: Sequence[int] | None = None):
  """A converted config for synthetic data: required data paths filled with "", vocabulary and mesh resolved."""
  cd = copy.deepcopy(cd)
  for key in ("train_files", "val_files"):
    if cd.data[key] is None:
      cd.data[key] = ""
  if mesh_shape is not None:
    cd.mesh.shape = tuple(int(s) for s in mesh_shape)
  vocab = synthetic_vocab(cd, vocab_size)
  c = config_lib.from_config_dict(cd)
  return c, vocab


def synthetic_run(cd, *, num_batches: int = 2, vocab_size: int | None = None,
                  mesh_shape: Sequence[int] | None = None, seed: int = 0):
  """The config's run built as the train loop builds it, and `num_batches` global batches of random tokens.

  Returns (converted config with model.vocab_size set, `build_lib.Run`, list of global batches).
  """
  c, vocab = prepare_config(cd, vocab_size=vocab_size, mesh_shape=mesh_shape)
  rows = c.train.batch_size // jax.process_count()
  corpus = synthetic_corpus(vocab, c.data.seq_len, num_batches * rows, seed=seed + jax.process_index())
  c = build_lib.resolve_vocab(c, corpus)
  run_ = build_lib.build(c, corpus)
  batches = [build_lib.global_batch(run_, {"tokens": corpus.train[i * rows:(i + 1) * rows]})
             for i in range(num_batches)]
  return c, run_, batches


def step_time_stats(times: Sequence[float]) -> dict:
  t = [float(x) for x in times]
  return {"median": statistics.median(t), "mean": statistics.fmean(t),
          "std": statistics.stdev(t) if len(t) > 1 else 0.0, "min": min(t), "max": max(t), "all": t}


def peak_memory(devices: Sequence[Any]) -> dict:
  """Peak device memory when the backend reports it, else the process's maximum resident set size."""
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  if peaks and len(peaks) == len(devices):
    return {"bytes": max(peaks), "source": f"device memory_stats()['peak_bytes_in_use'], largest of {len(peaks)} "
                                           "local device(s)"}
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  rss *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
  return {"bytes": int(rss), "source": "process max RSS (resource.getrusage); the backend reports no device memory"}


def compiled_memory(compiled) -> dict | None:
  """XLA's memory plan of a compiled computation (bytes), known before it runs; None if not reported."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  return {f.replace("_size_in", ""): int(getattr(m, f)) for f in fields if hasattr(m, f)}


def _timed(fn: Callable[[int], Any], warmup: int, steps: int) -> list[float]:
  for i in range(warmup):
    jax.block_until_ready(fn(i))
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(warmup + i))
    times.append(time.perf_counter() - t0)
  return times


def run(cd, *, config_name: str = "", steps: int = 10, warmup: int = 2, vocab_size: int | None = None,
        mesh_shape: Sequence[int] | None = None, peak: str = "auto", forward_only: bool = False,
        xla_flops: bool = True, seed: int = 0) -> dict:
  """Builds the config's run on synthetic tokens and times the compiled train step (or one forward pass).

  Args:
    cd: the experiment's ConfigDict (configs/*.py, with overrides).
    config_name: recorded in the result.
    steps: timed steps, each waited for with `block_until_ready`.
    warmup: untimed steps run first.
    vocab_size: the vocabulary when the config takes it from a tokenizer or data.
    mesh_shape: replaces `mesh.shape`.
    peak: "auto", a chip name or FLOP/s per device (see `resolve_peak`).
    forward_only: time `objective.forward` on a global batch instead of the train step.
    xla_flops: also compile an unrolled forward pass for XLA's FLOP count.
    seed: of the synthetic tokens.

  Returns:
    A JSON-able dict (see docs/launch.md for the fields).
  """
  if steps < 1 or warmup < 0:
    raise ValueError(f"need steps >= 1 and warmup >= 0, got {steps} and {warmup}.")
  check_peak_spec(peak)
  c, run_, batches = synthetic_run(cd, vocab_size=vocab_size, mesh_shape=mesh_shape, seed=seed)
  b, seq_len, vocab = c.train.batch_size, c.data.seq_len, c.model.vocab_size
  devices = list(run_.mesh.devices.reshape(-1))
  local = [d for d in devices if d.process_index == jax.process_index()]
  num_params = model_lib.count(run_.state.params)

  fwd = flops_lib.config_forward_flops(c, token_input=run_.objective.token_input)
  t0 = time.perf_counter()
  fwd_xla = flops_lib.xla_forward_flops(run_.objective, run_.state.params, seq_len) if xla_flops else None
  xla_seconds = time.perf_counter() - t0
  sc = c.diffusion.selfcond_fraction if run_.objective.uses_selfcond_pass else 0.0

  key = jax.random.key(c.seed)
  t0 = time.perf_counter()
  if forward_only:
    fn = jax.jit(run_.objective.forward, in_shardings=(run_.params_sharding, run_.batch_sharding))
    compiled = fn.lower(run_.state.params, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    params = run_.state.params
    times = _timed(lambda i: compiled(params, batches[i % 2]), warmup, steps)
    per_step, per_step_no_sc, loss = fwd * b, fwd * b, None
  else:
    compiled = build_lib.compile_step(run_).lower(run_.state, batches[0], key).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": run_.state}

    def one(i):
      holder["state"], holder["m"] = compiled(holder["state"], batches[i % 2], key)
      return holder["state"], holder["m"]

    times = _timed(one, warmup, steps)
    per_step, per_step_no_sc = flops_lib.train_flops_per_step(fwd, batch=b, selfcond_fraction=sc)
    loss = float(jax.device_get(holder["m"]["loss"]))

  dev0 = devices[0]
  pk = resolve_peak(peak, device_kind=dev0.device_kind, platform=dev0.platform, num_devices=len(devices),
                    compute_dtype=c.model.compute_dtype)
  st = step_time_stats(times)
  med = st["median"]
  return {
      "config": config_name, "objective": c.objective, "mode": "forward" if forward_only else "train_step",
      "platform": dev0.platform, "device_kind": dev0.device_kind, "num_devices": len(devices),
      "num_processes": jax.process_count(), "mesh_shape": dict(run_.mesh.shape),
      "num_params": num_params, "batch_size": b, "seq_len": seq_len, "vocab_size": vocab,
      "compute_dtype": c.model.compute_dtype, "selfcond_fraction": sc, "steps": steps, "warmup": warmup,
      "compile_seconds": compile_s, "xla_forward_compile_seconds": xla_seconds if xla_flops else None,
      "step_seconds": st, "steps_per_s": 1.0 / med, "tokens_per_s": b * seq_len / med,
      "flops": {"forward_per_sequence_analytic": fwd, "forward_per_sequence_xla": fwd_xla,
                "xla_to_analytic": fwd_xla / fwd if fwd_xla else None,
                "per_step_analytic": per_step, "per_step_analytic_no_selfcond": per_step_no_sc},
      "flops_per_s": per_step / med, "flops_per_s_no_selfcond": per_step_no_sc / med,
      "peak": pk, "mfu": per_step / med / pk["flops_per_s"],
      "mfu_no_selfcond": per_step_no_sc / med / pk["flops_per_s"],
      "memory": peak_memory(local), "xla_memory": compiled_memory(compiled), "final_loss": loss,
      "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
      "cpu_count": os.cpu_count(), "jax_version": jax.__version__, "replaid_jax_version": replaid_jax.__version__,
      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }


def _si(x: float | None, unit: str = "") -> str:
  if x is None:
    return "n/a"
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.3g} {prefix}{unit}"
  return f"{x:.3g} {unit}".rstrip()


def summary_line(r: dict) -> str:
  st = r["step_seconds"]
  what = "forward" if r["mode"] == "forward" else "step"
  return (f"{r['config'] or r['objective']}: {r['tokens_per_s']:,.0f} tokens/s, {what} {st['median'] * 1e3:.1f} ms "
          f"median ({st['mean'] * 1e3:.1f} mean ± {st['std'] * 1e3:.1f}), {_si(r['flops_per_s'], 'FLOP/s')}, "
          f"MFU {r['mfu']:.3f} of {_si(r['peak']['flops_per_s'], 'FLOP/s')} ({r['peak']['source']}), "
          f"{r['num_devices']} x {r['device_kind']}")


def _gib(x: float) -> str:
  return f"{x / 2**30:.2f} GiB"


def summary_table(r: dict) -> str:
  """The result as aligned `name  value` lines."""
  f, st, mem = r["flops"], r["step_seconds"], r["memory"]
  differs = f["per_step_analytic"] != f["per_step_analytic_no_selfcond"]

  def sc(text: str) -> str:
    return f" ({text} without the self-conditioning pass)" if differs else ""

  ms = {k: f"{st[k] * 1e3:.2f}" for k in ("median", "mean", "std", "min", "max")}
  rows = [
      ("config", f"{r['config']} ({r['objective']}, {r['mode']}, {r['compute_dtype']})"),
      ("devices", f"{r['num_devices']} x {r['device_kind']} ({r['num_processes']} process(es)), "
                  f"mesh {r['mesh_shape']}"),
      ("parameters", f"{r['num_params']:,}"),
      ("batch x length", f"{r['batch_size']} x {r['seq_len']} (vocab {r['vocab_size']:,})"),
      ("compile", f"{r['compile_seconds']:.1f} s"),
      (f"{r['mode']} time", f"median {ms['median']} ms, mean {ms['mean']} ± {ms['std']}, min {ms['min']}, "
                            f"max {ms['max']} over {r['steps']}"),
      ("tokens/s", f"{r['tokens_per_s']:,.0f}"),
      ("forward FLOPs/seq", f"analytic {f['forward_per_sequence_analytic']:.4g}, XLA (unrolled) "
                            f"{_fmt(f['forward_per_sequence_xla'], '.4g')} "
                            f"(ratio {_fmt(f['xla_to_analytic'], '.3f')})"),
      ("FLOPs per " + ("pass" if r["mode"] == "forward" else "step"),
       f"{f['per_step_analytic']:.4g}" + sc(f"{f['per_step_analytic_no_selfcond']:.4g}")),
      ("achieved", _si(r["flops_per_s"], "FLOP/s") + sc(_si(r["flops_per_s_no_selfcond"], "FLOP/s"))),
      ("peak", f"{_si(r['peak']['flops_per_s'], 'FLOP/s')} ({r['peak']['source']})"),
      ("MFU", f"{r['mfu']:.4f}" + sc(f"{r['mfu_no_selfcond']:.4f}")),
      ("peak memory", f"{_gib(mem['bytes'])} ({mem['source']})"),
  ]
  xm = r.get("xla_memory")
  if xm and "temp_bytes" in xm:
    rows.append(("XLA memory plan", f"arguments {_gib(xm.get('argument_bytes', 0))}, temporaries "
                                    f"{_gib(xm['temp_bytes'])}, outputs {_gib(xm.get('output_bytes', 0))} "
                                    f"(aliased {_gib(xm.get('alias_bytes', 0))})"))
  if r.get("load_average"):
    rows.append(("load average", ", ".join(f"{x:.2f}" for x in r["load_average"]) + f" on {r['cpu_count']} CPUs"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def _fmt(x: float | None, spec: str) -> str:
  return "n/a" if x is None else format(x, spec)


# ---- cost and time estimates.

# The scaling protocol's FLOP budgets (C) and the SlimPajama sizes the estimate covers.
PROTOCOL_BUDGETS = (6e18, 1e19, 3e19, 6e19, 1e20)
ESTIMATE_SIZES = ("66M", "231M")


@dataclasses.dataclass(frozen=True)
class Workload:
  """A training run to price: `steps` steps of `batch` sequences of forward cost `fwd_flops`."""

  name: str
  fwd_flops: float
  batch: int
  steps: int
  selfcond_fraction: float
  budget: float | None = None
  seq_len: int = 0

  @property
  def tokens(self) -> float:
    return float(self.steps * self.batch * self.seq_len)

  @property
  def protocol_flops(self) -> float:
    """3 F_fwd B per step: the protocol's count."""
    return 3.0 * self.fwd_flops * self.batch * self.steps

  @property
  def executed_flops(self) -> float:
    """The protocol's count plus the self-conditioning pass (F_fwd B f per step)."""
    return flops_lib.train_flops_per_step(self.fwd_flops, batch=self.batch,
                                          selfcond_fraction=self.selfcond_fraction)[0] * self.steps


def config_dict_forward_flops(cd, vocab_size: int | None = None) -> float:
  """`flops.forward_flops_per_sequence` read from a ConfigDict (no data, no validation)."""
  return flops_lib.forward_flops_per_sequence(
      seq_len=cd.data.seq_len, width=cd.model.width, num_layers=cd.model.num_layers,
      vocab_size=synthetic_vocab(cd, vocab_size), embed_dim=cd.model.embed_dim, mlp_ratio=cd.model.mlp_ratio,
      output_prior=bool(cd.diffusion.output_prior), token_input=objectives.REGISTRY[cd.objective].token_input)


def workload(cd, name: str, *, budget: float | None = None, vocab_size: int | None = None) -> Workload:
  """The config's run: `train.num_steps` steps, or the steps that spend `budget` at 3 F_fwd B per step."""
  fwd = config_dict_forward_flops(cd, vocab_size)
  b = int(cd.train.batch_size)
  steps = flops_lib.steps_for_budget(budget, fwd, b) if budget else int(cd.train.num_steps)
  sc = float(cd.diffusion.selfcond_fraction) if objectives.REGISTRY[cd.objective].self_conditions else 0.0
  return Workload(name, fwd, b, steps, sc, budget, int(cd.data.seq_len))


def protocol_workloads() -> list[Workload]:
  """configs/demo.py and configs/owt_base.py as configured, and configs/slimpajama.py sizes at each budget."""
  from configs import demo, owt_base, slimpajama  # pylint: disable=g-import-not-at-top
  out = [workload(demo.get_config(), "demo"), workload(owt_base.get_config(), "owt_base")]
  for size in ESTIMATE_SIZES:
    for budget in PROTOCOL_BUDGETS:
      out.append(workload(slimpajama.get_config(size), f"slimpajama:{size}", budget=budget))
  return out


def estimate(w: Workload, chip: Chip, *, num_chips: int, mfu: float) -> dict:
  """Time and cost of `w` on `num_chips` chips at `mfu` of the bf16 peak, on the executed FLOPs."""
  chip_seconds = w.executed_flops / (mfu * chip.bf16)
  return {"workload": w.name, "chip": chip.name, "num_chips": num_chips, "mfu": mfu,
          "chip_hours": chip_seconds / 3600, "wall_hours": chip_seconds / num_chips / 3600,
          "dollars": chip_seconds / 3600 * chip.price}


def _duration(hours: float) -> str:
  if hours < 1 / 3600:
    return "<1 s"
  if hours < 1 / 60:
    return f"{hours * 3600:.0f} s"
  if hours < 1:
    return f"{hours * 60:.0f} min"
  if hours < 48:
    return f"{hours:.1f} h"
  return f"{hours / 24:.1f} d"


def _dollars(x: float) -> str:
  if x < 0.01:
    return "<$0.01"
  return f"${x:,.2f}" if x < 10 else f"${x:,.0f}"


def estimate_table(workloads: Sequence[Workload] | None = None, chips: Sequence[Chip] = CHIPS, *, num_chips: int = 8,
                   mfu: float = 0.4) -> str:
  """Markdown: per workload its FLOPs, and per chip the wall time on `num_chips` chips and the dollars."""
  workloads = protocol_workloads() if workloads is None else workloads
  head = ["run", "budget C", "steps x batch", "tokens", "3 F B x steps", "executed (+ s.c.)"] + [c.name for c in chips]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for w in workloads:
    cells = [w.name, _fmt(w.budget, ".0e") if w.budget else "(config)", f"{w.steps:,} x {w.batch}",
             f"{w.tokens:.3g}", f"{w.protocol_flops:.3g}", f"{w.executed_flops:.3g}"]
    for chip in chips:
      e = estimate(w, chip, num_chips=num_chips, mfu=mfu)
      cells.append(f"{_duration(e['wall_hours'])} / {_dollars(e['dollars'])}")
    lines.append("| " + " | ".join(cells) + " |")
  notes = [
      "",
      f"Each chip cell: wall-clock time on {num_chips} chips / dollars, at an assumed MFU of {mfu:.0%} of the dense "
      "bf16 peak, on the executed FLOPs (3 F_fwd B per step plus the self-conditioning pass, F_fwd B f).",
      "Assumed on-demand prices per chip-hour (check before use): " + "; ".join(
          f"{c.name} ${c.price:.2f} ({c.price_source}), peak {c.bf16 / 1e12:.0f} TFLOP/s" for c in chips) + ".",
  ]
  return "\n".join(lines + notes)

