"""What a training objective provides to the shared train step, evaluator and samplers.

One backbone, data pipeline, optimizer, checkpoint format and eval output serve
every objective; an objective only says how its parameters are built, how a
batch turns into a loss and gradients, how a sequence gets its likelihood bound
and how text is sampled. Methods are pure functions of arrays (called under jit).

Per-sequence terms use `elbo.Terms` (nats/token): RePlaid fills recon,
diffusion and prior; the AR model puts its exact NLL in `recon`; masked
and uniform-state diffusion put their ELBO estimates in `diffusion`. Every eval JSON therefore has
the same keys, and `recon + diffusion + prior` is always the reported bound.
"""

import dataclasses
import functools
from typing import Any, Callable, ClassVar, TYPE_CHECKING

import flax.struct
import jax
import jax.numpy as jnp

from replaid_jax import errors
from replaid_jax.diffusion import elbo
from replaid_jax.diffusion import guidance
from replaid_jax.models import model as model_lib

if TYPE_CHECKING:
  from replaid_jax import config_lib  # pylint: disable=g-bad-import-order


@flax.struct.dataclass
class RowSetup:
  """Per-step randomness and weights shared by the micro-batches of one step.

  `t` is a per-row time (or zeros); `n_rows` the global batch the micro-batch
  losses are normalised by, so that their sum is the step's loss.
  """

  t: jax.Array  # [B]
  n_rows: jax.Array  # [] float32

  def micro(self, i, size: int) -> "RowSetup":
    return RowSetup(jax.lax.dynamic_slice_in_dim(self.t, i * size, size), self.n_rows)


@functools.partial(jax.jit, static_argnames=("objective", "num_samples", "seq_len", "num_steps", "temperature"))
def jit_sample(objective, params, key, *, num_samples, seq_len, num_steps, known_BL, known_mask_BL, temperature):
  """`objective.sample_traced` compiled once per (objective, shapes, steps, temperature)."""
  return objective.sample_traced(params, key, num_samples=num_samples, seq_len=seq_len, num_steps=num_steps,
                                 known_BL=known_BL, known_mask_BL=known_mask_BL, temperature=temperature)


def zero_terms(like_B: jax.Array, **values) -> elbo.Terms:
  z = jnp.zeros_like(like_B, jnp.float32)
  fields = {"recon": z, "diffusion": z, "prior": z, "is_recon": jnp.zeros(like_B.shape, bool)}
  fields.update(values)
  return elbo.Terms(**fields)


@dataclasses.dataclass(frozen=True)
class SampleRequest:
  """One batch of a sampling run, as the sampling CLI hands it to every objective (`Objective.batch_sampler`).

  The prompt comes twice: as the guidance conditioning RePlaid's sampler reads
  (targets, weights, clamps, word spans), and as the known tokens the
  baselines' ancestral samplers hold fixed (prefix and suffix).
  """

  index: int  # the batch's number within the run
  sample_ids: jax.Array  # [B] int32: the run-wide numbers of the batch's samples (RePlaid's noise streams)
  seq_len: int
  cond: guidance.Conditioning  # [B, ...]: every row alike
  known_BL: jax.Array  # [B, L] int32: the prompt's tokens, 0 elsewhere
  known_mask_BL: jax.Array  # [B, L] bool: where the prompt's tokens are
  batch_sharding: Any = None  # how [B, L, d] arrays are laid out over the mesh
  progress: Any = None  # callback(done, total), fed from the device by samplers that report their steps


@dataclasses.dataclass(frozen=True)
class Sections:
  """The config sections an objective reads, for use without a full `config_lib.Config` (tests, notebooks)."""

  model: Any
  diffusion: Any
  objective: str = "replaid"


@dataclasses.dataclass(frozen=True)
class Objective:
  """Base class; `c` is the converted `config_lib.Config`.

  The class attributes say what the objective is, for code that has only its
  name (`REGISTRY[name]`): whether its network reads token ids, whether it
  learns embeddings and a noise schedule (the schedule plot, the noise-level
  diagnostics, likelihood curves and embedding geometry apply), whether its
  training can run a self-conditioning pass, and whether it factorises left
  to right.
  """

  c: "config_lib.Config"
  name: ClassVar[str] = "base"
  token_input: ClassVar[bool] = False  # the network reads token ids (a V'-row table), not noisy embeddings
  learned_embeddings: ClassVar[bool] = False  # Gaussian diffusion on learned embeddings with a learned schedule
  self_conditions: ClassVar[bool] = False  # training may add a no-gradient self-conditioning pass
  autoregressive: ClassVar[bool] = False  # exact left-to-right likelihood; conditions on prefixes only

  @property
  def uses_selfcond_pass(self) -> bool:
    """Whether this config's training runs an extra no-gradient forward on some rows."""
    return self.self_conditions and self.c.diffusion.selfcond_fraction > 0

  def init(self, key: jax.Array, output_bias: jax.Array | None) -> tuple[dict, dict]:
    """(parameters, their logical axes): the network's module built with values (also under jit, where they are
    tracers); its structure is kept for `abstract`."""
    raise NotImplementedError

  def abstract(self) -> model_lib.Abstract:
    """The network without values (graph, shapes, logical axes): the structure `init` kept, else its init traced
    by `nnx.eval_shape`, once per process and configuration."""
    raise NotImplementedError

  def frozen_groups(self) -> tuple[str, ...]:
    return ()

  def setup(self, state, batch: int, key: jax.Array) -> Any:
    return RowSetup(jnp.zeros((batch,), jnp.float32), jnp.asarray(batch, jnp.float32))

  def loss_and_grads(self, params: dict, tokens_BL: jax.Array, setup: Any, key: jax.Array
                     ) -> tuple[jax.Array, elbo.Terms, dict]:
    raise NotImplementedError

  def update_stats(self, stats, terms: elbo.Terms):
    return stats

  def metrics(self, terms: elbo.Terms, setup: Any, params: dict) -> dict:
    return {}

  def sequence_bound(self, params: dict, tokens_BL: jax.Array, key: jax.Array, *, num_times: int) -> elbo.Terms:
    raise NotImplementedError

  def forward_passes(self, num_times: int) -> int:
    """Network forward passes per sequence of `sequence_bound` with `num_times` draws."""
    raise NotImplementedError

  def sample(self, params: dict, key: jax.Array, *, num_samples: int, seq_len: int, num_steps: int,
             known_BL: jax.Array | None = None, known_mask_BL: jax.Array | None = None) -> jax.Array:
    """Tokens [B, L] from the objective's own sampler, known positions held fixed (unconditional by default)."""
    raise NotImplementedError

  # ---- The sampling CLI's interface (`sample/run.py`): one path for every objective.

  reports_sampler_steps: ClassVar[bool] = False  # its batch sampler feeds `SampleRequest.progress` per step

  def check_prompt(self, s, *, has_suffix: bool) -> None:
    """Raises a ConfigError naming the fix when the `sample` settings ask for conditioning this sampler lacks."""
    if s.constraints or s.avoid:
      raise errors.ConfigError(f"sample.constraints and sample.avoid use RePlaid's gradient guidance; this "
                               f"checkpoint's objective is {self.name!r}. Clear them.")

  def sampler_record(self, s, seq_len: int) -> dict:
    """The settings that decided the samples, for their JSON: only those this objective's sampler reads."""
    return {"seq_len": seq_len, "sampler": f"{self.name} ancestral", "steps": s.steps, "time_grid": "uniform",
            "score_temp": 1.0, "condition": "clamp",
            **{k: getattr(s, k) for k in ("prefix", "prefix_file", "suffix", "suffix_file", "gap")}}

  def batch_sampler(self, params: dict, s) -> Callable[[jax.Array, SampleRequest], dict[str, jax.Array]]:
    """(key, request) -> {"tokens": [B, L], ...} for one batch of a run with the `sample` settings `s`; what
    does not change between batches is prepared here, once.

    The default draws from the objective's own sampler (`sample`) with key fold_in(key, request.index) and
    the prompt's tokens held fixed: masked diffusion conditions on them exactly, uniform-state diffusion
    holds them while the rest is denoised (a heuristic), the AR model teacher-forces its prefix.
    """
    def sample_batch(key: jax.Array, request: SampleRequest) -> dict[str, jax.Array]:
      return {"tokens": self.sample(params, jax.random.fold_in(key, request.index),
                                    num_samples=request.known_BL.shape[0], seq_len=request.seq_len,
                                    num_steps=s.steps, known_BL=request.known_BL,
                                    known_mask_BL=request.known_mask_BL)}
    return sample_batch

  def forward(self, params: dict, tokens_BL: jax.Array, *, unroll: bool = False) -> jax.Array:
    """One forward pass of the network on a batch (at an arbitrary noise level), for FLOP counting."""
    raise NotImplementedError

  def bound_protocol(self, num_times: int) -> dict:
    """How `sequence_bound` estimates the bound, for the eval JSON."""
    return {}
