"""One train step whatever the mesh: sharded runs equal the single-device run; golden partition specs."""

import json
import os

import jax
import numpy as np
import pytest

from replaid_jax import config_lib
from replaid_jax import objectives
from replaid_jax import sharding as sharding_lib
from replaid_jax.models import model as model_lib
from replaid_jax.train import build as build_lib
from replaid_jax.train import optim
from replaid_jax.train import step as step_lib

from test_train import _run_steps, _synthetic_corpus, _tiny_config

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
UPDATE = os.environ.get("REPLAID_UPDATE_GOLDEN") == "1"  # regenerate the golden files after a deliberate change


@pytest.fixture(scope="module")
def single_device_run():
  return _run_steps((1, 1, 1), num_steps=5)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_runs_follow_the_single_device_loss_curve(single_device_run, mesh_shape):
  params_1, losses_1, _ = single_device_run
  params_n, losses_n, run = _run_steps(mesh_shape, num_steps=5)
  assert len(run.mesh.devices.reshape(-1)) == 8 and len(losses_n) == 5
  np.testing.assert_allclose(losses_n, losses_1, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=5e-4, atol=5e-6), params_n, params_1)
  specs = sharding_lib.specs_as_strings(run.params_sharding)
  name = "partition_specs_" + "x".join(map(str, mesh_shape)) + ".json"
  path = os.path.join(GOLDEN, name)
  if UPDATE:
    os.makedirs(GOLDEN, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(specs, f, indent=1, sort_keys=True)
  with open(path, encoding="utf-8") as f:
    golden = json.load(f)
  assert specs == golden, {k: (specs.get(k), golden.get(k)) for k in set(specs) | set(golden)
                           if specs.get(k) != golden.get(k)}
  if mesh_shape[1] > 1:
    assert any("fsdp" in s for s in specs.values())
  if mesh_shape[2] > 1:
    assert any("tensor" in s for s in specs.values())


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 2, 4)])
def test_the_one_init_trace_gives_the_shardings_and_values_of_the_abstract_model(mesh_shape, monkeypatch):
  """`build.build` computes the shardings inside its one trace of the init; they equal those computed outside any
  trace from an nnx.eval_shape of the model, and the values equal those of the init jitted with those out_shardings."""
  monkeypatch.setattr(model_lib, "_ABSTRACTS", {})  # no structure kept: `abstract` below traces an eval_shape
  corpus = _synthetic_corpus()
  c = build_lib.resolve_vocab(config_lib.from_config_dict(
      _tiny_config(**{"mesh.shape": mesh_shape, "mesh.axes": ("data", "fsdp", "tensor")})), corpus)
  mesh = sharding_lib.make_mesh(c.mesh.axes, c.mesh.shape, jax.devices()[:8])
  objective = objectives.make(c)
  net = objective.abstract()
  tx = optim.make(c.optim, total_steps=c.train.num_steps, axes=net.axes, frozen=objective.frozen_groups())
  params_sh = sharding_lib.param_shardings(net.shapes, net.axes, c.mesh.rules, mesh)
  state_sh = sharding_lib.derived_shardings(lambda p: step_lib.init_state(p, tx), net.shapes, params_sh, mesh)
  expected = jax.jit(lambda key: step_lib.init_state(objective.init(key, None)[0], tx),
                     out_shardings=state_sh)(jax.random.key(c.seed))

  run = build_lib.build(c, corpus, devices=jax.devices()[:8])
  same = lambda a, b: jax.tree.structure(a) == jax.tree.structure(b) and jax.tree.leaves(a) == jax.tree.leaves(b)
  assert same(run.params_sharding, params_sh) and same(run.state_sharding, state_sh)
  specs = " ".join(sharding_lib.specs_as_strings(params_sh).values())
  assert "fsdp" in specs and "tensor" in specs
  # Adam's moments and the EMA have their parameter's sharding; counters and loss statistics are replicated.
  assert same(state_sh.params, params_sh) and same(state_sh.ema_params, params_sh)
  param_paths = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(params_sh)[0]}
  moments = 0
  for path, s in jax.tree_util.tree_flatten_with_path((state_sh.step, state_sh.opt_state, state_sh.loss_stats))[0]:
    owner = [q for q in param_paths if jax.tree_util.keystr(path).endswith(q)]
    assert s == (param_paths[owner[0]] if owner else sharding_lib.replicated(mesh)), jax.tree_util.keystr(path)
    moments += bool(owner)
  assert moments == 2 * len(param_paths)  # Adam's mu and nu of every parameter
  # The values are bit for bit those of the init jitted on its own with these out_shardings, and laid out as they say.
  want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  for path, x in jax.tree_util.tree_flatten_with_path(run.state)[0]:
    np.testing.assert_array_equal(x, want[path], err_msg=jax.tree_util.keystr(path))
  assert all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(jax.tree.leaves(run.state),
                                                                     jax.tree.leaves(state_sh)))


def test_activation_constraints_reach_the_compiled_step():
  _, _, run = _run_steps((2, 2, 2), num_steps=0)
  step = build_lib.compile_step(run)
  batch = jax.ShapeDtypeStruct((8, 32), np.int32, sharding=run.batch_sharding)
  text = step.lower(run.state, batch, jax.random.key(0)).as_text()
  constraints = [line for line in text.splitlines() if "sharding_constraint" in line]
  # The MLP hidden activation [B, L, F] is split over data x fsdp (batch) and tensor (mlp); the residual
  # stream [B, L, D] over the batch axes only.
  assert any('[{"data", "fsdp"}, {}, {"tensor"}]> : tensor<8x32x128' in line for line in constraints)
  assert any('[{"data", "fsdp"}, {}, {}]> : tensor<8x32x32' in line for line in constraints)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "dots"])
def test_rematerialisation_changes_memory_not_results(single_device_run, policy):
  params_1, losses_1, _ = single_device_run
  params_r, losses_r, _ = _run_steps((1, 1, 1), num_steps=5, **{"model.remat": True, "model.remat_policy": policy})
  np.testing.assert_allclose(losses_r, losses_1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_r, params_1)
