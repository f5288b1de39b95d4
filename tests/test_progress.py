"""The one progress reporter: its ETA leaves out the first (compiling) unit; fed synthetic times, never the clock."""

import math
import os
import re

import pytest

from replaid_jax import progress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("seconds, text", [(0, "0:00:00"), (59.6, "0:01:00"), (3661, "1:01:01"),
                                           (100 * 3600, "100:00:00"), (None, "?"), (math.nan, "?"),
                                           (math.inf, "?"), (-3, "0:00:00")])
def test_format_eta(seconds, text):
  assert progress.format_eta(seconds) == text


def test_eta_leaves_out_the_compilation_of_the_first_step():
  p = progress.Progress(1000, label="train", clock=lambda: pytest.fail("the clock must not be read"))
  assert p.line(now=0.0) == "train: 0/1,000 steps (0%), compiling…"
  p.update(1, now=240.0)  # the first step ends after a 240 s compilation
  assert p.rate() is None and p.eta_seconds(now=240.0) is None
  assert p.line(now=240.0) == "train: 1/1,000 steps (0%)"  # no rate, no ETA yet
  p.update(101, now=290.0)  # then 2 steps/s
  assert p.rate() == pytest.approx(2.0) and p.interval_rate() == pytest.approx(2.0)
  assert p.eta_seconds(now=290.0) == pytest.approx(899 / 2)  # counting the first step's 240 s: 2,542 s
  assert p.line(now=290.0) == "train: 101/1,000 steps (10%), 2 steps/s, ETA 0:07:30"
  p.update(201, now=390.0)  # slower: 1 step/s over the last interval, 1.33 since the first step
  assert p.interval_rate() == pytest.approx(1.0) and p.rate() == pytest.approx(200 / 150)
  assert p.eta_seconds(now=400.0) == pytest.approx(799 * 150 / 200 - 10)  # counted from the latest update


def test_a_resumed_run_counts_from_its_first_step_and_a_deadline_caps_the_eta():
  p = progress.Progress(1500, label="train", start=500, deadline=1000.0, clock=lambda: 0.0)
  assert p.line() == "train: 500/1,500 steps (33%), compiling…"
  p.update(501, now=100.0)
  p.update(601, now=200.0)  # 1 step/s: 899 s left by steps, but the budget ends at t=1000
  assert p.eta_seconds(now=200.0) == pytest.approx(800.0)
  assert p.line(now=200.0).endswith("1 steps/s, ETA 0:13:20")


def test_scaled_units_and_rates_without_exponents():
  p = progress.Progress(100e6, unit="MB", label="prepare", scale=1e6, start=0)
  p.update(0, now=0.0)  # no compilation to leave out: the rate counts from the start
  p.update(12.3e6, now=4.0)
  assert p.line(now=4.0) == "prepare: 12.3/100.0 MB (12%), 3.08 MB/s, ETA 0:00:29"
  fast = progress.Progress(4096, unit="steps", label="sampling")
  fast.update(64, now=1.0)
  fast.update(2112, now=2.0)
  assert fast.line(now=2.0) == "sampling: 2,112/4,096 steps (52%), 2,048 steps/s, ETA 0:00:01"


def test_one_eta_formatter_in_the_package():
  found = []
  for root, _, files in os.walk(os.path.join(REPO, "replaid_jax")):
    for name in files:
      if name.endswith(".py"):
        with open(os.path.join(root, name), encoding="utf-8") as f:
          found += [(name, m) for m in re.findall(r"^\s*def (\w*eta\w*)\(", f.read(), re.M)
                    if "format" in m or m.startswith("_fmt")]
  assert found == [("progress.py", "format_eta")]
