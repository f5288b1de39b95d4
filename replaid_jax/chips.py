"""Accelerator peaks and prices: the chip table, and the peak FLOP/s that MFU is taken against.

`CHIPS` lists the chips with their bf16 (and, on NVIDIA GPUs, TF32) peaks and
an on-demand price per chip-hour; `chip_for_kind` finds the entry of a
`jax.Device.device_kind`, and `resolve_peak` turns a `--peak` setting into
FLOP/s over the devices of a run.
"""

import dataclasses
from typing import Callable

from replaid_jax import flops as flops_lib


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator: dense peaks per chip and an assumed on-demand price.

  `fp32` is the rate of float32 matmuls at JAX's default precision where it
  differs from bf16: TF32 tensor cores on NVIDIA GPUs. On TPUs float32 matmuls
  at default precision run as bf16 passes, so bf16 is the peak either way.
  Prices are list prices per chip-hour to be checked before use.
  """

  name: str
  bf16: float
  fp32: float | None
  match: tuple[str, ...]  # lower-case substrings of jax's `device_kind`
  price: float  # USD per chip-hour, on demand (assumption)
  price_source: str


# Order matters: the first entry with a matching substring wins ("tpu v5 lite" before "tpu v5").
CHIPS: tuple[Chip, ...] = (
    Chip("tpu-v4", 275e12, None, ("tpu v4",), 3.22, "Cloud TPU v4 on demand, us-central2"),
    Chip("tpu-v5e", 197e12, None, ("v5 lite", "v5lite", "v5e"), 1.20, "Cloud TPU v5e on demand, us-central1"),
    Chip("tpu-v5p", 459e12, None, ("v5p", "tpu v5"), 4.20, "Cloud TPU v5p on demand, us-east5"),
    Chip("tpu-v6e", 918e12, None, ("v6 lite", "v6e", "tpu v6", "trillium"), 2.70, "Cloud TPU v6e on demand, us-east1"),
    Chip("a100", 312e12, 156e12, ("a100",), 4.10, "AWS p4d.24xlarge on demand / 8 (A100 40GB)"),
    Chip("h100", 989e12, 495e12, ("h100",), 6.90, "AWS p5.48xlarge on demand / 8, after the 2025 price cut"),
    Chip("h200", 989e12, 495e12, ("h200",), 8.00, "AWS p5e/p5en.48xlarge on demand / 8, approximate"),
)


def chip_for_kind(device_kind: str) -> Chip | None:
  """The table entry for a `jax.Device.device_kind` string, or None."""
  kind = device_kind.lower()
  for chip in CHIPS:
    if any(s in kind for s in chip.match):
      return chip
  return None


def chip_by_name(name: str) -> Chip:
  """The table entry called `name` (any case).

  Raises:
    ValueError: no chip has that name.
  """
  for chip in CHIPS:
    if chip.name == name.lower():
      return chip
  raise ValueError(f"unknown chip {name!r}; choose one of {', '.join(c.name for c in CHIPS)}.")


def check_peak_spec(spec: str) -> None:
  """Raises ValueError unless `spec` is "auto", a chip name or a positive number."""
  if spec == "auto":
    return
  try:
    value = float(spec)
  except ValueError:
    chip_by_name(spec)
    return
  if not value > 0:
    raise ValueError(f"a numeric peak must be positive FLOP/s per device, got {spec!r}.")


def _table_peak(chip: Chip, compute_dtype: str) -> tuple[float, str]:
  if compute_dtype == "float32" and chip.fp32:
    return chip.fp32, f"table: {chip.name} dense float32 matmul (TF32)"
  return chip.bf16, f"table: {chip.name} dense bf16"


def measured_units(platform: str, num_devices: int, num_processes: int) -> int:
  """How many times one device's measured matmul rate the whole run has: its devices, or on CPU its processes.

  A process's CPU devices share its cores (distributed.split_cpu), and one
  device's matmul already runs on all of them.
  """
  return num_processes if platform == "cpu" else num_devices


def resolve_peak(spec: str, *, device_kind: str, platform: str, num_devices: int, compute_dtype: str = "bfloat16",
                 measure: Callable[[], float] = flops_lib.measure_matmul_flops, num_processes: int = 1) -> dict:
  """The peak FLOP/s that MFU is taken against, summed over `num_devices` (a CPU's measured rate: `num_processes`).

  Args:
    spec: "auto" (the table entry for `device_kind`; on CPU, or for a kind not
      in the table, the measured 2048^2 float32 matmul rate), a chip name from
      `CHIPS`, or a number: FLOP/s per device.
    device_kind: `jax.devices()[0].device_kind`.
    platform: `jax.devices()[0].platform` ("cpu", "gpu", "tpu").
    num_devices: devices the step runs on.
    num_processes: processes the step runs in (what a measured CPU rate is
      summed over, see `measured_units`).
    compute_dtype: `model.compute_dtype`; float32 picks a chip's `fp32` peak.
    measure: returns one device's measured matmul FLOP/s.

  Returns:
    {"flops_per_s", "per_device", "chip", "source"}.
  """
  chip = None
  if spec == "auto":
    chip = chip_for_kind(device_kind) if platform != "cpu" else None
    if chip is None:
      per = measure()
      why = " (its cores are the process's)" if platform == "cpu" else f" ({device_kind!r} is not in the peaks table)"
      return {"flops_per_s": per * measured_units(platform, num_devices, num_processes), "per_device": per,
              "chip": None, "source": f"measured: 2048^2 float32 matmul on one device{why}"}
  else:
    check_peak_spec(spec)
    try:
      per = float(spec)
    except ValueError:
      chip = chip_by_name(spec)
    else:
      return {"flops_per_s": per * num_devices, "per_device": per, "chip": None, "source": "given (--peak)"}
  per, source = _table_peak(chip, compute_dtype)
  return {"flops_per_s": per * num_devices, "per_device": per, "chip": chip.name, "source": source}
