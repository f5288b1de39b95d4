"""Times the real train step of a config on synthetic tokens; prints cost estimates.

  python launch/benchmark.py --config=configs/demo.py --steps=20 --warmup=3 --json_out=/tmp/demo.json
  python launch/benchmark.py --config=configs/owt_base.py --config.train.batch_size=2 --steps=2 --warmup=1
  python launch/benchmark.py --config=configs/slimpajama.py:66M --peak=h100 --forward_only
  python launch/benchmark.py --estimate [--mfu=0.4 --num_chips=8]

No data files or tokenizer are read: the run is built on random tokens of the
config's shape (`--vocab_size` when the config takes its vocabulary from a
tokenizer file or data shards). `--peak=auto` takes the chip's dense peak from
the table in replaid_jax/chips.py (on CPU: a measured 2048^2 float32
matmul), `--peak=<chip>` names a row and `--peak=<number>` gives FLOP/s per
device; either is multiplied by the number of devices. On TPU pods and under
SLURM every process runs the same command, as for launch/train.py.
"""

from replaid_jax import hostenv

hostenv.reexec_with_huge_pages()  # first, before JAX allocates anything: see replaid_jax/hostenv.py

import json
import os

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from replaid_jax import benchmark
from replaid_jax import chips
from replaid_jax import cli
from replaid_jax import cost_estimate
from replaid_jax import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:arg]).",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps run first (after compilation).")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 0, "Vocabulary size when the config takes it from a tokenizer.")
_MESH_SHAPE = flags.DEFINE_list("mesh_shape", None, "Replaces mesh.shape, e.g. 2,-1,1.")
_PEAK = flags.DEFINE_string("peak", "auto", "auto, a chip name (" + ", ".join(c.name for c in chips.CHIPS) +
                            ") or peak FLOP/s per device.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Where to write the result as JSON.")
_FORWARD_ONLY = flags.DEFINE_bool("forward_only", False, "Time one forward pass of the network instead of the step.")
_XLA_FLOPS = flags.DEFINE_bool("xla_flops", True, "Also compile an unrolled forward pass for XLA's FLOP count.")
_ESTIMATE = flags.DEFINE_bool("estimate", False, "Print the time and cost table of the protocol's runs.")
_MFU = flags.DEFINE_float("mfu", 0.4, "--estimate: assumed model FLOPs utilisation.")
_NUM_CHIPS = flags.DEFINE_integer("num_chips", 8, "--estimate: chips per run.")
distributed.define_flags()


def _valid_peak(spec: str) -> bool:
  try:
    chips.check_peak_spec(spec)
  except ValueError as e:
    raise flags.ValidationError(str(e)) from None
  return True


flags.register_validator("peak", _valid_peak)
flags.register_validator("steps", lambda n: n >= 1, "--steps must be at least 1.")
flags.register_validator("warmup", lambda n: n >= 0, "--warmup must be at least 0.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _ESTIMATE.value:
    print(cost_estimate.estimate_table(num_chips=_NUM_CHIPS.value, mfu=_MFU.value))
  if _CONFIG.value is None:
    if not _ESTIMATE.value:
      raise app.UsageError("pass --config=configs/X.py (or --estimate).")
    return
  cd = cli.config(_CONFIG)
  mesh_shape = [int(s) for s in _MESH_SHAPE.value] if _MESH_SHAPE.value else None
  distributed.initialize_from_flags(cpu_devices=distributed.cpu_devices_of(cd, mesh_shape))
  result = benchmark.run(
      cd, config_name=config_flags.get_config_filename(flags.FLAGS["config"]),
      steps=_STEPS.value, warmup=_WARMUP.value, vocab_size=_VOCAB_SIZE.value or None,
      mesh_shape=mesh_shape, peak=_PEAK.value,
      forward_only=_FORWARD_ONLY.value, xla_flops=_XLA_FLOPS.value)
  result["overrides"] = {k: repr(v) for k, v in config_flags.get_override_values(flags.FLAGS["config"]).items()}
  if jax.process_index() != 0:
    return
  print(benchmark.summary_line(result))
  print(benchmark.summary_table(result))
  if _JSON_OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_JSON_OUT.value)), exist_ok=True)
    with open(_JSON_OUT.value, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
      f.write("\n")
    print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  jax.config.config_with_absl()
  cli.run(main)
