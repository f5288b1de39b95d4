"""One invocation of the train loop (`Session`), from the compiled step to the final evaluation.

Kept as one class in one file (longer than the others): its phases share the run's state, and reading them
top to bottom (compile, plan the sizing, start, train step by step, finish) is reading the loop.
"""

import functools
import json
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from replaid_jax import checkpoint as ckpt_lib
from replaid_jax import chips
from replaid_jax import config_lib
from replaid_jax import distributed
from replaid_jax import errors
from replaid_jax import flops as flops_lib
from replaid_jax import metrics as metrics_lib
from replaid_jax import paths
from replaid_jax import progress as progress_lib
from replaid_jax import sharding as sharding_lib
from replaid_jax.data import tokenizer as tokenizer_lib
from replaid_jax.eval import bound as bound_lib
from replaid_jax.eval import diagnostics
from replaid_jax.train import optim
from replaid_jax.train import plots
from replaid_jax.models import model as model_lib
from replaid_jax.train import build as build_lib
from replaid_jax.train import sizing as sizing_lib




class _Evaluator:
  """Validation bound on the EMA parameters, jitted once per K."""

  def __init__(self, run: build_lib.Run):
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


def _noise_level_diagnostics(c, corpus, ema, writer, workdir: str, step: int) -> str:
  """Logs where along the noise level the model beats the context-free denoiser, and the embedding separation."""
  diag = diagnostics.denoiser_gain_by_level(
      ema, corpus.val[:c.eval.diagnostic_sequences], bound_lib.log_unigram(corpus.unigram_counts),
      jax.random.key(c.seed + 17), model_cfg=c.model, schedule=c.diffusion.schedule, bins=12, per_bin=2,
      use_output_prior=c.diffusion.output_prior)
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


class Session:
  """One invocation of the train loop, from the compiled step to the final evaluation.

  It holds what the steps share: the run and its config (both replaced when train.size_to_minutes sizes the run),
  the compiled step, the train state, the progress and pace, the non-finite tally, the time of the last evaluation
  and the step of the last checkpoint. `run_loop` calls its phases in order: `compile`, `plan_sizing`, `start`,
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
    step_fn = build_lib.compile_step(run)
    self.base_key = jax.random.key(c.seed)
    self.first_batch = self.batch = build_lib.global_batch(run, next(self.train_iter))
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
        fwd, batch=c.train.rows_per_step,
        selfcond_fraction=c.diffusion.selfcond_fraction if run.objective.uses_selfcond_pass else 0.0)
    step_xla = flops_lib.compiled_flops(self.compiled)
    # Throughput uses the analytic count of the step (self-conditioning pass included). XLA's count of the
    # compiled step sees the lax.scan body once, so the forward pass is cross-checked on an unrolled compile.
    self.fwd, self.analytic, self.analytic_no_sc, self.step_flops = fwd, analytic, analytic_no_sc, analytic
    units = chips.measured_units(jax.devices()[0].platform, jax.device_count(), jax.process_count())
    self.peak = peak = c.train.peak_flops or flops_lib.measure_matmul_flops() * units
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
    self.size_at = self.resize_at = None
    if c.train.size_to_minutes > 0 and "sizing" not in self.meta:
      measure_to = min(c.optim.warmup_steps, sizing_lib.SIZE_MEASURE_STEPS)
      if self.start_step + 2 <= measure_to:
        self.size_at = measure_to
        if self.steps_per_second is None and c.optim.warmup_steps >= measure_to + sizing_lib.SIZE_MEASURE_STEPS:
          self.resize_at = c.optim.warmup_steps  # measured again over the rest of the warm-up
      elif self.latest is None:  # after all the setup, which the budget includes
        rate = self.steps_per_second or sizing_lib.time_train_step(self.run, self.compiled, self.state,
                                                                   self.first_batch, self.base_key)
        self.apply_sizing(*sizing_lib.size_run(self.run, rate, done=0, t_start=self.t_start, compile_s=self.compile_s,
                                    measured=self.steps_per_second is None))
      else:
        logging.warning("train.size_to_minutes=%g is not applied: this run started without it and is past its "
                        "warm-up; it keeps train.num_steps=%d", c.train.size_to_minutes, c.train.num_steps)
    if self.latest is None:
      self.writer.write_json("config.json", self.meta)
    self.writer.write_hparams(self.meta["config"], ("val/nats_per_token", "val/ratio_to_unigram", "train/loss"))

  def apply_sizing(self, decided: build_lib.Run, sizing: dict) -> None:
    """Takes the sized run: its config, a step compiled for its schedule, and the record of the decision."""
    if decided.config is not self.c:
      self.run, self.c = decided, decided.config
      t0 = time.time()
      self.compiled = build_lib.compile_step(self.run).lower(self.state, self.first_batch, self.base_key).compile()
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
    self.pace = sizing_lib.Pace()
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
    elif step == self.resize_at:
      self._resize_in_loop()
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
      self.batch = build_lib.global_batch(self.run, next(self.train_iter))
    return True

  def _size_in_loop(self) -> None:
    """Sizes the run at self.size_at from the speed of the steps since the first."""
    step = self.step
    jax.block_until_ready(self.state)
    rate = self.steps_per_second or (step - self.start_step - 1) / max(time.monotonic() - self.t_first, 1e-9)
    self.apply_sizing(*sizing_lib.size_run(self.run, rate, done=step, t_start=self.t_start, compile_s=self.compile_s,
                                measured=self.steps_per_second is None))
    self._restart_clocks(step)

  def _resize_in_loop(self) -> None:
    """At the end of the warm-up, sizes the run again from the speed since the first sizing (evaluations left
    out) when that fits SIZE_REVISE_MIN more steps: the first measurement may have caught a slow minute. The
    warm-up's learning rates do not depend on the schedule's length, so the steps trained so far are those of a
    run given the new length from its start."""
    step = self.step
    jax.block_until_ready(self.state)
    rate = self.pace.rate(step)
    if rate is None:
      return
    first = self.meta["sizing"]
    revised = sizing_lib.size_run(self.run, rate, done=step, t_start=self.t_start, compile_s=self.compile_s,
                                  measured=True, measured_from=self.size_at, more_than=first["num_steps"],
                                  cap=first["cap"])
    if revised is not None:
      run, record = revised
      record["first"] = {k: first[k] for k in ("num_steps", "steps_per_second", "decided_at_step")}
      self.apply_sizing(run, record)
      self._restart_clocks(step)

  def _restart_clocks(self, step: int) -> None:
    """The progress line, the pace and the stop step measured again from `step` (after a compilation)."""
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
    if self.deadline is not None and not sizing_lib.evaluation_fits(
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


def run_loop(c, run, corpus, ckpt, writer, train_iter, meta, state, latest, workdir, t_start, stop_after,
          steps_per_second=None) -> dict:
  """Compiles the step, sizes the run if asked, trains, then saves and evaluates (see `Session`)."""
  session = Session(c, run, corpus, ckpt, writer, train_iter, meta, state, latest, workdir, t_start, stop_after,
                     steps_per_second)
  session.compile()
  session.plan_sizing()
  session.start()
  session.train()
  return session.finish()
