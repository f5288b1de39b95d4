"""Embeddings, noise schedule and denoiser: the properties the method relies on."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from replaid_jax.models import embedding
from replaid_jax.models import model as model_lib
from replaid_jax.models import noise_schedule

from conftest import TINY_MODEL, perturbed_params, replace


def test_embeddings_have_unit_norm_rows_even_after_arbitrary_updates():
  p = embedding.Embedding(50, 16, key=jax.random.key(0))
  table = {"table": p.table[...] * jax.random.uniform(jax.random.key(1), (50, 1), minval=0.1, maxval=9.0)}
  norms = jnp.linalg.norm(embedding.normalized(table), axis=-1)
  np.testing.assert_allclose(norms, 1.0, atol=1e-6)
  e = embedding.lookup(embedding.normalized(table), jnp.array([[3, 7, 3]]))
  np.testing.assert_allclose(e[0, 0], e[0, 2])
  np.testing.assert_allclose(jnp.linalg.norm(e, axis=-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_schedule_is_monotone_with_exact_endpoints(seed):
  p = nnx.to_pure_dict(nnx.state(noise_schedule.NoiseSchedule(256, key=jax.random.key(seed))))
  # Make the network strongly curved: monotonicity must hold whatever the weights.
  p = jax.tree.map(lambda x: 3.0 * x, p)
  t = jnp.linspace(0.0, 1.0, 4001)
  gt = noise_schedule.gamma_tilde(p, t)
  assert float(gt[0]) == 0.0 and float(gt[-1]) == 1.0
  assert bool(jnp.all(jnp.diff(gt) > 0))
  _, dgt = noise_schedule.gamma_tilde_and_deriv(p, t)
  assert bool(jnp.all(dgt > 0))


def test_schedule_derivative_matches_finite_differences_including_endpoints():
  p = nnx.to_pure_dict(nnx.state(noise_schedule.NoiseSchedule(128, key=jax.random.key(3))))
  t = jnp.array([0.0, 0.1, 0.5, 0.77, 1.0])
  _, dgt = noise_schedule.gamma_tilde_and_deriv(p, t)
  f = lambda s: np.asarray(noise_schedule.gamma_tilde(p, jnp.asarray(s, jnp.float32)), np.float64)
  h = 1e-3
  tt = np.asarray(t)
  fd = (f(np.clip(tt + h, 0, 1)) - f(np.clip(tt - h, 0, 1))) / (np.clip(tt + h, 0, 1) - np.clip(tt - h, 0, 1))
  # One-sided differences at the endpoints are only first-order accurate.
  np.testing.assert_allclose(dgt, fd, rtol=2e-2)


def test_gamma_maps_to_variance_preserving_alpha_sigma():
  g = noise_schedule.Bounds(-3.0, 6.0)(jnp.array([0.0, 1.0]))
  np.testing.assert_allclose(g, [-3.0, 6.0])
  a2, s2 = noise_schedule.alpha_sigma2(jnp.linspace(-20, 20, 9))
  np.testing.assert_allclose(a2 + s2, 1.0, atol=1e-6)
  np.testing.assert_allclose(a2 / s2, jnp.exp(-jnp.linspace(-20, 20, 9)), rtol=1e-4)


def test_linear_fixed_schedule_is_the_identity():
  t = jnp.linspace(0, 1, 11)
  gt, dgt = noise_schedule.gamma_tilde_and_deriv({}, t, "linear_fixed")
  np.testing.assert_allclose(gt, t)
  np.testing.assert_allclose(dgt, 1.0)


def _inputs(key, batch=3, length=8, cfg=TINY_MODEL):
  k1, k2, k3 = jax.random.split(key, 3)
  z = jax.random.normal(k1, (batch, length, cfg.embed_dim))
  g = jax.random.uniform(k2, (batch,), minval=-3.0, maxval=6.0)
  x_sc = jax.random.normal(k3, (batch, length, cfg.embed_dim)) * 0.1
  return z, g, x_sc


def test_fresh_model_outputs_are_exactly_bias_plus_output_prior():
  """adaLN-Zero gates and the zero-initialised output layer: at init the network adds only its bias."""
  params, _ = model_lib.init(jax.random.key(0), TINY_MODEL, gamma_0=-3.0, gamma_1=6.0)
  z, g, x_sc = _inputs(jax.random.key(1))
  logits, x_hat = model_lib.predict(params, z, g, x_sc, cfg=TINY_MODEL, prior_scale=1.0)
  table = embedding.normalized(params["embedding"])
  a2, s2 = noise_schedule.alpha_sigma2(g)
  # Independent form: log N(z; alpha e_v, sigma^2 I) up to a per-position constant.
  loglik = -jnp.sum((z[:, :, None, :] - jnp.sqrt(a2)[:, None, None, None] * table) ** 2, -1) / (2 * s2[:, None, None])
  np.testing.assert_allclose(jax.nn.log_softmax(logits), jax.nn.log_softmax(loglik), atol=2e-4)
  np.testing.assert_allclose(x_hat, jax.nn.softmax(loglik) @ table, atol=2e-5)


def test_expected_embedding_is_softmax_times_embeddings():
  params = perturbed_params(jax.random.key(2))
  z, g, x_sc = _inputs(jax.random.key(3))
  logits, x_hat = model_lib.predict(params, z, g, x_sc, cfg=TINY_MODEL, prior_scale=0.7)
  np.testing.assert_allclose(x_hat, jax.nn.softmax(logits) @ embedding.normalized(params["embedding"]), atol=1e-5)


def test_self_conditioning_projection_starts_at_zero_and_then_matters():
  params, _ = model_lib.init(jax.random.key(0), TINY_MODEL, gamma_0=-3.0, gamma_1=6.0)
  z, g, x_sc = _inputs(jax.random.key(4))
  f = lambda p, sc: model_lib.predict(p, z, g, sc, cfg=TINY_MODEL, prior_scale=1.0)[0]
  np.testing.assert_array_equal(f(params, x_sc), f(params, jnp.zeros_like(x_sc)))
  pert = perturbed_params(jax.random.key(5))
  assert float(jnp.max(jnp.abs(f(pert, x_sc) - f(pert, jnp.zeros_like(x_sc))))) > 1e-3


def test_the_noise_level_is_the_one_input_unless_the_model_conditions_on_t():
  """gamma drives the adaLN by default; the cond_input='t' ablation reads t (and refuses to run without it)."""
  z, g, x_sc = _inputs(jax.random.key(10))
  params = perturbed_params(jax.random.key(11))
  out = model_lib.predict(params, z, g, x_sc, cfg=TINY_MODEL, prior_scale=1.0)[0]
  ignored = model_lib.predict(params, z, g, x_sc, cfg=TINY_MODEL, prior_scale=1.0, t_B=jnp.full_like(g, 0.3))[0]
  np.testing.assert_array_equal(ignored, out)
  cfg_t = replace(TINY_MODEL, cond_input="t")
  with pytest.raises(ValueError, match="cond_input='t'.*pass t_B"):
    model_lib.predict(params, z, g, x_sc, cfg=cfg_t, prior_scale=1.0)
  at = lambda t: model_lib.predict(params, z, g, x_sc, cfg=cfg_t, prior_scale=1.0, t_B=jnp.full_like(g, t))[0]
  assert float(jnp.max(jnp.abs(at(0.2) - at(0.7)))) > 1e-3
  # Its adaLN input is t where the default's is gamma: feeding t = gamma reproduces the default exactly.
  np.testing.assert_allclose(model_lib.predict(params, z, g, x_sc, cfg=cfg_t, prior_scale=1.0, t_B=g)[0], out,
                             rtol=1e-6, atol=1e-6)


def test_bidirectional_attention_sees_the_future_and_causal_does_not():
  z, g, x_sc = _inputs(jax.random.key(6), batch=1)
  for causal in (False, True):
    cfg = replace(TINY_MODEL, causal=causal)
    params = perturbed_params(jax.random.key(7), cfg)
    net = model_lib.bind(model_lib.abstract(cfg).graphdef, params)
    f = lambda zz: net.denoiser(zz, g, x_sc, *noise_schedule.alpha_sigma2(g))
    base = f(z)
    moved = f(z.at[0, -1].add(1.0))
    changed_early = float(jnp.max(jnp.abs(moved[0, :-1] - base[0, :-1])))
    assert (changed_early == 0.0) == causal, (causal, changed_early)


def test_bfloat16_compute_stays_close_to_float32():
  params = perturbed_params(jax.random.key(8))
  z, g, x_sc = _inputs(jax.random.key(9))
  out = {}
  for dt in ("float32", "bfloat16"):
    cfg = replace(TINY_MODEL, compute_dtype=dt)
    out[dt] = model_lib.predict(params, z, g, x_sc, cfg=cfg, prior_scale=1.0)[1]
    assert out[dt].dtype == jnp.float32
  np.testing.assert_allclose(out["bfloat16"], out["float32"], atol=5e-2)


def test_sequence_longer_than_max_seq_len_is_refused():
  params = perturbed_params(jax.random.key(0))
  z, g, x_sc = _inputs(jax.random.key(1), length=TINY_MODEL.max_seq_len + 1)
  with pytest.raises(ValueError, match="max_seq_len"):
    model_lib.predict(params, z, g, x_sc, cfg=TINY_MODEL, prior_scale=1.0)


def test_the_structure_an_init_keeps_is_the_one_eval_shape_traces(monkeypatch):
  """`abstract` returns what a jitted `init` kept (no trace of its own): the same graph, shapes and logical axes as
  an nnx.eval_shape of the init, whatever the bounds, key and output bias; a network is told apart by its class."""
  from replaid_jax.objectives import token_model  # pylint: disable=g-import-not-at-top
  traced = model_lib.abstract_of(lambda: model_lib.Model(TINY_MODEL, gamma_0=0.0, gamma_1=1.0, key=jax.random.key(0)))
  monkeypatch.setattr(model_lib, "_ABSTRACTS", {})
  bias = jnp.linspace(-1.0, 1.0, TINY_MODEL.vocab_size)
  jax.jit(lambda key: model_lib.init(key, TINY_MODEL, gamma_0=-3.0, gamma_1=6.0, output_bias=bias)[0])(
      jax.random.key(5))
  kept = model_lib._ABSTRACTS[(model_lib.Model, TINY_MODEL)]  # pylint: disable=protected-access
  assert model_lib.abstract(TINY_MODEL) is kept
  assert (kept.graphdef, kept.shapes, kept.axes) == (traced.graphdef, traced.shapes, traced.axes)
  # The token network of the same config is another network: its own eval_shape, then kept.
  token_cfg = token_model.config(TINY_MODEL, causal=False)
  tokens = token_model.abstract(token_cfg)
  assert tokens.graphdef != kept.graphdef and token_model.abstract(token_cfg) is tokens
