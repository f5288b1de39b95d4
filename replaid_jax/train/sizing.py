"""Sizing a run to a time budget (train.size_to_minutes) and keeping its in-loop evaluations inside it.

`size_run` turns a measured speed into a step count (and a learning-rate schedule that spans it), and at the end
of a long enough warm-up into a larger one when the speed measured since allows;
`evaluation_fits` decides whether an in-loop evaluation would stop a budgeted run short of that count; `Pace`
measures the training speed with evaluations left out.
"""

import dataclasses
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from replaid_jax import errors
from replaid_jax.train import optim
from replaid_jax.train import build as build_lib



# Share of the time left after setup that a sized run keeps back for evaluations, checkpoints and data loading.
SIZE_RESERVE = 0.2
# A sized run measures its speed over its first real steps, up to this many, while they are warm-up steps (whose
# learning rate does not depend on the schedule's length); with a shorter warm-up it times a copy of the state.
SIZE_MEASURE_STEPS = 20
# Where the warm-up is long enough for a second measurement (SIZE_MEASURE_STEPS more steps), the run measures again
# at its end and takes more steps when at least this share more fit: one early measurement over a few steps can
# catch a machine in a slow minute and leave the budget unused.
SIZE_REVISE_MIN = 0.1


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


def with_num_steps(run: build_lib.Run, num_steps: int) -> build_lib.Run:
  """The run with train.num_steps set, and an optimizer whose learning-rate schedule spans that many steps.

  The optimizer state's structure does not depend on the schedule, so the built state (or a restored one) fits.
  """
  c = run.config
  if num_steps == c.train.num_steps:
    return run
  c = dataclasses.replace(c, train=dataclasses.replace(c.train, num_steps=num_steps))
  tx = optim.make(c.optim, total_steps=num_steps, axes=run.axes, frozen=run.objective.frozen_groups())
  return dataclasses.replace(run, config=c, tx=tx)


def time_train_step(run: build_lib.Run, compiled, state, batch, key, *, min_steps: int = 3, min_seconds: float = 10.0,
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


def size_run(run: build_lib.Run, rate: float, *, done: int, t_start: float, compile_s: float, measured: bool,
             measured_from: int = 2, more_than: int | None = None, cap: int | None = None
             ) -> tuple[build_lib.Run, dict] | None:
  """Sets train.num_steps (and the schedule) to what fits train.size_to_minutes at `rate` steps/s, `done` steps
  being trained already.

  The budget counts from the start of the run (tokenizer, data and compilation included); a new step count
  needs the step compiled again, which is charged to it at the first compilation's time. Returns the run and
  the record of the decision (saved with the checkpoints and in train/config.json). With `more_than` (the steps
  decided before), returns None unless at least SIZE_REVISE_MIN more than those fit; `cap` is the most steps the
  run takes (default: the config's train.num_steps, which a decision replaces).
  """
  c = run.config
  left = 60.0 * c.train.size_to_minutes - (time.time() - t_start)
  if jax.process_count() > 1:  # every process takes process 0's figures, hence the same schedule
    rate, left = (float(x) for x in multihost_utils.broadcast_one_to_all(np.array([rate, left], np.float64)))
  cap = c.train.num_steps if cap is None else cap
  steps = sized_num_steps(rate, left, cap, done)
  if steps != c.train.num_steps:  # a second compilation, for the new schedule, comes out of the budget
    left -= compile_s
    steps = sized_num_steps(rate, left, cap, done)
  if more_than is not None and steps < (1.0 + SIZE_REVISE_MIN) * more_than:
    logging.info("train.size_to_minutes=%g: %.3g steps/s over steps %d-%d, %.0f s left -> %d steps; kept the %d "
                 "decided before", c.train.size_to_minutes, rate, measured_from, done, left, steps, more_than)
    return None
  if steps <= c.optim.warmup_steps:
    raise errors.ConfigError(
        f"train.size_to_minutes={c.train.size_to_minutes:g}: at the measured {rate:.3g} steps/s only {steps} "
        f"steps fit the {max(left, 0):.0f} s left after setup, no more than the warm-up (optim.warmup_steps="
        f"{c.optim.warmup_steps}); raise train.size_to_minutes, or set it to 0 and choose train.num_steps.")
  record = {"num_steps": steps, "steps_per_second": rate, "seconds_left": left, "decided_at_step": done,
            "minutes": c.train.size_to_minutes, "cap": cap, "reserve": SIZE_RESERVE,
            "measured": measured}
  logging.info("train.size_to_minutes=%g: %.3g steps/s measured after compilation%s, %.0f s left -> %d steps "
               "(train.num_steps=%d at most; %.0f%% kept back for evaluations and checkpoints); the learning-rate "
               "schedule spans them", c.train.size_to_minutes, rate,
               f" over steps {measured_from}-{done}" if done else "", left, steps, cap, 100 * SIZE_RESERVE)
  return with_num_steps(run, steps), record


class Pace:
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
