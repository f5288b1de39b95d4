"""Ancestral (VDM eq. 33) sampling with self-conditioning and float64 coefficients.

For t -> s = t - 1/T, with x_hat = E[e | z_t] from the denoiser:

  c   = -expm1(gamma_s - gamma_t)                        (= 1 - SNR_t / SNR_s)
  z_s = (1 - c)(alpha_s / alpha_t) z_t + c alpha_s x_hat + sqrt(c sigma_s^2) xi

The coefficients are computed on the host in float64 (for T in the thousands,
1 - SNR_t/SNR_s is below float32 resolution when formed naively), then used by
one jitted `lax.scan` over the steps. The last step lands on t = 0 and the
tokens are the argmax of the logits there.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from replaid_jax.diffusion import elbo
from replaid_jax.models import model as model_lib


def _softplus64(x: np.ndarray) -> np.ndarray:
  return np.logaddexp(0.0, x)


def gamma_grid(params: dict, num_steps: int, schedule: str) -> np.ndarray:
  """gamma(t_i) for t_i = i / T, i = 0..T, in float64 on the host."""
  t = np.linspace(0.0, 1.0, num_steps + 1, dtype=np.float64)
  if schedule == "linear_fixed":
    gt = t
  else:
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params["schedule"])
    w1, w2 = _softplus64(p["w1"]), 0.01 * _softplus64(p["w2"])
    g = lambda s: np.sum(w2 * np.tanh(w1 * (s[:, None] - 0.5) + p["b1"]), axis=-1)
    g0, g1 = g(np.zeros(1))[0], g(np.ones(1))[0]
    gt = (g(t) - g0) / (g1 - g0)
    gt[0], gt[-1] = 0.0, 1.0
  b = jax.tree.map(lambda x: float(np.asarray(x, np.float64)), params["bounds"])
  return b["gamma_0"] + (b["gamma_1"] - b["gamma_0"]) * gt


def _sigmoid64(x: np.ndarray) -> np.ndarray:
  return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def ancestral_coefficients(gammas: np.ndarray) -> dict[str, np.ndarray]:
  """Per-step float64 coefficients for steps i = T..1 (t = i/T -> s = (i-1)/T), in sampling order."""
  g_t, g_s = gammas[1:][::-1], gammas[:-1][::-1]
  c = -np.expm1(g_s - g_t)
  alpha_t, alpha_s = np.sqrt(_sigmoid64(-g_t)), np.sqrt(_sigmoid64(-g_s))
  sigma2_s = _sigmoid64(g_s)
  return {
      "gamma_t": g_t,
      "z_coef": (1.0 - c) * alpha_s / alpha_t,
      "x_coef": c * alpha_s,
      "noise_std": np.sqrt(c * sigma2_s),
  }


@functools.partial(jax.jit, static_argnames=("num_samples", "seq_len", "model_cfg", "cfg", "selfcond"))
def _run(params, key, coefs, gamma_final, *, num_samples, seq_len, model_cfg, cfg, selfcond):
  e_dim = model_cfg.embed_dim
  k_init, k_steps = jax.random.split(key)
  z = jax.random.normal(k_init, (num_samples, seq_len, e_dim), jnp.float32)
  ones = jnp.ones((num_samples,), jnp.float32)
  prior = cfg.output_prior

  def step(carry, xs):
    z, x_sc, i = carry
    g = xs["gamma_t"] * ones
    _, x_hat = model_lib.predict(params, z, g, g, x_sc, cfg=model_cfg, prior_scale=1.0, use_output_prior=prior)
    noise = jax.random.normal(jax.random.fold_in(k_steps, i), z.shape, jnp.float32)
    z = xs["z_coef"] * z + xs["x_coef"] * x_hat + xs["noise_std"] * noise
    return (z, x_hat if selfcond else jnp.zeros_like(x_hat), i + 1), None

  (z, x_sc, _), _ = jax.lax.scan(step, (z, jnp.zeros_like(z), jnp.zeros((), jnp.int32)), coefs)
  g0 = gamma_final * ones
  logits, _ = model_lib.predict(params, z, g0, g0, x_sc, cfg=model_cfg, prior_scale=1.0, use_output_prior=prior)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


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
) -> jax.Array:
  """Unconditional samples [num_samples, seq_len] of token ids."""
  if model_cfg.cond_input != "gamma":
    raise ValueError("the ancestral sampler conditions on gamma; this model conditions on t.")
  gammas = gamma_grid(params, num_steps, cfg.schedule)
  coefs = {k: jnp.asarray(v, jnp.float32) for k, v in ancestral_coefficients(gammas).items()}
  return _run(params, key, coefs, jnp.float32(gammas[0]), num_samples=num_samples, seq_len=seq_len,
              model_cfg=model_cfg, cfg=cfg, selfcond=selfcond)
