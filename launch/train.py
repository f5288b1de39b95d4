"""Trains a RePlaid model.

  python launch/train.py --config=configs/demo.py --workdir=runs/demo [--config.train.num_steps=100 ...]

A run in an existing workdir resumes from its latest checkpoint.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from replaid_jax import cli
from replaid_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.info("process %d of %d", jax.process_index(), jax.process_count())
  loop.train_and_evaluate(cli.config(_CONFIG), _WORKDIR.value)


if __name__ == "__main__":
  jax.config.config_with_absl()
  cli.run(main)
