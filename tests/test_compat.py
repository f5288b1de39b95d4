"""Checkpoints written by earlier versions of the project still load, with the same parameters and outputs."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from replaid_jax import inference
from replaid_jax.models import model as model_lib

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "checkpoint_before_nnx")


def test_a_checkpoint_written_before_the_flax_modules_loads_with_the_same_parameters_and_outputs(tmp_path):
  """`golden/checkpoint_before_nnx` was saved by the hand-written model (before the NNX modules) after 2 steps of a
  16-wide tiny config on random tokens, with `expected.npz`: its EMA parameters as that version restored them, and
  that version's logits and x_hat for fixed inputs. Today's reader must restore the same arrays, and today's
  model must map the inputs to the same outputs."""
  shutil.copytree(os.path.join(GOLDEN, "checkpoints"), tmp_path / "checkpoints")
  expected = np.load(os.path.join(GOLDEN, "expected.npz"))
  ckpt, step, meta = inference.open_checkpoint(str(tmp_path), None)
  try:
    c, _ = inference.saved_config(meta["config"], meta.get("vocab_size"), section="eval")
    model = inference.build_model(c, devices=jax.devices()[:1])
    params = inference.restore_params(ckpt, step, model)
  finally:
    ckpt.close()
  assert step == 2
  flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  saved = {k[len("param"):]: expected[k] for k in expected.files if k.startswith("param")}
  assert sorted(flat) == sorted(saved) and len(flat) == 27
  for name, value in saved.items():
    np.testing.assert_array_equal(flat[name], value, err_msg=name)
  g = jnp.asarray(expected["gamma"])
  logits, x_hat = model_lib.predict(params, jnp.asarray(expected["z"]), g, jnp.asarray(expected["x_sc"]),
                                    cfg=c.model, prior_scale=1.0)
  np.testing.assert_allclose(np.asarray(logits), expected["logits"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(x_hat), expected["x_hat"], rtol=1e-5, atol=1e-6)
