"""Generates text from a trained run's checkpoint (EMA parameters and the saved config).

  python launch/sample.py --workdir=runs/demo [--step=N] [--config.sample.KEY=VALUE ...] [--benchmark]

Examples:
  --config.sample.sampler=dpm2m --config.sample.steps=64
  --config.sample.prefix="ROMEO:" --config.sample.suffix="Exeunt." --config.sample.gap=20
  --config.sample.constraints="crown:2,king" --config.sample.avoid="death"
  --config.sample.judge=gpt2:/path/to/local/gpt2

Writes <workdir>/samples/step<N>.jsonl (step<N>_2.jsonl, ... if it exists, or --output=FILE.jsonl) and
the matching .summary.json; every sample key is described in replaid_jax/base_config.py. Only the sample
section can be overridden.
"""

from replaid_jax import hostenv

hostenv.reexec_with_huge_pages()  # first, before JAX allocates anything: see replaid_jax/hostenv.py

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from replaid_jax import base_config as base
from replaid_jax import cli
from replaid_jax.sample import run


_CONFIG = cli.define_section_config(
    "sample", base.get_base_config().sample, "Sampling settings",
    "the model, diffusion, data and mesh sections come from the checkpoint's saved config")
flags.declare_key_flag("config")  # listed by --help with this binary's flags
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory (holds checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to sample from (default: the latest).")
_OUTPUT = flags.DEFINE_string("output", None, "Write the samples to this new .jsonl file (default: "
                              "<workdir>/samples/step<N>.jsonl, or step<N>_2.jsonl, ... when it exists).")
_BENCHMARK = flags.DEFINE_boolean("benchmark", False, "Also time a sampler step against one forward pass.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  overrides = {key.split(".", 1)[1]: value
               for key, value in config_flags.get_override_values(flags.FLAGS["config"]).items()}
  run.sample_checkpoint(_WORKDIR.value, step=_STEP.value, overrides=overrides, benchmark=_BENCHMARK.value,
                        output=_OUTPUT.value)


if __name__ == "__main__":
  jax.config.config_with_absl()
  cli.run(main)
