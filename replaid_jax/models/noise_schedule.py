"""The monotone noise schedule gamma(t) = gamma_0 + (gamma_1 - gamma_0) * gamma~(t).

gamma~ is a monotone MLP normalised so that gamma~(0) = 0 and gamma~(1) = 1:

  g(t)      = sum_k w2_k tanh(w1_k (t - 1/2) + b1_k),  w1 = softplus(W1), w2 = 0.01 softplus(W2)
  gamma~(t) = (g(t) - g(0)) / (g(1) - g(0))

Both weight vectors are positive, so g (and gamma~) is strictly increasing.
alpha_t^2 = sigmoid(-gamma), sigma_t^2 = sigmoid(gamma), SNR = exp(-gamma).
"""

from flax import nnx
import jax
import jax.numpy as jnp

from replaid_jax.models import layers

SCHEDULES = ("learned", "linear_fixed")


class NoiseSchedule(nnx.Module):
  """The monotone MLP of gamma~ (W1, b1, W2 of `hidden` units, all N(0, 1))."""

  def __init__(self, hidden: int, *, key: jax.Array):
    k1, k2, k3 = jax.random.split(key, 3)
    self.w1 = layers.normal(k1, (hidden,), 1.0, (None,))
    self.b1 = layers.normal(k2, (hidden,), 1.0, (None,))
    self.w2 = layers.normal(k3, (hidden,), 1.0, (None,))

  def __call__(self, t: jax.Array, schedule: str = "learned") -> jax.Array:
    return gamma_tilde(nnx.to_pure_dict(nnx.state(self)), t, schedule)


class Bounds(nnx.Module):
  """The endpoints gamma_0 < gamma_1 of the noise schedule."""

  def __init__(self, gamma_0: float, gamma_1: float):
    if not gamma_0 < gamma_1:
      raise ValueError(f"gamma_0 ({gamma_0}) must be below gamma_1 ({gamma_1}).")
    self.gamma_0 = layers.fixed(jnp.asarray(gamma_0, jnp.float32), ())
    self.gamma_1 = layers.fixed(jnp.asarray(gamma_1, jnp.float32), ())

  def __call__(self, gt: jax.Array) -> jax.Array:
    return gamma({"gamma_0": self.gamma_0[...], "gamma_1": self.gamma_1[...]}, gt)


def _unnormalised(p: dict[str, jax.Array], t: jax.Array) -> jax.Array:
  w1 = jax.nn.softplus(p["w1"])
  w2 = 0.01 * jax.nn.softplus(p["w2"])
  h = jnp.tanh(w1 * (t[..., None] - 0.5) + p["b1"])
  return jnp.sum(w2 * h, axis=-1)


def gamma_tilde(p: dict[str, jax.Array], t: jax.Array, schedule: str = "learned") -> jax.Array:
  """gamma~(t) in [0, 1], with gamma~(0) = 0 and gamma~(1) = 1 exactly."""
  t = jnp.asarray(t, jnp.float32)
  if schedule == "linear_fixed":
    return t
  if schedule != "learned":
    raise ValueError(f"schedule {schedule!r} is not one of {SCHEDULES}")
  ends = _unnormalised(p, jnp.array([0.0, 1.0], jnp.float32))
  g = _unnormalised(p, t)
  out = (g - ends[0]) / (ends[1] - ends[0])
  # Pin the endpoints exactly (the formula gives them up to rounding) without
  # touching the derivative: the correction is a constant for autodiff.
  fix = jnp.where(t == 0.0, -out, jnp.where(t == 1.0, 1.0 - out, 0.0))
  return out + jax.lax.stop_gradient(fix)


def gamma_tilde_and_deriv(
    p: dict[str, jax.Array], t: jax.Array, schedule: str = "learned"
) -> tuple[jax.Array, jax.Array]:
  """(gamma~(t), d gamma~/dt) by forward-mode differentiation in t."""
  t = jnp.asarray(t, jnp.float32)
  return jax.jvp(lambda s: gamma_tilde(p, s, schedule), (t,), (jnp.ones_like(t),))


def gamma(bounds: dict[str, jax.Array], gt: jax.Array) -> jax.Array:
  return bounds["gamma_0"] + (bounds["gamma_1"] - bounds["gamma_0"]) * gt


def gamma_prime(bounds: dict[str, jax.Array], dgt: jax.Array) -> jax.Array:
  return (bounds["gamma_1"] - bounds["gamma_0"]) * dgt


def alpha_sigma2(g: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(alpha^2, sigma^2) = (sigmoid(-gamma), sigmoid(gamma))."""
  return jax.nn.sigmoid(-g), jax.nn.sigmoid(g)
