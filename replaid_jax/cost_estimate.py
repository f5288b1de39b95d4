"""Time and cost of the protocol's training runs at an assumed MFU and stated list prices.

A `Workload` is a run to price (steps, batch, forward FLOPs per sequence);
`estimate` turns one into chip-hours, wall-clock time and dollars on a chip of
`chips.CHIPS`, and `estimate_table` does it for the protocol's runs
(`protocol_workloads`) on every chip as a markdown table.
"""

import dataclasses
from typing import Sequence

from replaid_jax import benchmark
from replaid_jax import chips as chips_lib
from replaid_jax import flops as flops_lib
from replaid_jax import objectives

# The scaling protocol's FLOP budgets (C) and the SlimPajama sizes the estimate covers.
PROTOCOL_BUDGETS = (6e18, 1e19, 3e19, 6e19, 1e20)
ESTIMATE_SIZES = ("66M", "231M")


@dataclasses.dataclass(frozen=True)
class Workload:
  """A training run to price: `steps` steps of `batch` sequences of forward cost `fwd_flops`."""

  name: str
  fwd_flops: float
  batch: int
  steps: int
  selfcond_fraction: float
  budget: float | None = None
  seq_len: int = 0

  @property
  def tokens(self) -> float:
    return float(self.steps * self.batch * self.seq_len)

  @property
  def protocol_flops(self) -> float:
    """3 F_fwd B per step: the protocol's count."""
    return 3.0 * self.fwd_flops * self.batch * self.steps

  @property
  def executed_flops(self) -> float:
    """The protocol's count plus the self-conditioning pass (F_fwd B f per step)."""
    return flops_lib.train_flops_per_step(self.fwd_flops, batch=self.batch,
                                          selfcond_fraction=self.selfcond_fraction)[0] * self.steps


def config_dict_forward_flops(cd, vocab_size: int | None = None) -> float:
  """`flops.forward_flops_per_sequence` read from a ConfigDict (no data, no validation)."""
  return flops_lib.forward_flops_per_sequence(
      seq_len=cd.data.seq_len, width=cd.model.width, num_layers=cd.model.num_layers,
      vocab_size=benchmark.synthetic_vocab(cd, vocab_size), embed_dim=cd.model.embed_dim,
      mlp_ratio=cd.model.mlp_ratio, output_prior=bool(cd.diffusion.output_prior),
      token_input=objectives.REGISTRY[cd.objective].token_input)


def workload(cd, name: str, *, budget: float | None = None, vocab_size: int | None = None) -> Workload:
  """The config's run: `train.num_steps` steps, or the steps that spend `budget` at 3 F_fwd B per step."""
  fwd = config_dict_forward_flops(cd, vocab_size)
  b = int(cd.train.batch_size)
  steps = flops_lib.steps_for_budget(budget, fwd, b) if budget else int(cd.train.num_steps)
  sc = float(cd.diffusion.selfcond_fraction) if objectives.REGISTRY[cd.objective].self_conditions else 0.0
  return Workload(name, fwd, b, steps, sc, budget, int(cd.data.seq_len))


def protocol_workloads() -> list[Workload]:
  """configs/demo.py and configs/owt_base.py as configured, and configs/slimpajama.py sizes at each budget."""
  from configs import demo, owt_base, slimpajama  # pylint: disable=g-import-not-at-top
  out = [workload(demo.get_config(), "demo"), workload(owt_base.get_config(), "owt_base")]
  for size in ESTIMATE_SIZES:
    for budget in PROTOCOL_BUDGETS:
      out.append(workload(slimpajama.get_config(size), f"slimpajama:{size}", budget=budget))
  return out


def estimate(w: Workload, chip: chips_lib.Chip, *, num_chips: int, mfu: float) -> dict:
  """Time and cost of `w` on `num_chips` chips at `mfu` of the bf16 peak, on the executed FLOPs."""
  chip_seconds = w.executed_flops / (mfu * chip.bf16)
  return {"workload": w.name, "chip": chip.name, "num_chips": num_chips, "mfu": mfu,
          "chip_hours": chip_seconds / 3600, "wall_hours": chip_seconds / num_chips / 3600,
          "dollars": chip_seconds / 3600 * chip.price}


def _duration(hours: float) -> str:
  if hours < 1 / 3600:
    return "<1 s"
  if hours < 1 / 60:
    return f"{hours * 3600:.0f} s"
  if hours < 1:
    return f"{hours * 60:.0f} min"
  if hours < 48:
    return f"{hours:.1f} h"
  return f"{hours / 24:.1f} d"


def _dollars(x: float) -> str:
  if x < 0.01:
    return "<$0.01"
  return f"${x:,.2f}" if x < 10 else f"${x:,.0f}"


def estimate_table(workloads: Sequence[Workload] | None = None,
                   chips: Sequence[chips_lib.Chip] = chips_lib.CHIPS, *, num_chips: int = 8, mfu: float = 0.4) -> str:
  """Markdown: per workload its FLOPs, and per chip the wall time on `num_chips` chips and the dollars."""
  workloads = protocol_workloads() if workloads is None else workloads
  head = ["run", "budget C", "steps x batch", "tokens", "3 F B x steps", "executed (+ s.c.)"] + [c.name for c in chips]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for w in workloads:
    cells = [w.name, format(w.budget, ".0e") if w.budget else "(config)", f"{w.steps:,} x {w.batch}",
             f"{w.tokens:.3g}", f"{w.protocol_flops:.3g}", f"{w.executed_flops:.3g}"]
    for chip in chips:
      e = estimate(w, chip, num_chips=num_chips, mfu=mfu)
      cells.append(f"{_duration(e['wall_hours'])} / {_dollars(e['dollars'])}")
    lines.append("| " + " | ".join(cells) + " |")
  notes = [
      "",
      f"Each chip cell: wall-clock time on {num_chips} chips / dollars, at an assumed MFU of {mfu:.0%} of the dense "
      "bf16 peak, on the executed FLOPs (3 F_fwd B per step plus the self-conditioning pass, F_fwd B f).",
      "Assumed on-demand prices per chip-hour (check before use): " + "; ".join(
          f"{c.name} ${c.price:.2f} ({c.price_source}), peak {c.bf16 / 1e12:.0f} TFLOP/s" for c in chips) + ".",
  ]
  return "\n".join(lines + notes)
