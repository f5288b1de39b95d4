"""One progress reporter for training, evaluation, sampling and data preparation.

Every binary reports its progress in the same words, e.g.

  train: 120/1,500 steps (8%), 2.31 steps/s, ETA 0:09:57
  bound validation: 3/27 batches (11%), 1.20 batches/s, ETA 0:00:20
  sampling: 64/512 steps (12%), 40.1 steps/s, ETA 0:00:11
  prepare: 12.3/100.0 MB (12%), 3.08 MB/s, ETA 0:00:29

The rate, and the ETA taken from it, are measured from the first `update` on, which the caller makes once the
first unit of work (a step, a batch) has completed: that unit carries the compilation, which would otherwise
inflate the ETA of a short job many times over. Until then a line has no rate and no ETA, and reads
"compiling…" when nothing is done yet.
"""

import math
import time
from typing import Callable


def format_eta(seconds: float | None) -> str:
  """H:MM:SS, or "?" when unknown (None, NaN or infinite)."""
  if seconds is None or not math.isfinite(seconds):
    return "?"
  seconds = max(int(round(seconds)), 0)
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _rate_text(rate: float) -> str:
  """Three significant digits, without exponents: 0.0123, 1.23, 12.3, 1,234."""
  if rate >= 100:
    return f"{rate:,.0f}"
  return f"{rate:.3g}" if rate >= 0.001 else f"{rate:.2e}"


class Progress:
  """done/total, rate and ETA of one bounded job.

  `update(done)` records a point (the first one is the rate's origin); `line(done)` is the text to show. With a
  `deadline` (a time of `clock`, e.g. a wall-clock budget) the ETA is never later than it. `scale` divides the
  counts for display (1e6 for bytes shown as MB). `clock` is injectable so that tests feed synthetic times.
  """

  def __init__(self, total: float, *, unit: str = "steps", label: str = "", start: float = 0,
               scale: float = 1.0, deadline: float | None = None, clock: Callable[[], float] = time.monotonic):
    self.total, self.unit, self.label, self.start, self.scale = total, unit, label, start, scale
    self.deadline, self.clock = deadline, clock
    self.done = start
    self._origin: tuple[float, float] | None = None  # (time, done) of the first update
    self._last: tuple[float, float] | None = None  # (time, done) of the latest update
    self._interval_rate: float | None = None

  def update(self, done: float, now: float | None = None) -> None:
    """Records that `done` units are complete at `now` (default: the clock's time)."""
    now = self.clock() if now is None else now
    if self._origin is None:
      self._origin = (now, done)
    elif self._last is not None and now > self._last[0] and done > self._last[1]:
      self._interval_rate = (done - self._last[1]) / (now - self._last[0])
    self._last = (now, done)
    self.done = done

  def rate(self) -> float | None:
    """Units per second from the first update to the latest; None before two updates."""
    if self._origin is None or self._last is None or self._last[0] <= self._origin[0] or (
        self._last[1] <= self._origin[1]):
      return None
    return (self._last[1] - self._origin[1]) / (self._last[0] - self._origin[0])

  def interval_rate(self) -> float | None:
    """Units per second between the two latest updates; None before two updates."""
    return self._interval_rate

  def eta_seconds(self, now: float | None = None) -> float | None:
    """Seconds left: the units left at the measured rate, from the latest update, capped by the deadline."""
    rate = self.rate()
    if rate is None or rate <= 0:
      return None
    now = self.clock() if now is None else now
    eta = (self.total - self.done) / rate - (now - self._last[0])
    if self.deadline is not None:
      eta = min(eta, self.deadline - now)
    return max(eta, 0.0)

  def _count(self, x: float) -> str:
    return f"{x / self.scale:,.1f}" if self.scale != 1 else f"{int(x):,}"

  def line(self, done: float | None = None, now: float | None = None) -> str:
    """'LABEL: DONE/TOTAL UNIT (P%), RATE UNIT/s, ETA H:MM:SS'; `done` updates the count shown (not the rate)."""
    done = self.done if done is None else done
    pct = 100.0 * done / self.total if self.total else 100.0
    head = f"{self.label}: " if self.label else ""
    text = f"{head}{self._count(done)}/{self._count(self.total)} {self.unit} ({pct:.0f}%)"
    rate = self.rate()
    if rate is not None:
      text += f", {_rate_text(rate / self.scale)} {self.unit}/s, ETA {format_eta(self.eta_seconds(now))}"
    elif done == self.start and done < self.total:
      text += ", compiling…"
    return text
