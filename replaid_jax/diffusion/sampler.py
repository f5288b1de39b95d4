"""Samplers: ancestral DDPM (VDM eq. 33), DDIM and DPM-Solver++(2M), one jitted scan each.

Steps run t_i -> s = t_{i-1} over a time grid t_0 = 0 < ... < t_T = 1, from z_1 ~ N(0, I).
With x = E[e | z_t] from the denoiser (alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma)):

  ddpm:   c = -expm1(gamma_s - gamma_t)                          (= 1 - SNR_t / SNR_s)
          z_s = (1 - c)(alpha_s / alpha_t) z_t + c alpha_s x + sqrt(c sigma_s^2) xi
  ddim:   z_s = (sigma_s / sigma_t) z_t - alpha_s expm1(-h) x     (= alpha_s x + sigma_s eps_hat)
  dpm2m:  as ddim with x replaced by (1 + 1/2r) x - 1/2r x_prev, r = h_prev / h
          (DPM-Solver++(2M), data prediction; the first step is first order)

where h = lambda_s - lambda_t = (gamma_t - gamma_s) / 2 is the step in lambda = log(alpha/sigma).
All three share one update, z_s = a z_t + b (w x + w' x_prev) + n xi, whose per-step
coefficients are computed on the host in float64 with expm1 (for T in the thousands
1 - SNR_t/SNR_s is below float32 resolution when formed naively) and then cast.

Per step, in order: the denoiser on (z_t, gamma_t, x_sc) gives x; self-conditioning
carries the raw x to the next step; the score temperature divides eps_hat
(x <- z/alpha_t (1 - 1/tau) + x/tau); guidance adds grad J sigma_t^2/alpha_t
(see `guidance`); the update; clamping re-noises known positions to level s. The last
step lands on t = 0 and the tokens are the argmax of the logits there.

Randomness is per sample: sample i's noise comes from fold_in(key, i), so a sample
does not depend on the batch it was drawn in, and the same seed gives the same tokens.
"""

import dataclasses
import functools
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from replaid_jax.diffusion import elbo
from replaid_jax.diffusion import guidance
from replaid_jax.models import embedding
from replaid_jax.models import model as model_lib
from replaid_jax.models import noise_schedule

METHODS = ("ddpm", "ddim", "dpm2m")
TIME_GRIDS = ("uniform", "quadratic", "logsnr")

# Number of traces of the sampling loop per (method, shapes, flags): a trace
# is a compile, so tests read this to check that a (shape, sampler) pair compiles once.
_TRACES: dict[tuple, int] = {}


class Denoiser(Protocol):
  """(params, z [B, L, d], gamma [B], x_sc [B, L, d]; t [B]) -> (logits [B, L, V], x_hat [B, L, d]).

  gamma is the noise level; `t`, the grid time at which the schedule gives it,
  matters only to a model that conditions on t (the `model.cond_input` ablation).

  Must be hashable (it is a static argument of the jitted loop): a module-level
  function or a frozen dataclass, so that equal denoisers share one compile.
  """

  def __call__(self, params: Any, z: jax.Array, gamma: jax.Array, x_sc: jax.Array, *,
               t: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    ...


@dataclasses.dataclass(frozen=True)
class ModelDenoiser:
  """The RePlaid model as a sampler denoiser (output prior at full scale, as at eval)."""

  model_cfg: model_lib.ModelConfig
  output_prior: bool = True

  def __call__(self, params, z, gamma, x_sc, *, t=None):
    return model_lib.predict(params, z, gamma, x_sc, cfg=self.model_cfg, prior_scale=1.0, t_B=t,
                             use_output_prior=self.output_prior)


def trace_counts() -> dict[tuple, int]:
  """{(method, batch, seq_len, steps, (spans, span length), selfcond, guided, clamped, progress): traces so far}."""
  return dict(_TRACES)


# ---- float64 grids and coefficients (host numpy).

def _softplus64(x: np.ndarray) -> np.ndarray:
  return np.logaddexp(0.0, x)


def _sigmoid64(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  e = np.exp(-np.abs(x))
  return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _gamma_tilde64(params: dict, t: np.ndarray, schedule: str) -> np.ndarray:
  """gamma~(t) in float64, with the endpoints pinned to 0 and 1."""
  t = np.asarray(t, np.float64)
  if schedule == "linear_fixed":
    return t.copy()
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params["schedule"])
  w1, w2 = _softplus64(p["w1"]), 0.01 * _softplus64(p["w2"])
  g = lambda s: np.sum(w2 * np.tanh(w1 * (np.reshape(s, (-1, 1)) - 0.5) + p["b1"]), axis=-1)
  g0, g1 = g(0.0)[0], g(1.0)[0]
  gt = (g(t) - g0) / (g1 - g0)
  return np.where(t <= 0.0, 0.0, np.where(t >= 1.0, 1.0, gt)).reshape(t.shape)


def _bounds64(params: dict) -> tuple[float, float]:
  b = jax.tree.map(lambda x: float(np.asarray(x, np.float64)), params["bounds"])
  return b["gamma_0"], b["gamma_1"]


def gamma_grid(params: dict, num_steps: int, schedule: str) -> np.ndarray:
  """gamma(t_i) for t_i = i / T, i = 0..T, in float64 on the host."""
  return schedule_grid(params, num_steps, schedule, "uniform")[1]


def schedule_grid(params: dict, num_steps: int, schedule: str, grid: str = "uniform") -> tuple[np.ndarray, np.ndarray]:
  """(t_i, gamma(t_i)) for i = 0..T in float64, t_0 = 0 and t_T = 1.

  grid: "uniform" (t_i = i/T), "quadratic" (t_i = (i/T)^2: finer steps near the data)
  or "logsnr" (gamma uniform between gamma_0 and gamma_1; t by inverting gamma~).
  """
  if grid not in TIME_GRIDS:
    raise ValueError(f"time grid {grid!r} is not one of {TIME_GRIDS}")
  if num_steps < 1:
    raise ValueError(f"the number of steps must be at least 1, got {num_steps}")
  g0, g1 = _bounds64(params)
  u = np.linspace(0.0, 1.0, num_steps + 1, dtype=np.float64)
  if grid == "logsnr":
    t = _invert_gamma_tilde(params, u, schedule)
    gt = u
  else:
    t = u if grid == "uniform" else u**2
    gt = _gamma_tilde64(params, t, schedule)
  return t, g0 + (g1 - g0) * gt


def _invert_gamma_tilde(params: dict, target: np.ndarray, schedule: str, iters: int = 60) -> np.ndarray:
  """t with gamma~(t) = target, by bisection (gamma~ is increasing); targets 0 and 1 give t = 0 and 1 exactly."""
  target = np.asarray(target, np.float64)
  if schedule == "linear_fixed":
    return target.copy()
  lo, hi = np.zeros_like(target), np.ones_like(target)
  for _ in range(iters):
    mid = 0.5 * (lo + hi)
    below = _gamma_tilde64(params, mid, schedule) < target
    lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
  return np.where(target <= 0.0, 0.0, np.where(target >= 1.0, 1.0, 0.5 * (lo + hi)))


def time_of_gamma(params: dict, gammas: np.ndarray, schedule: str) -> np.ndarray:
  """The times t in [0, 1] at which the schedule gives the noise levels `gammas` (float64, by bisection).

  What a t-conditioned model (`model.cond_input='t'`) needs beside gamma when
  it is evaluated at fixed noise levels.
  """
  g0, g1 = _bounds64(params)
  return _invert_gamma_tilde(params, (np.asarray(gammas, np.float64) - g0) / (g1 - g0), schedule)


def coefficients(t: np.ndarray, gammas: np.ndarray, method: str) -> dict[str, np.ndarray]:
  """Per-step float64 coefficients for steps i = T..1 (t_i -> s = t_{i-1}), in sampling order.

  The update is z_s = z_coef z_t + x_coef (cur_coef x + prev_coef x_prev) + noise_std xi.
  """
  if method not in METHODS:
    raise ValueError(f"sampler {method!r} is not one of {METHODS}")
  gammas = np.asarray(gammas, np.float64)
  g_t, g_s = gammas[1:][::-1], gammas[:-1][::-1]
  if not np.all(g_t > g_s):
    raise ValueError("gamma must increase strictly along the time grid")
  alpha_t, alpha_s = np.sqrt(_sigmoid64(-g_t)), np.sqrt(_sigmoid64(-g_s))
  sigma_t, sigma_s = np.sqrt(_sigmoid64(g_t)), np.sqrt(_sigmoid64(g_s))
  n = len(g_t)
  cur, prev = np.ones(n), np.zeros(n)
  if method == "ddpm":
    c = -np.expm1(g_s - g_t)
    z_coef, x_coef, noise = (1.0 - c) * alpha_s / alpha_t, c * alpha_s, np.sqrt(c) * sigma_s
  else:
    h = 0.5 * (g_t - g_s)  # lambda_s - lambda_t > 0
    z_coef, x_coef, noise = sigma_s / sigma_t, -alpha_s * np.expm1(-h), np.zeros(n)
    if method == "dpm2m" and n > 1:
      r = h[:-1] / h[1:]  # h_prev / h for steps 2..T
      cur[1:], prev[1:] = 1.0 + 0.5 / r, -0.5 / r
  return {
      "t_t": np.asarray(t, np.float64)[1:][::-1].copy(),
      "gamma_t": g_t.copy(),
      "inv_alpha_t": 1.0 / alpha_t,
      "alpha_s": alpha_s,
      "sigma_s": sigma_s,
      "guide_scale": sigma_t**2 / alpha_t,
      "z_coef": z_coef,
      "x_coef": x_coef,
      "cur_coef": cur,
      "prev_coef": prev,
      "noise_std": noise,
  }


# ---- the jitted loop.

def _sample_keys(key: jax.Array, sample_ids_B: jax.Array, stream: int) -> jax.Array:
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, i), stream))(sample_ids_B)


def _normal(keys_B: jax.Array, step: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape, jnp.float32))(keys_B)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=(
    "seq_len", "method", "selfcond", "guided", "clamped", "progress", "progress_every", "batch_sharding"))
def _loop(denoiser, params, table_VE, key, sample_ids_B, coefs, final, cond, score_temp, *, seq_len, method,
          selfcond, guided, clamped, progress=None, progress_every=0, batch_sharding=None):
  num_samples, num_steps, e_dim = sample_ids_B.shape[0], coefs["z_coef"].shape[0], table_VE.shape[1]
  sig = (method, num_samples, seq_len, num_steps, cond.span_tokens.shape[1:], selfcond, guided, clamped,
         progress is not None)
  _TRACES[sig] = _TRACES.get(sig, 0) + 1
  shape = (seq_len, e_dim)
  constrain = (lambda x: jax.lax.with_sharding_constraint(x, batch_sharding)) if batch_sharding else (lambda x: x)
  k_init, k_noise, k_clamp = (_sample_keys(key, sample_ids_B, s) for s in range(3))
  z = constrain(_normal(k_init, jnp.int32(0), shape))
  ones = jnp.ones((num_samples,), jnp.float32)
  inv_temp = 1.0 / score_temp
  if clamped:  # z_1 of the known positions: alpha_1 e + sigma_1 xi.
    a1, s1 = (jnp.sqrt(x) for x in noise_schedule.alpha_sigma2(coefs["gamma_t"][0]))
    z = guidance.clamp_latents(z, cond, table_VE, a1, s1, _normal(k_clamp, jnp.int32(num_steps), shape))

  def step(carry, xs):
    z, x_sc, x_prev = carry
    g, t = xs["gamma_t"] * ones, xs["t_t"] * ones
    if guided:
      def objective(z_):
        logits, x = denoiser(params, z_, g, x_sc, t=t)
        return jnp.sum(guidance.objective(logits, cond)), x
      (_, x), grad = jax.value_and_grad(objective, has_aux=True)(z)
    else:
      _, x = denoiser(params, z, g, x_sc, t=t)
    x_sc = x if selfcond else x_sc
    x = inv_temp * x + (1.0 - inv_temp) * xs["inv_alpha_t"] * z
    if guided:
      x = x + xs["guide_scale"] * grad
    d = xs["cur_coef"] * x + xs["prev_coef"] * x_prev if method == "dpm2m" else x
    z = xs["z_coef"] * z + xs["x_coef"] * d
    if method == "ddpm":
      z = z + xs["noise_std"] * _normal(k_noise, xs["index"], shape)
    if clamped:
      z = guidance.clamp_latents(z, cond, table_VE, xs["alpha_s"], xs["sigma_s"],
                                 _normal(k_clamp, xs["index"], shape))
    z = constrain(z)
    if progress is not None:
      done = xs["index"] + 1
      report = (done % max(progress_every, 1) == 0) | (done == num_steps)
      jax.lax.cond(report, lambda: jax.debug.callback(progress, done, num_steps), lambda: None)
    return (z, x_sc, x), None

  xs = dict(coefs, index=jnp.arange(num_steps, dtype=jnp.int32))
  zeros = jnp.zeros_like(z)
  (z, x_sc, _), _ = jax.lax.scan(step, (z, zeros, zeros), xs)
  logits, _ = denoiser(params, z, final["gamma"] * ones, x_sc, t=final["t"] * ones)
  tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if clamped:
    tokens = jnp.where(cond.clamp, cond.tokens, tokens)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return {
      "tokens": tokens,
      "position_logp": guidance.position_log_probs(logp, cond),
      "span_logp": guidance.span_log_probs(logp, cond),
  }


def generate(
    denoiser: Denoiser,
    params: Any,
    key: jax.Array,
    *,
    sample_ids: jax.Array,
    seq_len: int,
    t: np.ndarray,
    gammas: np.ndarray,
    table: jax.Array,
    method: str = "ddpm",
    score_temp: float = 1.0,
    selfcond: bool = True,
    cond: guidance.Conditioning | None = None,
    batch_sharding: Any = None,
    progress: Callable[[int, int], None] | None = None,
    progress_every: int = 0,
) -> dict[str, jax.Array]:
  """Samples one batch; returns {"tokens" [B, L], "position_logp" [B, L], "span_logp" [B, K]}.

  `sample_ids` [B] names the samples (their noise streams); `t`, `gammas` are the float64
  grid (index 0 = data end); `table` [V, d] is the embedding matrix (used by clamping).
  The log-probabilities are those of `cond`'s tokens and spans under the final logits.
  `progress(done, total)` is called from the device every `progress_every` steps.
  """
  if not score_temp > 0:
    raise ValueError(f"the score temperature must be positive, got {score_temp}")
  coefs64 = coefficients(t, gammas, method)
  coefs = {k: jnp.asarray(v, jnp.float32) for k, v in coefs64.items()}
  final = {"gamma": jnp.float32(gammas[0]), "t": jnp.float32(t[0])}
  batch = int(sample_ids.shape[0])
  cond = guidance.empty(batch, seq_len) if cond is None else cond
  guided, clamped = guidance.is_guided(cond), guidance.is_clamped(cond)
  return _loop(denoiser, params, table, key, jnp.asarray(sample_ids, jnp.int32), coefs, final, cond,
               jnp.float32(score_temp), seq_len=seq_len, method=method, selfcond=selfcond, guided=guided,
               clamped=clamped, progress=progress,
               progress_every=(progress_every or max(len(coefs64["z_coef"]) // 20, 1)) if progress else 0,
               batch_sharding=batch_sharding)


def sample(
    params: dict,
    key: jax.Array,
    *,
    num_samples: int,
    seq_len: int,
    num_steps: int,
    model_cfg: model_lib.ModelConfig,
    cfg: elbo.DiffusionConfig,
    selfcond: bool = True,
    method: str = "ddpm",
    time_grid: str = "uniform",
    score_temp: float = 1.0,
    cond: guidance.Conditioning | None = None,
) -> jax.Array:
  """Samples [num_samples, seq_len] of token ids from the RePlaid model (unconditional by default)."""
  t, gammas = schedule_grid(params, num_steps, cfg.schedule, time_grid)
  table = embedding.normalized(params["embedding"])
  out = generate(ModelDenoiser(model_cfg, cfg.output_prior), params, key,
                 sample_ids=jnp.arange(num_samples, dtype=jnp.int32), seq_len=seq_len, t=t, gammas=gammas,
                 table=table, method=method, score_temp=score_temp, selfcond=selfcond, cond=cond)
  return out["tokens"]
