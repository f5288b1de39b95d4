"""The `sample` config section: what launch/sample.py generates and how."""

import dataclasses

from replaid_jax import errors
from replaid_jax.diffusion import sampler

CONDITIONING_MODES = ("guidance", "clamp", "both")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """The `sample` config section (every key is described in replaid_jax/base_config.py)."""

  num_samples: int
  batch_size: int
  seq_len: int
  steps: int
  sampler: str
  time_grid: str
  score_temp: float
  selfcond: bool
  seed: int
  prefix: str
  prefix_file: str
  suffix: str
  suffix_file: str
  gap: int
  constraints: str
  avoid: str
  condition: str
  guidance_weight: float
  tokenizer_path: str
  judge: str
  judge_batch_size: int
  print_samples: int
  progress: bool


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise errors.ConfigError(message)


def validate(s: SampleConfig) -> None:
  """Checks of the section on its own (the sequence length against the model is checked when sampling)."""
  _require(s.sampler in sampler.METHODS, f"sample.sampler={s.sampler!r} is not one of {sampler.METHODS}.")
  _require(s.time_grid in sampler.TIME_GRIDS, f"sample.time_grid={s.time_grid!r} is not one of {sampler.TIME_GRIDS}.")
  _require(s.condition in CONDITIONING_MODES,
           f"sample.condition={s.condition!r} is not one of {CONDITIONING_MODES}.")
  for key in ("num_samples", "batch_size", "steps", "judge_batch_size"):
    _require(getattr(s, key) > 0, f"sample.{key} must be positive, got {getattr(s, key)}.")
  _require(s.score_temp > 0, f"sample.score_temp must be positive, got {s.score_temp} (1.0 is no temperature).")
  _require(s.seq_len >= 0, f"sample.seq_len must be 0 (the training length) or positive, got {s.seq_len}.")
  _require(s.gap >= 0, f"sample.gap must be 0 (suffix at the end) or positive, got {s.gap}.")
  _require(s.guidance_weight >= 0, f"sample.guidance_weight must be 0 or positive, got {s.guidance_weight}.")
  _require(s.seed >= 0, f"sample.seed must be 0 or positive, got {s.seed}.")
  _require(not (s.prefix and s.prefix_file), "set sample.prefix or sample.prefix_file, not both.")
  _require(not (s.suffix and s.suffix_file), "set sample.suffix or sample.suffix_file, not both.")
