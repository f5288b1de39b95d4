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

This module does steps 1 and 3 (`train_and_evaluate`, `resume`); the run's parts are built in
`train/build.py` (2), a time budget is turned into steps in `train/sizing.py`, and the loop itself (4, 5)
is `train/session.py`.
"""

import json
import time
from typing import Any

from absl import logging
import jax
import ml_collections

import replaid_jax
from replaid_jax import checkpoint as ckpt_lib
from replaid_jax import config_lib
from replaid_jax import errors
from replaid_jax import metrics as metrics_lib
from replaid_jax import paths
from replaid_jax import workdir_lock
from replaid_jax.data import arrayrecord
from replaid_jax.data import pipeline
from replaid_jax.train import step as step_lib
from replaid_jax.models import model as model_lib
from replaid_jax.train import build as build_lib
from replaid_jax.train import session as session_lib
from replaid_jax.train import sizing as sizing_lib




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


def resume(ckpt: ckpt_lib.Checkpointer, run: build_lib.Run, train_iter: Any, config_dict: dict, *,
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


def _restore_step(ckpt: ckpt_lib.Checkpointer, s: int, run: build_lib.Run, train_iter: Any, abstract: Any,
                  config_dict: dict, allow_config_changes: bool
                  ) -> tuple[step_lib.TrainState | None, list[tuple[str, Any, Any]], str]:
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
  build_lib.check_resume_compatible(saved, run)
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
  c = build_lib.resolve_vocab(c, corpus)
  run = build_lib.build(c, corpus)
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
  meta = build_lib.metadata(run, config.to_dict())
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
      run = sizing_lib.with_num_steps(run, sizing["num_steps"])
      c = run.config
      meta["config"]["train"]["num_steps"], meta["sizing"] = c.train.num_steps, sizing
      logging.info("train.size_to_minutes: keeping the %d steps decided when the run started (%.3g steps/s "
                   "measured)", c.train.num_steps, sizing["steps_per_second"])
  else:
    state = run.state
  try:
    return session_lib.run_loop(c, run, corpus, ckpt, writer, train_iter, meta, state, latest, workdir, t_start,
                                stop_after, steps_per_second)
  finally:
    ckpt.close()
    writer.close()
