"""Throughput of the real train step on synthetic tokens.

`run(config_dict, ...)` builds a run exactly as the train loop does (mesh,
sharded state, optimizer), but on random tokens of the config's shape, so no
data files or tokenizer are needed; it compiles the train step, times it, and
reports tokens/s, FLOP/s by the analytic count (`flops.train_flops_per_step`),
XLA's forward count next to the analytic one, MFU against a chip peak
(`chips.resolve_peak`), compile time and peak memory; `summary_line` and
`summary_table` format it. `cost_estimate` turns FLOP budgets into chip-hours,
wall-clock time and dollars.
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
from replaid_jax import chips
from replaid_jax import config_lib
from replaid_jax import errors
from replaid_jax import flops as flops_lib
from replaid_jax.data import pipeline
from replaid_jax.train import build as build_lib
from replaid_jax.models import model as model_lib


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


@dataclasses.dataclass(frozen=True)
class _FlopCounts:
  """Forward FLOPs per sequence (analytic, and XLA's with its compile seconds) and the step's self-conditioning."""

  forward: float
  forward_xla: float | None
  xla_seconds: float | None
  selfcond_fraction: float


@dataclasses.dataclass(frozen=True)
class _Timed:
  """The compiled computation, its compile time, the timed steps and their analytic FLOPs."""

  mode: str
  compiled: Any
  compile_seconds: float
  times: list[float]
  per_step: float
  per_step_no_selfcond: float
  loss: float | None


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
    peak: "auto", a chip name or FLOP/s per device (see `chips.resolve_peak`).
    forward_only: time `objective.forward` on a global batch instead of the train step.
    xla_flops: also compile an unrolled forward pass for XLA's FLOP count.
    seed: of the synthetic tokens.

  Returns:
    A JSON-able dict (see docs/launch.md for the fields).
  """
  if steps < 1 or warmup < 0:
    raise ValueError(f"need steps >= 1 and warmup >= 0, got {steps} and {warmup}.")
  chips.check_peak_spec(peak)
  c, run_, batches = synthetic_run(cd, vocab_size=vocab_size, mesh_shape=mesh_shape, seed=seed)
  num_params = model_lib.count(run_.state.params)  # before the timed steps donate the state
  counts = _flop_counts(c, run_, xla_flops)
  time_steps = _time_forward if forward_only else _time_train_step
  timed = time_steps(c, run_, batches, counts, warmup, steps)
  devices = _devices(run_)
  pk = chips.resolve_peak(peak, device_kind=devices[0].device_kind, platform=devices[0].platform,
                          num_devices=len(devices), compute_dtype=c.model.compute_dtype,
                          num_processes=len({d.process_index for d in devices}))
  return _result(c, run_, config_name=config_name, num_params=num_params, counts=counts, timed=timed, peak=pk,
                 steps=steps, warmup=warmup)


def _devices(run_: build_lib.Run) -> list[Any]:
  return list(run_.mesh.devices.reshape(-1))


def _flop_counts(c, run_: build_lib.Run, xla_flops: bool) -> _FlopCounts:
  """The analytic forward count and, with `xla_flops`, XLA's count of an unrolled forward pass and its compile time."""
  fwd = flops_lib.config_forward_flops(c, token_input=run_.objective.token_input)
  t0 = time.perf_counter()
  fwd_xla = flops_lib.xla_forward_flops(run_.objective, run_.state.params, c.data.seq_len) if xla_flops else None
  xla_seconds = time.perf_counter() - t0
  sc = c.diffusion.selfcond_fraction if run_.objective.uses_selfcond_pass else 0.0
  return _FlopCounts(fwd, fwd_xla, xla_seconds if xla_flops else None, sc)


def _time_forward(c, run_: build_lib.Run, batches: list, counts: _FlopCounts, warmup: int, steps: int) -> _Timed:
  """Compiles `objective.forward` on a global batch and times it."""
  t0 = time.perf_counter()
  fn = jax.jit(run_.objective.forward, in_shardings=(run_.params_sharding, run_.batch_sharding))
  compiled = fn.lower(run_.state.params, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  params = run_.state.params
  times = _timed(lambda i: compiled(params, batches[i % 2]), warmup, steps)
  per_pass = counts.forward * c.train.batch_size
  return _Timed("forward", compiled, compile_s, times, per_pass, per_pass, None)


def _time_train_step(c, run_: build_lib.Run, batches: list, counts: _FlopCounts, warmup: int, steps: int) -> _Timed:
  """Compiles the train step and times it, each step on the state the previous one returned."""
  key = jax.random.key(c.seed)
  t0 = time.perf_counter()
  compiled = build_lib.compile_step(run_).lower(run_.state, batches[0], key).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": run_.state}

  def one(i):
    holder["state"], holder["m"] = compiled(holder["state"], batches[i % 2], key)
    return holder["state"], holder["m"]

  times = _timed(one, warmup, steps)
  per_step, per_step_no_sc = flops_lib.train_flops_per_step(counts.forward, batch=c.train.rows_per_step,
                                                            selfcond_fraction=counts.selfcond_fraction)
  loss = float(jax.device_get(holder["m"]["loss"]))
  return _Timed("train_step", compiled, compile_s, times, per_step, per_step_no_sc, loss)


def _result(c, run_: build_lib.Run, *, config_name: str, num_params: int, counts: _FlopCounts, timed: _Timed,
            peak: dict, steps: int, warmup: int) -> dict:
  """The JSON-able result of `run`."""
  devices = _devices(run_)
  local = [d for d in devices if d.process_index == jax.process_index()]
  dev0, b, seq_len = devices[0], c.train.batch_size, c.data.seq_len
  fwd, fwd_xla = counts.forward, counts.forward_xla
  per_step, per_step_no_sc = timed.per_step, timed.per_step_no_selfcond
  st = step_time_stats(timed.times)
  med = st["median"]
  return {
      "config": config_name, "objective": c.objective, "mode": timed.mode,
      "platform": dev0.platform, "device_kind": dev0.device_kind, "num_devices": len(devices),
      "num_processes": jax.process_count(), "mesh_shape": dict(run_.mesh.shape),
      "num_params": num_params, "batch_size": b, "seq_len": seq_len, "vocab_size": c.model.vocab_size,
      "compute_dtype": c.model.compute_dtype, "selfcond_fraction": counts.selfcond_fraction, "steps": steps,
      "warmup": warmup, "compile_seconds": timed.compile_seconds, "xla_forward_compile_seconds": counts.xla_seconds,
      "step_seconds": st, "steps_per_s": 1.0 / med, "tokens_per_s": b * seq_len / med,
      "flops": {"forward_per_sequence_analytic": fwd, "forward_per_sequence_xla": fwd_xla,
                "xla_to_analytic": fwd_xla / fwd if fwd_xla else None,
                "per_step_analytic": per_step, "per_step_analytic_no_selfcond": per_step_no_sc},
      "flops_per_s": per_step / med, "flops_per_s_no_selfcond": per_step_no_sc / med,
      "peak": peak, "mfu": per_step / med / peak["flops_per_s"],
      "mfu_no_selfcond": per_step_no_sc / med / peak["flops_per_s"],
      "memory": peak_memory(local), "xla_memory": compiled_memory(timed.compiled), "final_loss": timed.loss,
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
