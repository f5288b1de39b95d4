"""One GPU check of speed and bf16 numerics, written as one JSON: run it wherever a CUDA GPU is available.

  launch/gpu/check.sh                       # installs the [cuda] extra if JAX sees no GPU, then runs this
  python launch/gpu/check.py --config=configs/owt_base.py --out=gpu_check.json [--batches=8,16,32,64,128]
  python launch/gpu/check.py --config=configs/tiny.py --quick --out=/tmp/check.json   # a smoke run, any backend

Four measurements, each under its own key of the JSON:

- `train_step`: the bf16 train step of the config on random tokens at each of
  `--batches` in turn, up to the largest that fits (the first out-of-memory
  error ends the search): tokens/s and MFU against the chip's dense bf16 peak
  (`launch/benchmark.py` does the timing), with and without the self-conditioning pass.
- `forward`: one bf16 forward pass at that largest batch.
- `bf16_vs_fp32`: `--agreement_steps` train steps from the same initial parameters
  on the same batches with `model.compute_dtype` float32 and bfloat16; the loss
  curves, their largest relative difference, and `passed` when it stays under
  `--agreement_tolerance` with every loss finite.
- `sampler`: one RePlaid ancestral sampler step (compiled loop, `--sampler_steps`
  steps, the final decode included) against one self-conditioned forward pass
  at the same batch: `step_over_forward` should be near 2 (two passes per step).

The exit status is 1 when the bf16/fp32 agreement fails, so a CI job can run it.
"""

from replaid_jax import hostenv

hostenv.reexec_with_huge_pages()  # first, before JAX allocates anything: see replaid_jax/hostenv.py

import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from replaid_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "The config whose shape is checked (configs/owt_base.py).",
                                          lock_config=False)
_OUT = flags.DEFINE_string("out", "gpu_check.json", "Where the JSON goes.")
_BATCHES = flags.DEFINE_list("batches", ["8", "16", "32", "64", "128", "256"],
                             "Global batch sizes tried in order for the bf16 train step.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per measurement.")
_AGREEMENT_STEPS = flags.DEFINE_integer("agreement_steps", 20, "Train steps of the bf16 vs fp32 comparison.")
_AGREEMENT_BATCH = flags.DEFINE_integer("agreement_batch", 8, "Batch of the bf16 vs fp32 comparison.")
_TOLERANCE = flags.DEFINE_float("agreement_tolerance", 0.02, "Largest allowed |bf16 - fp32| / fp32 of a step's loss.")
_SAMPLER_STEPS = flags.DEFINE_integer("sampler_steps", 64, "Sampler steps timed for the step/forward ratio.")
_QUICK = flags.DEFINE_bool("quick", False, "Batches 4 and 8, 2 timed steps, 4 agreement steps: a smoke run (with "
                           "--config=configs/tiny.py).")


def _is_oom(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _with(cd, **overrides):
  """A copy of the ConfigDict with dotted-key overrides."""
  cd = cd.copy_and_resolve_references()
  for key, value in overrides.items():
    section, name = key.split(".")
    with cd.unlocked():
      cd[section][name] = value
  return cd


def train_steps(cd, *, log) -> dict:
  """The bf16 train step at each batch of --batches up to the largest that fits."""
  from replaid_jax import benchmark  # pylint: disable=g-import-not-at-top
  rows, largest = [], None
  for b in (int(x) for x in _BATCHES.value):
    try:
      r = benchmark.run(_with(cd, **{"model.compute_dtype": "bfloat16", "train.batch_size": b}), steps=_STEPS.value,
                        warmup=2, xla_flops=False)
    except Exception as e:  # pylint: disable=broad-except
      if not _is_oom(e):
        raise
      log(f"batch {b}: out of memory; the largest batch that fits is {largest}")
      rows.append({"batch_size": b, "out_of_memory": True})
      break
    largest = b
    rows.append({"batch_size": b, "tokens_per_s": r["tokens_per_s"], "mfu": r["mfu"],
                 "mfu_no_selfcond": r["mfu_no_selfcond"], "step_ms": 1e3 * r["step_seconds"]["median"],
                 "peak": r["peak"], "memory": r["memory"], "device_kind": r["device_kind"]})
    log(f"batch {b}: {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.3f} ({r['mfu_no_selfcond']:.3f} without "
        f"the self-conditioning pass)")
  return {"rows": rows, "largest_batch": largest}


def forward(cd, batch: int, *, log) -> dict:
  from replaid_jax import benchmark  # pylint: disable=g-import-not-at-top
  r = benchmark.run(_with(cd, **{"model.compute_dtype": "bfloat16", "train.batch_size": batch}), steps=_STEPS.value,
                    warmup=2, forward_only=True, xla_flops=False)
  log(f"forward at batch {batch}: {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.3f}")
  return {"batch_size": batch, "tokens_per_s": r["tokens_per_s"], "mfu": r["mfu"],
          "ms": 1e3 * r["step_seconds"]["median"]}


def _loss_curve(cd, steps: int) -> list[float]:
  import jax  # pylint: disable=g-import-not-at-top
  from replaid_jax import benchmark  # pylint: disable=g-import-not-at-top
  from replaid_jax.train import build as build_lib  # pylint: disable=g-import-not-at-top
  c, run_, batches = benchmark.synthetic_run(cd, num_batches=steps)
  step = build_lib.compile_step(run_)
  state, key, losses = run_.state, jax.random.key(c.seed), []
  for batch in batches:
    state, m = step(state, batch, key)
    losses.append(float(jax.device_get(m["loss"])))
  return losses


def agreement(cd, *, log) -> dict:
  """Loss curves of the same run in float32 and bfloat16 compute."""
  base = {"train.batch_size": _AGREEMENT_BATCH.value}
  fp32 = _loss_curve(_with(cd, **base, **{"model.compute_dtype": "float32"}), _AGREEMENT_STEPS.value)
  bf16 = _loss_curve(_with(cd, **base, **{"model.compute_dtype": "bfloat16"}), _AGREEMENT_STEPS.value)
  rel = [abs(b - f) / max(abs(f), 1e-12) for b, f in zip(bf16, fp32)]
  finite = all(x == x and abs(x) != float("inf") for x in fp32 + bf16)
  passed = finite and max(rel) <= _TOLERANCE.value
  log(f"bf16 vs fp32 over {len(rel)} steps: largest relative loss difference {max(rel):.4f} "
      f"({'passed' if passed else 'FAILED'}, tolerance {_TOLERANCE.value})")
  return {"fp32": fp32, "bf16": bf16, "relative_difference": rel, "max_relative_difference": max(rel),
          "mean_relative_difference": statistics.fmean(rel), "tolerance": _TOLERANCE.value, "finite": finite,
          "passed": passed}


def sampler_ratio(cd, batch: int, *, log) -> dict:
  """Seconds per sampler step over seconds per self-conditioned forward pass, in bf16, at `batch`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from replaid_jax import benchmark  # pylint: disable=g-import-not-at-top
  from replaid_jax.diffusion import sampler  # pylint: disable=g-import-not-at-top
  from replaid_jax.models import embedding  # pylint: disable=g-import-not-at-top
  c, run_, _ = benchmark.synthetic_run(_with(cd, **{"model.compute_dtype": "bfloat16", "train.batch_size": batch}),
                                       num_batches=1)
  params = run_.state.params
  seq_len, steps = c.data.seq_len, _SAMPLER_STEPS.value
  denoiser = sampler.ModelDenoiser(c.model, c.diffusion.output_prior)
  host = jax.device_get({"schedule": params["schedule"], "bounds": params["bounds"]})
  t, gammas = sampler.schedule_grid(host, steps, c.diffusion.schedule)
  table = embedding.normalized(params["embedding"])
  ids = jnp.arange(batch, dtype=jnp.int32)

  def sample():
    out = sampler.generate(denoiser, params, jax.random.key(0), sample_ids=ids, seq_len=seq_len, t=t, gammas=gammas,
                           table=table)
    jax.block_until_ready(out["tokens"])

  sample()  # compile
  t0 = time.perf_counter()
  sample()
  per_step = (time.perf_counter() - t0) / steps
  fwd = jax.jit(lambda p, z, g, x: denoiser(p, z, g, x, t=g)[1])  # t's value does not change the cost
  z = jax.random.normal(jax.random.key(1), (batch, seq_len, c.model.embed_dim))
  g = jnp.full((batch,), float(np.median(gammas)), jnp.float32)
  fwd(params, z, g, z).block_until_ready()
  times = []
  for _ in range(max(_STEPS.value, 5)):
    t0 = time.perf_counter()
    fwd(params, z, g, z).block_until_ready()
    times.append(time.perf_counter() - t0)
  per_fwd = statistics.median(times)
  log(f"sampler at batch {batch}: {1e3 * per_step:.2f} ms per step, {1e3 * per_fwd:.2f} ms per forward pass, "
      f"ratio {per_step / per_fwd:.2f}")
  return {"batch_size": batch, "steps": steps, "seconds_per_step": per_step, "seconds_per_forward": per_fwd,
          "step_over_forward": per_step / per_fwd}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  if _CONFIG.value is None:
    raise app.UsageError("pass --config=configs/owt_base.py (or launch/gpu/check.sh, which does).")
  cd = cli.config(_CONFIG)
  if _QUICK.value:
    flags.FLAGS.batches = ["4", "8"]
    flags.FLAGS.steps = 2
    flags.FLAGS.agreement_steps = 4
    flags.FLAGS.agreement_batch = 4
    flags.FLAGS.sampler_steps = 4
  log = lambda msg: print(msg, flush=True)
  dev = jax.devices()[0]
  log(f"{jax.device_count()} x {dev.device_kind} ({dev.platform}), jax {jax.__version__}")
  result = {"devices": {"count": jax.device_count(), "kind": dev.device_kind, "platform": dev.platform},
            "jax_version": jax.__version__, "config": config_flags.get_config_filename(flags.FLAGS["config"]),
            "quick": _QUICK.value, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
  result["train_step"] = train_steps(cd, log=log)
  largest = result["train_step"]["largest_batch"]
  if largest is None:
    raise SystemExit(f"error: not even batch {_BATCHES.value[0]} fits; pass smaller --batches.")
  result["forward"] = forward(cd, largest, log=log)
  result["bf16_vs_fp32"] = agreement(cd, log=log)
  result["sampler"] = sampler_ratio(cd, largest, log=log)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(result, f, indent=2)
  log(f"wrote {_OUT.value}")
  if not result["bf16_vs_fp32"]["passed"]:
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
