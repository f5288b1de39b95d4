"""From an ml_collections config to the frozen dataclasses the library reads.

Each config section maps to a dataclass defined next to the code that uses it.
Conversion fails, with the key and the fix, on unknown or missing keys, on
values outside their allowed set and on inconsistent combinations.
"""

import dataclasses
from typing import Any

import ml_collections

from replaid_jax import errors
from replaid_jax.data import pipeline
from replaid_jax.diffusion import elbo
from replaid_jax.diffusion import time_sampling
from replaid_jax.models import denoiser as denoiser_lib
from replaid_jax.models import model as model_lib
from replaid_jax.models import model_config
from replaid_jax.models import noise_schedule
from replaid_jax import objectives
from replaid_jax.diffusion import sampler
from replaid_jax.objectives import mdlm

OBJECTIVES = tuple(objectives.REGISTRY)


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


def validate_sample(s: SampleConfig) -> None:
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


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float
  embedding_lr: float
  schedule_lr: float
  bounds_lr: float
  weight_decay: float
  embedding_weight_decay: float
  schedule_weight_decay: float
  bounds_weight_decay: float
  b1: float
  b2: float
  eps: float
  warmup_steps: int
  decay: str
  final_lr_fraction: float
  grad_clip: float
  ema_decay: float


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  batch_size: int
  grad_accum_steps: int
  draws_per_sequence: int
  num_steps: int
  max_minutes: float
  size_to_minutes: float
  log_every: int
  eval_every: int
  eval_every_minutes: float
  peak_flops: float
  skip_nonfinite_steps: int

  @property
  def rows_per_step(self) -> int:
    """Rows a step computes: the batch tiled train.draws_per_sequence times (FLOP counts use this)."""
    return self.batch_size * self.draws_per_sequence


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  batch_size: int
  num_times: int
  max_batches: int
  final_num_times: int
  final_max_batches: int
  num_samples: int
  sample_steps: int
  split: str
  data_dir: str
  curve_points: int
  curve_max_sequences: int
  geometry_top_tokens: int
  diagnostic_sequences: int


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int
  keep: int
  async_save: bool


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  axes: tuple[str, ...]
  shape: tuple[int, ...]
  rules: tuple[tuple[str, Any], ...]
  cpu_devices: int


@dataclasses.dataclass(frozen=True)
class Config:
  objective: str
  seed: int
  model: model_lib.ModelConfig
  diffusion: elbo.DiffusionConfig
  data: pipeline.DataConfig
  optim: OptimConfig
  train: TrainConfig
  eval: EvalConfig
  checkpoint: CheckpointConfig
  mesh: MeshConfig
  sample: SampleConfig


def _freeze(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def _section(cls: type, name: str, values: dict[str, Any]) -> Any:
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - fields)
  missing = sorted(fields - set(values))
  if unknown:
    raise errors.ConfigError(
        f"unknown config key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
        f"valid keys of '{name}' are: {', '.join(sorted(fields))}."
    )
  if missing:
    raise errors.ConfigError(
        f"config section '{name}' lacks {', '.join(missing)}; build configs on replaid_jax/base_config.py, "
        "which defines every key."
    )
  for f in dataclasses.fields(cls):
    if values[f.name] is None and "None" not in str(f.type):
      raise errors.ConfigError(
          f"{name}.{f.name} is required by this config and has no value; pass --config.{name}.{f.name}=..."
      )
  return cls(**{k: _freeze(v) for k, v in values.items()})


def _choice(key: str, value: Any, allowed: tuple) -> None:
  if value not in allowed:
    raise errors.ConfigError(f"{key}={value!r} is not one of {allowed}.")


def _positive(key: str, value: float) -> None:
  if not value > 0:
    raise errors.ConfigError(f"{key} must be positive, got {value}.")


# Every count and interval, with its smallest valid value (0 means "off" or "whole split" where allowed).
MINIMUMS = {
    "train.num_steps": 1, "train.log_every": 1, "train.eval_every": 0, "train.max_minutes": 0,
    "train.size_to_minutes": 0, "train.eval_every_minutes": 0, "train.peak_flops": 0, "train.skip_nonfinite_steps": 0,
    "checkpoint.every_steps": 0, "checkpoint.keep": 1,
    "optim.warmup_steps": 0, "optim.grad_clip": 0, "optim.ema_decay": 0, "optim.weight_decay": 0,
    "optim.embedding_lr": 0, "optim.schedule_lr": 0, "optim.bounds_lr": 0,
    "data.seq_len": 1, "data.num_workers": 0, "data.tokenizer_vocab_size": 1,
    "eval.max_batches": 0, "eval.final_num_times": 0, "eval.final_max_batches": 0, "eval.num_samples": 0,
    "eval.sample_steps": 1, "eval.curve_points": 2, "eval.curve_max_sequences": 1, "eval.geometry_top_tokens": 1,
    "eval.diagnostic_sequences": 0,
    "model.mlp_ratio": 1, "model.cond_dim": 1, "model.cond_freqs": 1, "model.max_seq_len": 1,
    "model.schedule_hidden": 1, "diffusion.output_prior_warmup_steps": 0,
}


def _at_least(key: str, value: Any, minimum: float) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
    raise errors.ConfigError(f"{key}={value!r} is not allowed: it must be a number >= {minimum}; "
                             f"pass --config.{key}=<a value >= {minimum}> (the meaning of each key is in replaid_jax/base_config.py).")


def validate(c: Config) -> None:
  """Checks that no single dataclass field can check on its own."""
  for key, minimum in MINIMUMS.items():
    section, field = key.split(".")
    _at_least(key, getattr(getattr(c, section), field), minimum)
  if not c.optim.ema_decay < 1:
    raise errors.ConfigError(f"optim.ema_decay={c.optim.ema_decay} must lie in [0, 1) (0 disables the EMA).")
  _choice("objective", c.objective, OBJECTIVES)
  m, d, t = c.model, c.diffusion, c.train
  _choice("model.cond_input", m.cond_input, model_config.COND_INPUTS)
  _choice("model.output_bias_init", m.output_bias_init, model_config.OUTPUT_BIAS_INITS)
  _choice("model.compute_dtype", m.compute_dtype, model_config.COMPUTE_DTYPES)
  _choice("model.block", m.block, model_config.BLOCKS)
  _choice("model.attention_bias", m.attention_bias, model_config.ATTENTION_BIASES)
  _choice("model.remat_policy", m.remat_policy, tuple(denoiser_lib.REMAT_POLICIES))
  _choice("diffusion.mdlm_train_loss", d.mdlm_train_loss, mdlm.TRAIN_LOSSES)
  if d.aux_ce_weight < 0:
    raise errors.ConfigError(f"diffusion.aux_ce_weight must be >= 0, got {d.aux_ce_weight}.")
  _choice("diffusion.schedule", d.schedule, noise_schedule.SCHEDULES)
  _choice("diffusion.recon_split", d.recon_split, elbo.RECON_SPLITS)
  _choice("diffusion.schedule_variance", d.schedule_variance, elbo.SCHEDULE_VARIANCES)
  _choice("optim.decay", c.optim.decay, ("cosine", "linear", "constant"))
  validate_sample(c.sample)
  for key in ("model.width", "model.num_layers", "model.num_heads", "model.embed_dim", "train.batch_size",
              "train.grad_accum_steps", "train.draws_per_sequence", "eval.batch_size", "eval.num_times", "optim.lr"):
    section, field = key.split(".")
    _positive(key, getattr(getattr(c, section), field))
  if m.width % m.num_heads or (m.width // m.num_heads) % 2:
    raise errors.ConfigError(
        f"model.width={m.width} must split into model.num_heads={m.num_heads} heads of even size (RoPE)."
    )
  if c.data.seq_len > m.max_seq_len:
    raise errors.ConfigError(
        f"data.seq_len={c.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
        "lower data.seq_len or raise model.max_seq_len."
    )
  if not d.gamma_0 < d.gamma_1:
    raise errors.ConfigError(f"diffusion.gamma_0={d.gamma_0} must be below diffusion.gamma_1={d.gamma_1}.")
  try:
    period = time_sampling.selfcond_period(d.selfcond_fraction)
  except ValueError as e:
    raise errors.ConfigError(f"diffusion.selfcond_fraction: {e}") from None
  if t.batch_size % t.grad_accum_steps:
    raise errors.ConfigError(
        f"train.batch_size={t.batch_size} is not divisible by train.grad_accum_steps={t.grad_accum_steps}."
    )
  micro = t.batch_size // t.grad_accum_steps
  if objectives.REGISTRY[c.objective].self_conditions and period and micro % period:
    raise errors.ConfigError(
        f"the micro-batch ({micro} = train.batch_size / train.grad_accum_steps) must be a multiple of "
        f"1/diffusion.selfcond_fraction = {period}."
    )
  if d.antithetic_noise:
    if not objectives.REGISTRY[c.objective].learned_embeddings:
      raise errors.ConfigError(f"diffusion.antithetic_noise is RePlaid's (Gaussian noise); objective={c.objective!r} "
                               "has none. Set diffusion.antithetic_noise=False.")
    if t.draws_per_sequence % 2 or t.grad_accum_steps != 1:
      raise errors.ConfigError(
          "diffusion.antithetic_noise pairs the draws of each sequence (eps, -eps): it needs an even "
          f"train.draws_per_sequence (got {t.draws_per_sequence}) and train.grad_accum_steps=1 "
          f"(got {t.grad_accum_steps}).")
  if d.schedule_variance == "within_time":
    if not objectives.REGISTRY[c.objective].learned_embeddings or d.schedule != "learned":
      raise errors.ConfigError(
          "diffusion.schedule_variance='within_time' trains RePlaid's learned schedule; got "
          f"objective={c.objective!r}, diffusion.schedule={d.schedule!r}. Set it to 'second_moment'.")
    if d.antithetic_noise:
      raise errors.ConfigError(
          "diffusion.schedule_variance='within_time' estimates E[l | t] from other rows at nearby times, which "
          "antithetic pairs (one time, eps and -eps) would correlate with the row itself. Turn one of them off.")
  if not 0 < d.recon_fraction < 1:
    raise errors.ConfigError(f"diffusion.recon_fraction must lie in (0, 1), got {d.recon_fraction}.")
  if t.batch_size < 2:
    raise errors.ConfigError("train.batch_size must be at least 2 (reconstruction and diffusion rows).")
  if len(c.mesh.axes) != len(c.mesh.shape):
    raise errors.ConfigError(f"mesh.axes {c.mesh.axes} and mesh.shape {c.mesh.shape} differ in length.")
  if c.mesh.cpu_devices < 0:
    raise errors.ConfigError(f"mesh.cpu_devices={c.mesh.cpu_devices} must be 0 (one CPU device per core, chosen "
                             "to divide the batch) or a device count.")


def from_config_dict(cd: ml_collections.ConfigDict) -> Config:
  """Converts and validates a ConfigDict built on replaid_jax/base_config.py."""
  values = cd.to_dict()
  sections = {
      "model": model_lib.ModelConfig,
      "diffusion": elbo.DiffusionConfig,
      "data": pipeline.DataConfig,
      "optim": OptimConfig,
      "train": TrainConfig,
      "eval": EvalConfig,
      "checkpoint": CheckpointConfig,
      "mesh": MeshConfig,
      "sample": SampleConfig,
  }
  top = {f.name for f in dataclasses.fields(Config)}
  unknown = sorted(set(values) - top)
  if unknown:
    raise errors.ConfigError(f"unknown top-level config key(s) {unknown}; valid keys are {sorted(top)}.")
  missing = sorted(top - set(values))
  if missing:
    raise errors.ConfigError(f"config lacks {missing}; build configs on replaid_jax/base_config.py.")
  built = {k: (_section(sections[k], k, v) if k in sections else v) for k, v in values.items()}
  config = Config(**built)
  validate(config)
  return config


# ---- resuming with another config.

# Keys whose change breaks a resumed run or the comparability of its results: refused on resume unless the
# run is started with --allow_config_changes. Every other key (learning rates, schedule length, logging,
# evaluation, checkpointing, mesh, sampling) may change; each change is listed in the log.
FROZEN_ON_RESUME = ("objective", "seed", "model.", "diffusion.", "data.", "train.batch_size",
                    "train.grad_accum_steps", "train.draws_per_sequence")
_NOT_FROZEN = ("data.num_workers", "data.cache_dir")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
  else:
    out[prefix[:-1]] = tree
  return out


def _plain(value: Any) -> Any:
  """JSON-like form of a config value (tuples as lists), as saved in checkpoint metadata."""
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def config_changes(saved: dict, new: dict) -> list[tuple[str, Any, Any]]:
  """(key, saved value, new value) for every key that differs; absent keys read as '<absent>'."""
  a, b = _flatten(saved), _flatten(new)
  absent = "<absent>"
  return [(k, a.get(k, absent), b.get(k, absent)) for k in sorted(set(a) | set(b))
          if _plain(a.get(k, absent)) != _plain(b.get(k, absent))]


def frozen_on_resume(key: str) -> bool:
  if key in _NOT_FROZEN:
    return False
  return any(key == f or (f.endswith(".") and key.startswith(f)) for f in FROZEN_ON_RESUME)


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
  return ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)
