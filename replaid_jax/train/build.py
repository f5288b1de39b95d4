"""A training run's parts, built from a config and a corpus: mesh, objective, optimizer, sharded state, step.

`build` traces the objective's init once (its abstract structure gives every sharding and the FLOP count) and
returns a `Run`; `compile_step` compiles its train step; `metadata` is what every checkpoint records, and
`check_resume_compatible` compares a saved record with the run about to resume from it.
"""

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

import replaid_jax
from replaid_jax import config_lib
from replaid_jax import errors
from replaid_jax import sharding as sharding_lib
from replaid_jax.data import pipeline
from replaid_jax import objectives
from replaid_jax.eval import bound as bound_lib
from replaid_jax.train import optim
from replaid_jax.train import step as step_lib
from replaid_jax.models import model as model_lib




@dataclasses.dataclass
class Run:
  """Everything built from a config, before any training step."""

  config: config_lib.Config
  corpus: pipeline.Corpus
  mesh: Any
  state: step_lib.TrainState
  state_sharding: Any
  params_sharding: Any
  batch_sharding: Any
  tx: Any
  axes: Any
  objective: objectives.Objective


@flax.struct.dataclass
class _Built:
  """The train state drawn by `build`'s one trace of the model's init, with the shardings computed in that trace.

  The shardings are static fields: they leave the jitted function in its output's tree structure, not as arrays.
  """

  state: step_lib.TrainState
  params_sharding: Any = flax.struct.field(pytree_node=False)
  state_sharding: Any = flax.struct.field(pytree_node=False)


def resolve_vocab(c: config_lib.Config, corpus: pipeline.Corpus) -> config_lib.Config:
  """Fills model.vocab_size from the data, or checks that the two agree."""
  if c.model.vocab_size is None:
    return dataclasses.replace(c, model=dataclasses.replace(c.model, vocab_size=corpus.vocab_size))
  if c.model.vocab_size != corpus.vocab_size:
    raise errors.ConfigError(
        f"model.vocab_size={c.model.vocab_size} but the tokenizer/data have {corpus.vocab_size} entries; "
        "leave model.vocab_size unset to take it from the data."
    )
  return c


def output_bias(c: config_lib.Config, corpus: pipeline.Corpus) -> np.ndarray | None:
  if c.model.output_bias_init == "zeros":
    return None
  return bound_lib.log_unigram(corpus.unigram_counts).astype(np.float32)


def build(c: config_lib.Config, corpus: pipeline.Corpus, devices=None) -> Run:
  """Mesh, sharded state and optimizer for a resolved config."""
  mesh = sharding_lib.make_mesh(c.mesh.axes, c.mesh.shape, devices)
  rules = c.mesh.rules
  split = sharding_lib.batch_divisor(mesh, rules)
  micro = c.train.batch_size // c.train.grad_accum_steps
  if micro % split:
    raise errors.ConfigError(
        f"the per-step micro-batch ({micro} sequences) is not divisible by the {split} devices the batch is "
        f"split over; set train.batch_size (with train.grad_accum_steps) to a multiple of {split}."
    )
  objective = objectives.make(c)
  # The weight-decay mask reads the parameters' logical axes when the optimizer's init first runs: inside the
  # trace below, after the model's init, which keeps them (no trace of its own).
  tx = optim.make(c.optim, total_steps=c.train.num_steps, axes=lambda: objective.abstract().axes,
                  frozen=objective.frozen_groups())
  bias = output_bias(c, corpus)

  def make_state(key):
    # The model's init, traced here once per process: the shapes and logical axes of its parameters give their
    # shardings, the train state's follow from those, and the compiled trace draws the values.
    params, axes = objective.init(key, None if bias is None else jnp.asarray(bias))
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    params_sh = sharding_lib.param_shardings(shapes, axes, rules, mesh)
    # Adam's moments and the EMA take their parameter's sharding, counters and loss statistics are replicated.
    state_sh = sharding_lib.derived_shardings(lambda p: step_lib.init_state(p, tx), shapes, params_sh, mesh)
    state = jax.lax.with_sharding_constraint(step_lib.init_state(params, tx), state_sh)
    return _Built(state, params_sh, state_sh)

  # The arrays come out laid out as state_sh says (XLA spells their specs without trailing Nones); the run keeps
  # state_sh itself, which the compiled step takes and gives back.
  built = jax.jit(make_state)(jax.random.key(c.seed))
  net = objective.abstract()  # the structure the init above kept: no second trace
  return Run(c, corpus, mesh, built.state, built.state_sharding, built.params_sharding,
             sharding_lib.batch_sharding(mesh, rules), tx, net.axes, objective)


def compile_step(run: Run):
  c = run.config
  fn = functools.partial(
      step_lib.train_step, tx=run.tx, objective=run.objective,
      grad_accum_steps=c.train.grad_accum_steps, ema_decay=c.optim.ema_decay,
      draws_per_sequence=c.train.draws_per_sequence,
  )
  fn = sharding_lib.with_activation_sharding(fn, run.mesh, c.mesh.rules)
  repl = sharding_lib.replicated(run.mesh)
  return jax.jit(fn, in_shardings=(run.state_sharding, run.batch_sharding, repl),
                 out_shardings=(run.state_sharding, repl), donate_argnums=(0,))


def global_batch(run: Run, local: np.ndarray) -> jax.Array:
  return jax.make_array_from_process_local_data(run.batch_sharding, np.asarray(local["tokens"], np.int32))


def metadata(run: Run, config_dict: dict) -> dict:
  tok = run.corpus.tokenizer
  return {
      "config": config_dict,
      "objective": run.config.objective,
      "vocab_size": run.config.model.vocab_size,
      "tokenizer": tok.identity() if tok is not None else None,
      "data": run.corpus.info,
      "replaid_jax_version": replaid_jax.__version__,
      "jax_version": jax.__version__,
      "num_params": model_lib.count(run.state.params),
  }


def check_resume_compatible(saved: dict, run: Run) -> None:
  """A checkpoint resumes only with the tokenizer and vocabulary it was trained with."""
  vocab = run.config.model.vocab_size
  if saved.get("vocab_size") != vocab:
    raise errors.CheckpointError(
        f"the checkpoint was trained with vocab_size={saved.get('vocab_size')} but the current tokenizer/data "
        f"give {vocab}; use the tokenizer recorded in the checkpoint metadata ({saved.get('tokenizer')}) or a new "
        "workdir."
    )
  tok = run.corpus.tokenizer
  old = saved.get("tokenizer")
  if tok is not None and old is not None and old.get("sha256") != tok.identity()["sha256"]:
    raise errors.CheckpointError(
        f"the checkpoint was trained with tokenizer {old.get('path')} (sha256 {old.get('sha256', '')[:12]}…), "
        f"not {tok.path}; set data.tokenizer_path to the original model or use a new workdir."
    )
