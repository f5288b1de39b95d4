"""Trains a RePlaid model.

  python launch/train.py --config=configs/demo.py --workdir=runs/demo [--config.train.num_steps=100 ...]

A run in an existing workdir resumes from its latest checkpoint. SIGTERM or
Ctrl-C saves a checkpoint at the next step and exits with status 0; rerun the
same command to resume.

Several processes (see docs/multihost.md): on TPU pods and SLURM (srun) the
processes find each other; elsewhere start one per host with
  --coordinator_address=HOST0:PORT --num_processes=N --process_id=I
and the same --workdir (a file system all of them share).
"""

from replaid_jax import hostenv

hostenv.reexec_with_huge_pages()  # first, before JAX allocates anything: see replaid_jax/hostenv.py

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from replaid_jax import cli
from replaid_jax import distributed
from replaid_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_STOP_AFTER = flags.DEFINE_integer("stop_after", None, "End this invocation after this many steps with a checkpoint "
                                   "and no final evaluation (as a preempted job would); rerunning resumes.")
_ALLOW_CHANGES = flags.DEFINE_boolean(
    "allow_config_changes", False, "Resume even though the config differs from the saved one in keys that change "
    "the model, data or objective (differences are listed either way).")
_RESUME_FROM = flags.DEFINE_integer(
    "resume_from_step", None, "Resume from this checkpoint step instead of the newest one (newer steps are moved to "
    "<workdir>/checkpoints_damaged/): the way back from a run that diverged after its newest checkpoint.")
distributed.define_flags()
flags.adopt_module_key_flags(distributed)  # --help lists the multi-process flags too
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cd = cli.config(_CONFIG)
  distributed.initialize_from_flags(cpu_devices=distributed.cpu_devices_of(cd))
  with distributed.handle_preemption():
    loop.train_and_evaluate(cd, _WORKDIR.value, stop_after=_STOP_AFTER.value,
                            allow_config_changes=_ALLOW_CHANGES.value, resume_from_step=_RESUME_FROM.value)


if __name__ == "__main__":
  jax.config.config_with_absl()
  cli.run(main)
