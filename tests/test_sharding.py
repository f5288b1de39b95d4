"""One train step whatever the mesh: sharded runs equal the single-device run; golden partition specs."""

import json
import os

import jax
import numpy as np
import pytest

from replaid_jax import sharding as sharding_lib

from test_train import _run_steps

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


def test_activation_constraints_reach_the_compiled_step():
  _, _, run = _run_steps((2, 2, 2), num_steps=0)
  from replaid_jax.train import loop  # pylint: disable=g-import-not-at-top
  step = loop.compile_step(run)
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
