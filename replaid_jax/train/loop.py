"""The train loop: the one place where training meets files, devices and clocks.

`train_and_evaluate(config, workdir)`:
  1. converts and validates the config; loads (or builds) the tokenizer and data;
  2. builds the mesh, the sharded parameters and optimizer state;
  3. takes the workdir lock, then resumes from the workdir's newest intact
     checkpoint if there is one (damaged newer steps are set aside; config
     differences are listed, and those that change the model, data or objective
     refused), else starts from scratch (a resumed run continues the data order
     and random stream exactly where they stopped);
  4. with train.size_to_minutes, measures the speed over the first warm-up steps
     (or times the compiled step on a copy of the state) and sets
     train.num_steps, and the learning-rate schedule with it, to the steps that
     fit the budget (`size_run`; a resumed run keeps the decided count);
     trains, logging progress (replaid_jax/progress.py), metrics and throughput,
     evaluating and checkpointing
     on schedule, until `train.num_steps` or `train.max_minutes`; a preemption
     notice (SIGTERM, see replaid_jax/distributed.py) ends it at the next step
     with a checkpoint and no final evaluation; a step with a non-finite loss or
     gradients is not applied, and more of them than train.skip_nonfinite_steps
     stop the run before anything non-finite could be saved;
  5. saves, then evaluates the EMA parameters on the whole validation split and
     writes <workdir>/eval/final.json (and a few samples, to <workdir>/samples/).
"""

import dataclasses
import functools
import json
import time
from typing import Any

from absl import logging
import flax.struct
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

import replaid_jax
from replaid_jax import checkpoint as ckpt_lib
from replaid_jax import config_lib
from replaid_jax import distributed
from replaid_jax import errors
from replaid_jax import flops as flops_lib
from replaid_jax import metrics as metrics_lib
from replaid_jax import paths
from replaid_jax import progress as progress_lib
from replaid_jax import sharding as sharding_lib
from replaid_jax import workdir_lock
from replaid_jax.data import arrayrecord
from replaid_jax.data import tokenizer as tokenizer_lib
from replaid_jax.data import pipeline
from replaid_jax import objectives
from replaid_jax.eval import bound as bound_lib
from replaid_jax.eval import diagnostics
from replaid_jax.train import optim
from replaid_jax.train import plots
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
  tx = optim.make(c.optim, total_steps=c.train.num_steps, frozen=objective.frozen_groups())
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
        f"give {vocab}; use the tokenizer recorded in the checkpoint metadata ({saved.get('tokenizer')}) or a new workdir."
    )
  tok = run.corpus.tokenizer
  old = saved.get("tokenizer")
  if tok is not None and old is not None and old.get("sha256") != tok.identity()["sha256"]:
    raise errors.CheckpointError(
        f"the checkpoint was trained with tokenizer {old.get('path')} (sha256 {old.get('sha256', '')[:12]}…), "
        f"not {tok.path}; set data.tokenizer_path to the original model or use a new workdir."
    )


class _Evaluator:
  """Validation bound on the EMA parameters, jitted once per K."""

  def __init__(self, run: Run):
    self.run = run
    self._fns = {}

  def __call__(self, params, *, num_times: int, max_batches: int, key) -> dict:
    c = self.run.config
    if num_times not in self._fns:
      bound = bound_lib.make_bound_fn(
          self.run.objective, num_times=num_times,
          params_sharding=self.run.params_sharding, batch_sharding=self.run.batch_sharding)
      # Per-sequence results replicated, so that each process can read them all (several processes).
      gather = jax.jit(lambda terms: terms, out_shardings=sharding_lib.replicated(self.run.mesh))
      self._fns[num_times] = lambda *args: gather(bound(*args))
    put = functools.partial(jax.device_put, device=self.run.batch_sharding)
    t0 = time.time()
    out = bound_lib.evaluate(self._fns[num_times], params, self.run.corpus.val, key,
                             batch_size=c.eval.batch_size, max_batches=max_batches, put=put)
    out["num_times"] = num_times
    out["objective"] = c.objective
    out["protocol"] = self.run.objective.bound_protocol(num_times)
    out["seconds"] = time.time() - t0
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None,
                       allow_config_changes: bool = False, resume_from_step: int | None = None,
                       steps_per_second: float | None = None) -> dict:
  """Trains (or resumes) a run in `workdir`; returns the final evaluation.

  `stop_after` ends this invocation after that many steps with a checkpoint and
  no final evaluation, as a preempted job would; rerunning resumes it.
  `allow_config_changes` lets a run resume with a config that differs from the
  saved one in keys that change the model, data or objective (see
  config_lib.FROZEN_ON_RESUME); other differences are always allowed and logged.
  `resume_from_step` resumes from that checkpoint instead of the newest one;
  newer ones are moved to <workdir>/checkpoints_damaged/ (the way back from a
  run that diverged after its newest checkpoint was written).
  `steps_per_second`, with train.size_to_minutes, is taken as the measured speed instead of timing the step
  (a speed measured elsewhere, or a test's).
  """
  t_start = time.time()
  c = config_lib.from_config_dict(config)
  workdir = paths.absolute(workdir)
  if paths.exists(workdir) and not paths.isdir(workdir):
    raise errors.ConfigError(f"--workdir={workdir} is a file, not a directory; pass a new or existing directory.")
  try:
    paths.makedirs(workdir)
  except OSError as e:
    raise errors.ConfigError(f"--workdir={workdir} cannot be created ({e.strerror or e}); pass a directory you can "
                             "write to.") from None
  with workdir_lock.WorkdirLock(workdir):
    return _train(config, c, workdir, t_start, stop_after=stop_after, allow_config_changes=allow_config_changes,
                  resume_from_step=resume_from_step, steps_per_second=steps_per_second)


def resume(ckpt: ckpt_lib.Checkpointer, run: Run, train_iter: Any, config_dict: dict, *,
           allow_config_changes: bool = False, resume_from_step: int | None = None
           ) -> tuple[step_lib.TrainState | None, int | None]:
  """(restored state, step) from the newest intact checkpoint, or (None, None) when there is none yet.

  Newer steps that are damaged (checksums, missing or unreadable files, or
  non-finite values written by an older version) are reported in one line each
  and moved to <workdir>/checkpoints_damaged/. A step that verifies but does not
  fit the config, or a config that differs from the saved one in keys that
  change the model, data or objective, stops the run (see config_lib).
  """
  steps = sorted(ckpt.all_steps(), reverse=True)
  damaged: list[tuple[int, str]] = []
  if resume_from_step is not None:
    if resume_from_step not in steps:
      raise errors.ConfigError(f"--resume_from_step={resume_from_step}: there is no checkpoint of that step in "
                               f"{ckpt.directory}; its steps are {sorted(steps) or 'none'}.")
    damaged = [(s, f"it is newer than --resume_from_step={resume_from_step}") for s in steps if s > resume_from_step]
    steps = [s for s in steps if s <= resume_from_step]
  if not steps:
    return None, None
  abstract = ckpt_lib.abstract_like(run.state)
  for s in steps:
    state, changes, why = _restore_step(ckpt, s, run, train_iter, abstract, config_dict, allow_config_changes)
    if state is None:
      damaged.append((s, why))
      continue
    if changes:
      logging.warning("resuming from step %d with a config that differs from the saved one: %s", s,
                      config_lib.describe_changes(changes))
    if damaged:
      moved = ckpt.set_aside([d for d, _ in damaged])
      for (d, why), dest in zip(damaged, moved + [""] * len(damaged)):
        logging.warning("checkpoint step %d is set aside: %s; moved to %s; resuming from step %d", d, why,
                        dest or ckpt_lib.DAMAGED_DIR, s)
    return state, s
  raise errors.CheckpointError(
      f"no intact checkpoint in {ckpt.directory}: "
      + "; ".join(f"step {d}: {why}" for d, why in damaged)
      + ". Restore the files, or move the checkpoints away (or use a new --workdir) to start again.")


def _restore_step(ckpt: ckpt_lib.Checkpointer, s: int, run: Run, train_iter: Any, abstract: Any, config_dict: dict,
                  allow_config_changes: bool) -> tuple[step_lib.TrainState | None, list[tuple[str, Any, Any]], str]:
  """(state, config changes, "") restored from checkpoint step `s`, or (None, [], why) when the step is damaged.

  Stops the run (raises) where a damaged step is not the explanation: metadata or a state that cannot be read
  although the checksums verify, another tokenizer or vocabulary, or changes to frozen config keys (see
  `_resume_config_changes`).
  """
  status, why = ckpt.verify(s)
  if status == ckpt_lib.DAMAGED:
    return None, [], why
  try:
    saved = ckpt.metadata(s)
    if not isinstance(saved, dict):
      raise ValueError("the metadata is not a JSON object")
  except Exception as e:  # pylint: disable=broad-except
    if status == ckpt_lib.OK:
      raise errors.CheckpointError(f"the metadata of checkpoint step {s} in {ckpt.directory} cannot be read "
                                   f"({type(e).__name__}: {str(e)[:300]}); resume with the code version that "
                                   "wrote it.") from None
    return None, [], f"its metadata cannot be read ({type(e).__name__})"
  check_resume_compatible(saved, run)
  changes = _resume_config_changes(saved, config_dict, s, allow_config_changes)
  try:
    state = ckpt.restore_state(s, abstract, train_iter)
  except Exception as e:  # pylint: disable=broad-except
    if status == ckpt_lib.OK or jax.process_count() > 1:
      changed = f" The config differs from the saved one in: {config_lib.describe_changes(changes)}." if changes else ""
      raise errors.CheckpointError(
          f"checkpoint step {s} in {ckpt.directory} does not fit the train state built from this config "
          f"({type(e).__name__}: {str(e)[:300]}).{changed} Resume with the config that wrote it.") from None
    return None, [], f"it cannot be restored ({type(e).__name__}: {str(e)[:120]})"
  if not ckpt_lib.all_finite((state.params, state.ema_params, state.opt_state)):
    return None, [], "it holds non-finite parameters, EMA or optimizer state"
  return state, changes, ""


def _resume_config_changes(saved: dict, config_dict: dict, s: int, allow_config_changes: bool
                           ) -> list[tuple[str, Any, Any]]:
  """The differences between the config checkpoint step `s` was trained with and this one; raises on those that
  change the model, data or objective unless `allow_config_changes`."""
  current = config_dict
  if isinstance(saved.get("sizing"), dict):  # a sized run keeps the step count decided when it started
    current = {**config_dict, "train": {**config_dict["train"], "num_steps": saved["sizing"]["num_steps"]}}
  changes = config_lib.config_changes(saved.get("config") or {}, current)
  frozen = [ch for ch in changes if config_lib.frozen_on_resume(ch[0])]
  if frozen and not allow_config_changes:
    raise errors.ConfigError(
        f"the config differs from the one checkpoint step {s} was trained with in key(s) that change the model, "
        f"data or objective: {config_lib.describe_changes(frozen)}; resume with the saved values, use a new "
        "--workdir, or pass --allow_config_changes to resume anyway.")
  return changes


def _train(config: ml_collections.ConfigDict, c: config_lib.Config, workdir: str, t_start: float, *,
           stop_after: int | None, allow_config_changes: bool, resume_from_step: int | None,
           steps_per_second: float | None = None) -> dict:
  logging.info("RePlaid-JAX %s | jax %s | %d process(es), %d device(s): %s", replaid_jax.__version__,
               jax.__version__, jax.process_count(), jax.device_count(), jax.devices()[0].device_kind)

  # ArrayRecord training splits are streamed from their shards; only the validation split is loaded.
  corpus = pipeline.load_corpus(c.data, workdir=workdir, stream_train=True)
  logging.info("data: %s", json.dumps(corpus.info))
  c = resolve_vocab(c, corpus)
  run = build(c, corpus)
  logging.info("model: %s parameters (%s in the denoiser)\n%s", f"{model_lib.count(run.state.params):,}",
               f"{model_lib.count(run.state.params['denoiser']):,}",
               metrics_lib.parameter_table(run.state.params))

  ckpt = ckpt_lib.Checkpointer(workdir, keep=c.checkpoint.keep, async_save=c.checkpoint.async_save)
  # Each process reads its own rows of every global batch (see pipeline.train_iterator).
  shard_args = dict(global_batch=c.train.batch_size, seed=c.seed, process_index=jax.process_index(),
                    process_count=jax.process_count(), num_workers=c.data.num_workers)
  if corpus.train is None:
    train_iter = arrayrecord.train_iterator_from_shards(corpus.train_shards, seq_len=c.data.seq_len, **shard_args)
  else:
    train_iter = pipeline.train_iterator(corpus.train, **shard_args)
  meta = metadata(run, config.to_dict())
  try:
    restored, latest = resume(ckpt, run, train_iter, meta["config"], allow_config_changes=allow_config_changes,
                              resume_from_step=resume_from_step)
  except BaseException:
    ckpt.close()
    raise
  # Metrics logged after the checkpoint a run resumes from are dropped: those steps are trained again.
  writer = metrics_lib.MetricWriter(paths.join(workdir, "train"), resume_step=latest)
  if latest is not None:
    state = restored
    logging.info("resumed from %s at step %d", ckpt.directory, latest)
    sizing = ckpt.metadata(latest).get("sizing")
    if isinstance(sizing, dict):
      run = with_num_steps(run, sizing["num_steps"])
      c = run.config
      meta["config"]["train"]["num_steps"], meta["sizing"] = c.train.num_steps, sizing
      logging.info("train.size_to_minutes: keeping the %d steps decided when the run started (%.3g steps/s "
                   "measured)", c.train.num_steps, sizing["steps_per_second"])
  else:
    state = run.state
  try:
    return _loop(c, run, corpus, ckpt, writer, train_iter, meta, state, latest, workdir, t_start, stop_after,
                 steps_per_second)
  finally:
    ckpt.close()
    writer.close()


def _noise_level_diagnostics(c, corpus, ema, writer, workdir: str, step: int) -> str:
  """Logs where along the noise level the model beats the context-free denoiser, and the embedding separation."""
  diag = diagnostics.denoiser_gain_by_level(
      ema, corpus.val[:c.eval.diagnostic_sequences], bound_lib.log_unigram(corpus.unigram_counts),
      jax.random.key(c.seed + 17), model_cfg=c.model, schedule=c.diffusion.schedule, bins=12, per_bin=2, use_output_prior=c.diffusion.output_prior)
  scalars = {"context_gain": diag["context_free_total"] - diag["model_total"],
             "context_free_diffusion": diag["context_free_total"], "model_diffusion": diag["model_total"],
             **diagnostics.embedding_separation(ema),
             **{f"gain_bin{i:02d}": g for i, g in enumerate(diag["gain"])}}
  writer.write(step, scalars, prefix="diag/", console=False)
  logging.info("[%d] context gain %.4f nats/token over the context-free denoiser (diffusion term on %d sequences); "
               "embedding rows: min distance %.3f, mean %.3f", step, scalars["context_gain"],
               min(c.eval.diagnostic_sequences, corpus.val.shape[0]), scalars["embed_min_dist"],
               scalars["embed_mean_dist"])
  path = paths.join(workdir, "plots", f"noise_levels_step{step}.png")
  diagnostics.plot_gain_by_level({f"step {step}": diag}, path)
  return path


# Logged to metrics.jsonl and TensorBoard but left off the console line (the progress part says them).
_NOT_ON_CONSOLE = ("nonfinite", "steps_per_s", "flops_per_s", "minutes", "eta")


@jax.jit
def _track_nonfinite(count, first, flag, step):
  """Device-side tally of skipped (non-finite) steps and the first of them: no host sync per step."""
  return count + flag, jnp.where((first < 0) & (flag > 0), step, first)


# Share of the time left after setup that a sized run keeps back for evaluations, checkpoints and data loading.
SIZE_RESERVE = 0.2
# A sized run measures its speed over its first real steps, up to this many, while they are warm-up steps (whose
# learning rate does not depend on the schedule's length); with a shorter warm-up it times a copy of the state.
SIZE_MEASURE_STEPS = 20


def sized_num_steps(steps_per_second: float, seconds_left: float, cap: int, done: int = 0) -> int:
  """The steps of a run sized to its budget: the `done` ones and those that fit `seconds_left` at the measured
  speed, less SIZE_RESERVE; at most `cap` (train.num_steps)."""
  return min(cap, done + max(0, int(steps_per_second * seconds_left * (1.0 - SIZE_RESERVE))))


def evaluation_fits(steps_left: int, steps_per_second: float | None, eval_seconds: float,
                    seconds_left: float) -> bool:
  """Whether a run with a time budget takes an in-loop evaluation now.

  False only when the evaluation is what would stop the run short of its schedule: the `steps_left` steps fit
  the `seconds_left` at the training pace `steps_per_second` (evaluations left out), but not with another
  `eval_seconds` spent evaluating. A run that cannot finish its schedule either way keeps its evaluations (the
  budget stops it, and they are what it reports), and so does one whose pace is not measured yet.
  """
  if not steps_per_second or steps_per_second <= 0 or steps_left <= 0:
    return True
  training = steps_left / steps_per_second
  return training > seconds_left or training + eval_seconds <= seconds_left


def with_num_steps(run: Run, num_steps: int) -> Run:
  """The run with train.num_steps set, and an optimizer whose learning-rate schedule spans that many steps.

  The optimizer state's structure does not depend on the schedule, so the built state (or a restored one) fits.
  """
  c = run.config
  if num_steps == c.train.num_steps:
    return run
  c = dataclasses.replace(c, train=dataclasses.replace(c.train, num_steps=num_steps))
  tx = optim.make(c.optim, total_steps=num_steps, frozen=run.objective.frozen_groups())
  return dataclasses.replace(run, config=c, tx=tx)


def time_train_step(run: Run, compiled, state, batch, key, *, min_steps: int = 3, min_seconds: float = 10.0,
                    max_steps: int = 200) -> float:
  """Steps/s of the compiled train step on a copy of `state` (the run's own state is left as it is).

  One untimed step first (its first execution), then at least `min_steps` steps and `min_seconds`.
  """
  copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=run.state_sharding)
  probe, _ = compiled(copy(state), batch, key)
  jax.block_until_ready(probe)
  n, t0 = 0, time.monotonic()
  while n < max_steps and (n < min_steps or time.monotonic() - t0 < min_seconds):
    probe, _ = compiled(probe, batch, key)
    jax.block_until_ready(probe)
    n += 1
  return n / max(time.monotonic() - t0, 1e-9)


def size_run(run: Run, rate: float, *, done: int, t_start: float, compile_s: float, measured: bool
             ) -> tuple[Run, dict]:
  """Sets train.num_steps (and the schedule) to what fits train.size_to_minutes at `rate` steps/s, `done` steps
  being trained already.

  The budget counts from the start of the run (tokenizer, data and compilation included); a new step count
  needs the step compiled again, which is charged to it at the first compilation's time. Returns the run and
  the record of the decision (saved with the checkpoints and in train/config.json).
  """
  c = run.config
  left = 60.0 * c.train.size_to_minutes - (time.time() - t_start)
  if jax.process_count() > 1:  # every process takes process 0's figures, hence the same schedule
    rate, left = (float(x) for x in multihost_utils.broadcast_one_to_all(np.array([rate, left], np.float64)))
  steps = sized_num_steps(rate, left, c.train.num_steps, done)
  if steps < c.train.num_steps:  # a second compilation, for the new schedule, comes out of the budget
    left -= compile_s
    steps = sized_num_steps(rate, left, c.train.num_steps, done)
  if steps <= c.optim.warmup_steps:
    raise errors.ConfigError(
        f"train.size_to_minutes={c.train.size_to_minutes:g}: at the measured {rate:.3g} steps/s only {steps} "
        f"steps fit the {max(left, 0):.0f} s left after setup, no more than the warm-up (optim.warmup_steps="
        f"{c.optim.warmup_steps}); raise train.size_to_minutes, or set it to 0 and choose train.num_steps.")
  record = {"num_steps": steps, "steps_per_second": rate, "seconds_left": left, "decided_at_step": done,
            "minutes": c.train.size_to_minutes, "cap": c.train.num_steps, "reserve": SIZE_RESERVE,
            "measured": measured}
  logging.info("train.size_to_minutes=%g: %.3g steps/s measured after compilation%s, %.0f s left -> %d steps "
               "(train.num_steps=%d at most; %.0f%% kept back for evaluations and checkpoints); the learning-rate "
               "schedule spans them", c.train.size_to_minutes, rate, f" over steps 2-{done}" if done else "", left,
               steps, c.train.num_steps, 100 * SIZE_RESERVE)
  return with_num_steps(run, steps), record


class _Pace:
  """The training pace, in-loop evaluations left out: steps/s from an origin (monotonic time, step), less the
  seconds the evaluations took since; `cost` is the latest evaluation's, what the next one is expected to take."""

  def __init__(self):
    self.origin: tuple[float, int] | None = None
    self.evaluating = 0.0
    self.cost = 0.0

  def restart(self, step: int, now: float | None = None) -> None:
    """Measures from `step`, done at `now` (default: the clock's time), on."""
    self.origin = (time.monotonic() if now is None else now, step)
    self.evaluating = 0.0

  def evaluated(self, seconds: float) -> None:
    """Records an in-loop evaluation that took `seconds`."""
    self.cost = seconds
    self.evaluating += seconds

  def rate(self, step: int) -> float | None:
    """Steps/s since the origin, evaluations left out; None before a step is timed."""
    if self.origin is None or step <= self.origin[1]:
      return None
    seconds = time.monotonic() - self.origin[0] - self.evaluating
    return (step - self.origin[1]) / seconds if seconds > 0 else None


class _NonfiniteTally:
  """The steps skipped for a non-finite loss or gradients, tallied on the device (no host sync per step) and read
  at the host syncs that happen anyway: logs, checkpoints and evaluations."""

  def __init__(self):
    self.count = jnp.zeros((), jnp.int32)
    self.first = jnp.full((), -1, jnp.int32)  # the first such step, -1 while there is none
    self.reported = 0  # the count the last warning gave

  def track(self, flag, step) -> None:
    self.count, self.first = _track_nonfinite(self.count, self.first, flag, step)

  def check(self, c: config_lib.Config, ckpt: ckpt_lib.Checkpointer) -> None:
    """Stops when more steps than train.skip_nonfinite_steps had a non-finite loss or gradients (none applied)."""
    count, first = (int(x) for x in jax.device_get((self.count, self.first)))
    if count > c.train.skip_nonfinite_steps:
      ckpt.wait()
      newest = ckpt.latest_step()
      lr = c.optim.lr
      raise errors.TrainingError(
          f"non-finite loss or gradients at step {first} ({count} step(s) in this run, train.skip_nonfinite_steps="
          f"{c.train.skip_nonfinite_steps}); no such update was applied and nothing non-finite was saved; the newest "
          f"checkpoint is step {newest if newest is not None else 'none (the run restarts from scratch)'}. To go on, "
          f"rerun with a lower learning rate (e.g. --config.optim.lr={lr / 10:g}; it may change on resume), from an "
          f"earlier checkpoint with --resume_from_step=N if the newest one diverges again, or skip such batches with "
          f"--config.train.skip_nonfinite_steps=N.")
    if count > self.reported:
      logging.warning("skipped %d step(s) with a non-finite loss or gradients so far (the first at step %d; "
                      "train.skip_nonfinite_steps=%d): their updates were not applied", count, first,
                      c.train.skip_nonfinite_steps)
      self.reported = count


class _Session:
  """One invocation of the train loop, from the compiled step to the final evaluation.

  It holds what the steps share: the run and its config (both replaced when train.size_to_minutes sizes the run),
  the compiled step, the train state, the progress and pace, the non-finite tally, the time of the last evaluation
  and the step of the last checkpoint. `_loop` calls its phases in order: `compile`, `plan_sizing`, `start`,
  `train` (which calls `run_step` per step), `finish`.
  """

  def __init__(self, c, run, corpus, ckpt, writer, train_iter, meta, state, latest, workdir, t_start, stop_after,
               steps_per_second):
    self.c, self.run, self.corpus, self.ckpt, self.writer = c, run, corpus, ckpt, writer
    self.train_iter, self.meta, self.state = train_iter, meta, state
    self.latest = latest  # the checkpoint step the run resumed from, None for a new run
    self.workdir, self.t_start, self.stop_after = workdir, t_start, stop_after
    self.steps_per_second = steps_per_second  # given instead of measured (see train_and_evaluate)

  # Setup: the compiled step, its FLOPs, and the step count of a sized run.

  def compile(self) -> None:
    """Draws the first batch and compiles the step on it; logs the FLOP counts and the peak they are set against."""
    c, run = self.c, self.run
    step_fn = compile_step(run)
    self.base_key = jax.random.key(c.seed)
    self.first_batch = self.batch = global_batch(run, next(self.train_iter))
    self.start_step = int(self.state.step)
    logging.info("%s", progress_lib.Progress(c.train.num_steps, label="train", start=self.start_step).line())
    t0 = time.time()
    self.compiled = step_fn.lower(self.state, self.first_batch, self.base_key).compile()
    self.compile_s = time.time() - t0
    self._count_flops()

  def _count_flops(self) -> None:
    """The FLOPs of a step (analytic, and XLA's) and the peak that MFU is measured against; logged and written."""
    c, run = self.c, self.run
    fwd = flops_lib.config_forward_flops(c, token_input=run.objective.token_input)
    fwd_xla = flops_lib.xla_forward_flops(run.objective, run.state.params, c.data.seq_len)
    analytic, analytic_no_sc = flops_lib.train_flops_per_step(
        fwd, batch=c.train.batch_size,
        selfcond_fraction=c.diffusion.selfcond_fraction if run.objective.uses_selfcond_pass else 0.0)
    step_xla = flops_lib.compiled_flops(self.compiled)
    # Throughput uses the analytic count of the step (self-conditioning pass included). XLA's count of the
    # compiled step sees the lax.scan body once, so the forward pass is cross-checked on an unrolled compile.
    self.fwd, self.analytic, self.analytic_no_sc, self.step_flops = fwd, analytic, analytic_no_sc, analytic
    self.peak = peak = c.train.peak_flops or flops_lib.measure_matmul_flops() * jax.device_count()
    logging.info("compiled train step in %.1fs; forward FLOPs/sequence: analytic %.4g, XLA (unrolled) %s (ratio %s); "
                 "FLOPs/step: analytic %.3g (%.3g without the self-cond pass); peak %.3g FLOP/s (%s)", self.compile_s,
                 fwd, f"{fwd_xla:.4g}" if fwd_xla else "n/a", f"{fwd_xla / fwd:.3f}" if fwd_xla else "n/a", analytic,
                 analytic_no_sc, peak, "train.peak_flops" if c.train.peak_flops else "measured 2048^2 fp32 matmul")
    self.writer.write(int(self.state.step), {"forward_flops_per_sequence_analytic": fwd,
                                             "forward_flops_per_sequence_xla": fwd_xla or 0.0,
                                             "flops_per_step_analytic": analytic,
                                             "flops_per_step_analytic_no_selfcond": analytic_no_sc,
                                             "flops_per_step_xla_scan_once": step_xla or 0.0,
                                             "peak_flops": peak, "compile_seconds": self.compile_s}, prefix="setup/")

  def plan_sizing(self) -> None:
    """Decides where train.size_to_minutes sizes the run (self.size_at, a step), or sizes it now."""
    c = self.c
    # train.size_to_minutes: measured on the first real steps while they are warm-up steps, else on a copy now.
    self.size_at = None
    if c.train.size_to_minutes > 0 and "sizing" not in self.meta:
      measure_to = min(c.optim.warmup_steps, SIZE_MEASURE_STEPS)
      if self.start_step + 2 <= measure_to:
        self.size_at = measure_to
      elif self.latest is None:  # after all the setup, which the budget includes
        rate = self.steps_per_second or time_train_step(self.run, self.compiled, self.state, self.first_batch,
                                                        self.base_key)
        self.apply_sizing(*size_run(self.run, rate, done=0, t_start=self.t_start, compile_s=self.compile_s,
                                    measured=self.steps_per_second is None))
      else:
        logging.warning("train.size_to_minutes=%g is not applied: this run started without it and is past its "
                        "warm-up; it keeps train.num_steps=%d", c.train.size_to_minutes, c.train.num_steps)
    if self.latest is None:
      self.writer.write_json("config.json", self.meta)
    self.writer.write_hparams(self.meta["config"], ("val/nats_per_token", "val/ratio_to_unigram", "train/loss"))

  def apply_sizing(self, decided: Run, sizing: dict) -> None:
    """Takes the sized run: its config, a step compiled for its schedule, and the record of the decision."""
    if decided.config is not self.c:
      self.run, self.c = decided, decided.config
      t0 = time.time()
      self.compiled = compile_step(self.run).lower(self.state, self.first_batch, self.base_key).compile()
      logging.info("compiled the train step again for the %d-step schedule in %.1fs", self.c.train.num_steps,
                   time.time() - t0)
    self.meta["config"]["train"]["num_steps"], self.meta["sizing"] = self.c.train.num_steps, sizing
    self.writer.write(sizing["decided_at_step"], {"num_steps": self.c.train.num_steps, "steps_per_second":
                                                  sizing["steps_per_second"], "seconds_left": sizing["seconds_left"]},
                      prefix="sizing/", console=False)
    self.writer.write_json("config.json", self.meta)

  # The step loop.

  def start(self) -> None:
    """The loop's state before its first step: evaluator, deadline, progress, pace and tallies."""
    c = self.c
    self.evaluator = _Evaluator(self.run)
    self.eval_key = jax.random.fold_in(self.base_key, 2**31 - 1)
    self.deadline = self.t_start + 60 * c.train.max_minutes if c.train.max_minutes > 0 else None
    self.progress = self.new_progress()
    self.tokens_per_step = c.train.batch_size * c.data.seq_len
    self.last_eval_time = time.time()
    self.pace = _Pace()
    self.pending = None  # (step, metrics) of the row to log at the next step, once that step is dispatched
    self.step = self.start_step
    self.last_saved = self.latest
    self.preempted = False
    self.nonfinite = _NonfiniteTally()

  def out_of_time(self) -> bool:
    """Whether train.max_minutes is spent."""
    return self.deadline is not None and time.time() >= self.deadline

  def new_progress(self) -> progress_lib.Progress:
    """A progress line for the current train.num_steps, with train.max_minutes' deadline."""
    return progress_lib.Progress(
        self.c.train.num_steps, unit="steps", label="train", start=self.start_step,
        deadline=None if self.deadline is None else time.monotonic() + self.deadline - time.time())

  def _stop_at(self) -> int:
    """The step this invocation stops at: train.num_steps, or sooner with `stop_after`."""
    c = self.c
    return c.train.num_steps if self.stop_after is None else min(c.train.num_steps, self.start_step + self.stop_after)

  def train(self) -> None:
    """Steps until train.num_steps, `stop_after`, train.max_minutes or a preemption notice; logs the last row."""
    self.stop_at = self._stop_at()
    self.t_loop = time.time()
    while self.step < self.stop_at and not self.out_of_time():
      if not self.run_step():
        self.preempted = True
        break
    self._log_pending()
    self.nonfinite.check(self.c, self.ckpt)

  def run_step(self) -> bool:
    """One step and what falls due after it: sizing, logs, a checkpoint, an evaluation, the next batch.

    False when a preemption notice stops the run at this step.
    """
    self.state, m = self.compiled(self.state, self.batch, self.base_key)
    self.step += 1
    step = self.step
    if step == self.start_step + 1:  # the rate and ETA are measured from the end of the first step on
      jax.block_until_ready(self.state)
      self.progress.update(step)
      self.t_first = time.monotonic()
      self.pace.restart(step, self.t_first)
    if step == self.size_at:
      self._size_in_loop()
    c = self.c
    self.nonfinite.track(m["nonfinite"], self.state.step)
    self._log_pending()
    if step % c.train.log_every == 0 or step == c.train.num_steps:
      self.pending = (step, m)
    # Save before drawing the next batch: the saved iterator state then points at
    # the first batch not yet trained on.
    if c.checkpoint.every_steps and step % c.checkpoint.every_steps == 0:
      self.save(step)
      self.last_saved = step
      self._log_pending()  # a checkpoint's own step is logged as it is saved: a resume never loses its row
    if distributed.preemption_point(step):  # every process stops at the same step
      return False
    self._evaluate_if_due()
    if step < self.stop_at:
      self.batch = global_batch(self.run, next(self.train_iter))
    return True

  def _size_in_loop(self) -> None:
    """Sizes the run at self.size_at from the speed of the steps since the first."""
    step = self.step
    jax.block_until_ready(self.state)
    rate = self.steps_per_second or (step - self.start_step - 1) / max(time.monotonic() - self.t_first, 1e-9)
    self.apply_sizing(*size_run(self.run, rate, done=step, t_start=self.t_start, compile_s=self.compile_s,
                                measured=self.steps_per_second is None))
    self.progress = self.new_progress()  # measured again from here: the rate leaves out the second compilation too
    self.progress.update(step)
    self.pace.restart(step)
    self.stop_at = self._stop_at()

  def _log_pending(self) -> None:
    """Logs the row held back in self.pending, if any."""
    if self.pending is not None:
      self.log(*self.pending)
      self.pending = None

  def _evaluate_if_due(self) -> None:
    """The in-loop evaluation, every train.eval_every steps or train.eval_every_minutes, unless it is the last step
    or a run with train.max_minutes would fit its schedule only without it (`evaluation_fits`)."""
    c, step = self.c, self.step
    minutes_due = c.train.eval_every_minutes and time.time() - self.last_eval_time >= 60 * c.train.eval_every_minutes
    if not ((c.train.eval_every and step % c.train.eval_every == 0) or minutes_due) or step >= c.train.num_steps:
      return
    if self.deadline is not None and not evaluation_fits(
        c.train.num_steps - step, self.pace.rate(step), self.pace.cost, self.deadline - time.time()):
      self.last_eval_time = time.time()
      logging.info("skipped the evaluation at step %d: the %d steps left fit the %.0f s left of train.max_minutes "
                   "only without it (%.0f s at the last one)", step, c.train.num_steps - step,
                   self.deadline - time.time(), self.pace.cost)
      return
    self.nonfinite.check(c, self.ckpt)
    self.validate(step, final=False)

  # Checkpoints, logs and evaluations.

  def save(self, step_done: int, *, force: bool = False) -> None:
    """Checkpoints the state, once the non-finite tally and the state itself are checked."""
    self.nonfinite.check(self.c, self.ckpt)
    state = self.state
    if not ckpt_lib.all_finite((state.params, state.ema_params, state.opt_state)):
      raise errors.TrainingError(f"the train state is not finite at step {step_done}; it was not saved. Rerun with a "
                                 "lower learning rate (--config.optim.lr) to resume from the newest checkpoint "
                                 f"({self.ckpt.latest_step()}).")
    self.ckpt.save(step_done, state, self.train_iter, self.meta, force=force)

  def log(self, step_done: int, m: dict) -> None:
    """Writes the train row of `step_done`, with throughput, learning rate and ETA, and the console line."""
    c, progress = self.c, self.progress
    self.nonfinite.check(c, self.ckpt)
    m = jax.device_get(m)
    progress.update(step_done)
    # Since the previous log; the first log since the end of the first step; at the first step, that step's own.
    rate = (progress.interval_rate() or progress.rate()
            or (step_done - self.start_step) / max(time.time() - self.t_loop, 1e-9))
    achieved = rate * self.step_flops
    m.update({"steps_per_s": rate, "tokens_per_s": rate * self.tokens_per_step, "flops_per_s": achieved,
              "mfu": achieved / self.peak, "lr": float(optim.learning_rates(c.optim, total_steps=c.train.num_steps)
                                                       ["backbone"](step_done - 1)),
              "minutes": (time.time() - self.t_start) / 60, "eta": progress_lib.format_eta(progress.eta_seconds())})
    self.writer.write(step_done, m, prefix="train/", console=False)
    if self.writer.enabled:
      logging.info("%s | %s", progress.line(), metrics_lib.console_text(
          {k: m[k] for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu") if k in m}
          | {k: v for k, v in m.items() if k not in _NOT_ON_CONSOLE and not k.startswith("grad_norm")}))

  def validate(self, step_done: int, *, final: bool) -> dict:
    """The validation bound of the EMA parameters (final: the final evaluation's K and batches), with its plots."""
    c, corpus = self.c, self.corpus
    t_eval = time.monotonic()
    k = c.eval.final_num_times if final else c.eval.num_times
    res = self.evaluator(self.state.ema_params, num_times=k,
                         max_batches=c.eval.final_max_batches if final else c.eval.max_batches,
                         key=jax.random.fold_in(self.eval_key, step_done))
    res["minutes"] = (time.time() - self.t_start) / 60
    res["unigram_nats_per_token"] = bound_lib.unigram_cross_entropy(corpus.unigram_counts,
                                                                   corpus.val[:res["num_sequences"]])
    res["ratio_to_unigram"] = res["nats_per_token"] / res["unigram_nats_per_token"]
    self.writer.write(step_done, {k2: v for k2, v in res.items() if isinstance(v, (int, float)) and v is not None},
                      prefix="val/")
    if jax.process_index() == 0:
      self._plot(step_done)
    self.last_eval_time = time.time()
    if not final:
      self.pace.evaluated(time.monotonic() - t_eval)
    return res

  def _plot(self, step_done: int) -> None:
    """The plots of an evaluation (schedule, noise-level diagnostics, bound and loss curves), also to TensorBoard."""
    c, workdir = self.c, self.workdir
    pngs = {}
    if self.run.objective.learned_embeddings:
      ema = jax.device_get(self.state.ema_params)
      pngs["plots/gamma"] = plots.save_schedule_plot(
          ema, c.diffusion.schedule, paths.join(workdir, "plots", f"gamma_step{step_done}.png"), step_done)
      if c.eval.diagnostic_sequences:
        pngs["plots/noise_levels"] = _noise_level_diagnostics(c, self.corpus, ema, self.writer, workdir, step_done)
    rows = plots.read_metrics(workdir)
    pngs["plots/bound_vs_minutes"] = plots.save_bound_curve({"run": [r for r in rows if "val/nats_per_token" in r]},
                                                            paths.join(workdir, "plots", "bound_vs_minutes.png"))
    pngs["plots/loss"] = plots.save_loss_curve(rows, paths.join(workdir, "plots", "loss.png"))
    for tag, png in pngs.items():
      self.writer.write_image(tag, png, step_done)

  # The end of the run.

  def finish(self) -> dict:
    """Saves the last step; a run that stopped early returns there, a finished one is evaluated (final.json)."""
    c, step = self.c, self.step
    if self.last_saved != step:
      self.save(step, force=True)
    self.ckpt.wait()
    if self.preempted:
      reason = distributed.preemption_reason()
      logging.info("preempted at step %d%s; checkpoint saved; rerun to resume", step, f" ({reason})" if reason else "")
      return {"step": step, "stopped": True, "preempted": True}
    if step < c.train.num_steps and not self.out_of_time():
      logging.info("stopped at step %d of %d; rerun the same command to resume", step, c.train.num_steps)
      return {"step": step, "stopped": True}
    train_minutes = (time.time() - self.t_start) / 60
    if not c.eval.final_num_times:
      return {"step": step, "train_minutes": train_minutes}
    final = self._final_evaluation(train_minutes)
    samples_file = self._samples()
    logging.info("results: %s; plots: %s; %sTensorBoard: tensorboard --logdir %s",
                 paths.join(self.workdir, "eval", "final.json"), paths.join(self.workdir, "plots"),
                 f"samples: {samples_file}; " if samples_file else "", paths.join(self.workdir, "train"))
    return final

  def _final_evaluation(self, train_minutes: float) -> dict:
    """The final evaluation on the validation split, written to <workdir>/eval/final.json with the FLOP counts."""
    step = self.step
    final = self.validate(step, final=True)
    final.update({
        "step": step, "train_minutes": train_minutes, "total_minutes": (time.time() - self.t_start) / 60,
        "split": "validation", "data": self.corpus.info, "num_params": model_lib.count(self.state.params),
        "forward_flops_per_sequence": self.fwd, "train_flops_per_step": self.analytic,
        "train_flops_per_step_no_selfcond": self.analytic_no_sc, "train_flops": self.analytic * step,
    })
    metrics_lib.MetricWriter(paths.join(self.workdir, "eval"), tensorboard=False).write_json("final.json", final)
    logging.info("validation bound at step %d: %.4f ± %.4f nats/token (perplexity ≤ %.2f) over %d sequences, K=%d; "
                 "unigram %.4f; ratio %.3f", step, final["nats_per_token"], final["stderr"],
                 final["perplexity_bound"], final["num_sequences"], final["num_times"],
                 final["unigram_nats_per_token"], final["ratio_to_unigram"])
    return final

  def _samples(self) -> str | None:
    """Draws eval.num_samples samples from the EMA parameters (process 0, with a tokenizer), writes them to
    <workdir>/samples/ and logs them; returns the file, or None when none were drawn."""
    c, corpus, step = self.c, self.corpus, self.step
    if not (c.eval.num_samples and corpus.tokenizer is not None and jax.process_index() == 0):
      return None
    toks = self.run.objective.sample(jax.device_get(self.state.ema_params), jax.random.fold_in(self.base_key, 7),
                                     num_samples=c.eval.num_samples, seq_len=c.data.seq_len,
                                     num_steps=c.eval.sample_steps)
    texts = [corpus.tokenizer.decode([int(t) for t in row]) for row in np.asarray(toks)]
    paths.makedirs(paths.join(self.workdir, "samples"))
    samples_file = paths.join(self.workdir, "samples", f"samples_step{step}.jsonl")
    paths.write_text_atomic(samples_file, "".join(
        json.dumps({"index": i, "step": step, "steps": c.eval.sample_steps, "text": text,
                    "tokens": row.tolist()}) + "\n" for i, (text, row) in enumerate(zip(texts, np.asarray(toks)))))
    for i, row in enumerate(np.asarray(toks)):
      shown = tokenizer_lib.display_text(corpus.tokenizer, row)  # control characters and stray bytes escaped
      logging.info("sample %d of %d:\n%s", i + 1, len(texts), shown)
      self.writer.write_text(f"samples/{i}", shown, step)
    return samples_file


def _loop(c, run, corpus, ckpt, writer, train_iter, meta, state, latest, workdir, t_start, stop_after,
          steps_per_second=None) -> dict:
  """Compiles the step, sizes the run if asked, trains, then saves and evaluates (see `_Session`)."""
  session = _Session(c, run, corpus, ckpt, writer, train_iter, meta, state, latest, workdir, t_start, stop_after,
                     steps_per_second)
  session.compile()
  session.plan_sizing()
  session.start()
  session.train()
  return session.finish()
