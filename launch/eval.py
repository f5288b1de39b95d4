"""Evaluates a training run's checkpoints: likelihood bound with error bars, curves, embedding geometry.

  python launch/eval.py --workdir=runs/demo [--step=N | --watch] [--dataset=validation]
      [--curves] [--geometry] [--config.eval.key=value ...]

The model, diffusion, data and mesh settings come from the config saved with the
checkpoint; only --config.eval.* may be given (K = eval.final_num_times, default
8; the whole split unless --config.eval.max_batches is set). Datasets:
validation, train, text:<paths>, npy:<paths>, wikitext2, wikitext103, ptb, lm1b,
lambada, ag_news, pubmed, arxiv (zero-shot sets from --config.eval.data_dir).
Results: <workdir>/eval/<dataset>_<split>_step<N>.json (or --output_dir).
"""

from replaid_jax import hostenv

hostenv.reexec_with_huge_pages()  # first, before JAX allocates anything: see replaid_jax/hostenv.py

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from replaid_jax import base_config as base
from replaid_jax import cli
from replaid_jax import errors
from replaid_jax.eval import run

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory (it holds checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
_WATCH = flags.DEFINE_bool("watch", False, "Evaluate every new checkpoint once, polling; stop with Ctrl-C.")
_POLL = flags.DEFINE_float("poll_seconds", 60.0, "With --watch: seconds between looks for new checkpoints.")
_MAX_POLLS = flags.DEFINE_integer("max_polls", 0, "With --watch: stop after this many polls (0: until Ctrl-C).")
_DATASET = flags.DEFINE_string("dataset", "validation", "What to evaluate: validation, train, text:<paths or globs>, "
                               "npy:<paths>, or a zero-shot set (wikitext2, wikitext103, ptb, lm1b, lambada, "
                               "ag_news, pubmed, arxiv).")
_OUTPUT = flags.DEFINE_string("output_dir", "", "Where results go (default: <workdir>/eval).")
_BOUND = flags.DEFINE_bool("bound", True, "Compute the likelihood bound (--nobound for curves/geometry only).")
_CURVES = flags.DEFINE_bool("curves", False, "Also compute information-loss curves l(t), CE(t), error(t).")
_GEOMETRY = flags.DEFINE_bool("geometry", False, "Also analyse the embedding matrix (PCA scree, neighbours).")
_TIMING = flags.DEFINE_bool("timing", True, "Also time one forward pass to report the bound's cost ratio.")
_CONFIG = cli.define_section_config(
    "eval", base.get_base_config().eval, "Evaluation settings",
    "the model, diffusion, data and mesh sections come from the checkpoint's saved config")
flags.declare_key_flag("config")  # listed by --help with this binary's flags
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  overrides = dict(config_flags.get_override_values(flags.FLAGS["config"]))
  if _WATCH.value and _STEP.value is not None:
    raise errors.ConfigError("--watch evaluates every checkpoint as it appears; drop --step (or --watch).")
  analyses = tuple(name for name, on in (("bound", _BOUND.value), ("curves", _CURVES.value),
                                         ("geometry", _GEOMETRY.value)) if on)
  if not analyses:
    raise errors.ConfigError("--nobound with neither --curves nor --geometry leaves nothing to do.")
  kwargs = dict(dataset=_DATASET.value, overrides=overrides, output_dir=_OUTPUT.value or None, analyses=analyses,
                timing=_TIMING.value)
  for key in overrides:
    run.eval_section({}, {key: overrides[key]})  # a non-eval key fails here, before anything is loaded
  if _WATCH.value:
    run.watch(_WORKDIR.value, poll_seconds=_POLL.value, max_iterations=_MAX_POLLS.value or None, **kwargs)
  else:
    run.evaluate_checkpoint(_WORKDIR.value, step=_STEP.value, **kwargs)


if __name__ == "__main__":
  jax.config.config_with_absl()
  cli.run(main)
