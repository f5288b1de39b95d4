"""Configs: every shipped config converts cleanly; mistakes are caught with the key named."""

import ast
import pathlib
import re

import pytest

from configs import base, demo, owt_base, slimpajama, tiny
from replaid_jax import config_lib
from replaid_jax import errors

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("module", [base, demo, tiny])
def test_shipped_configs_convert(module):
  c = config_lib.from_config_dict(module.get_config())
  assert c.objective == "replaid"


def test_owt_base_is_the_paper_benchmark_model_and_requires_its_data_paths():
  cd = owt_base.get_config()
  assert (cd.model.width, cd.model.num_layers, cd.model.num_heads) == (768, 12, 12)
  assert (cd.data.seq_len, cd.model.embed_dim) == (1024, 16)
  with pytest.raises(errors.ConfigError, match="data.train_files is required"):
    config_lib.from_config_dict(cd)
  cd.data.train_files, cd.data.val_files = "train.npy", "val.npy"
  config_lib.from_config_dict(cd)


def test_slimpajama_sizes_come_from_the_config_argument():
  cd = slimpajama.get_config("113M")
  assert (cd.model.width, cd.model.num_layers, cd.model.num_heads) == (768, 12, 12)
  assert cd.data.npy_vocab_size == 32001 and cd.data.seq_len == 2048
  for name in slimpajama.SIZES:
    cd = slimpajama.get_config(name)
    cd.data.train_files, cd.data.val_files = "t.npy", "v.npy"
    config_lib.from_config_dict(cd)
  with pytest.raises(ValueError, match="unknown model size"):
    slimpajama.get_config("7B")


@pytest.mark.parametrize("key, value, message", [
    ("model.cond_input", "sigma", "model.cond_input"),
    ("diffusion.schedule", "cosine", "diffusion.schedule"),
    ("diffusion.selfcond_fraction", 0.3, "selfcond_fraction"),
    ("data.seq_len", 4096, "exceeds model.max_seq_len"),
    ("model.num_heads", 3, "model.num_heads"),
    ("train.grad_accum_steps", 3, "not divisible by train.grad_accum_steps"),
    ("diffusion.gamma_0", 7.0, "must be below"),
    ("optim.decay", "step", "optim.decay"),
])
def test_invalid_values_name_the_key(key, value, message):
  cd = tiny.get_config()
  section, field = key.split(".")
  cd[section][field] = value
  with pytest.raises(errors.ConfigError, match=message):
    config_lib.from_config_dict(cd)


def test_unknown_key_in_a_config_file_is_rejected():
  cd = tiny.get_config()
  cd.model.unlocked_typo = 3
  with pytest.raises(errors.ConfigError, match="model.unlocked_typo"):
    config_lib.from_config_dict(cd)


def test_every_base_key_has_a_comment():
  fields = [line for line in (ROOT / "replaid_jax" / "base_config.py").read_text().splitlines()
            if re.match(r"^\s+\w+\.\w+ = ", line)]
  assert len(fields) > 60
  for line in fields:
    assert "#" in line, f"replaid_jax/base_config.py defines a key without saying what it means: {line.strip()}"


PURE = ("replaid_jax/models", "replaid_jax/diffusion")
ALLOWED = {"jax", "flax", "optax", "numpy", "math", "dataclasses", "functools", "typing", "contextlib", "replaid_jax"}


def test_models_and_diffusion_import_no_io():
  """Pure maths: no absl, ml_collections, orbax, grain, clu, logging or file-system modules."""
  for folder in PURE:
    for path in sorted((ROOT / folder).glob("*.py")):
      tree = ast.parse(path.read_text())
      for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
          names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
          names = [node.module or ""]
        for name in names:
          top = name.split(".")[0]
          assert top in ALLOWED, f"{path.relative_to(ROOT)} imports {name}"
          if top == "replaid_jax":
            assert name.startswith(("replaid_jax.models", "replaid_jax.diffusion")), f"{path} imports {name}"



def _imports(path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return names


def test_no_import_runs_back_up_the_floors_and_no_private_jax():
  """The inference reader does not import the trainer, the config does not import the sampling CLI, and nothing
  imports jax's private modules."""
  lib = ROOT / "replaid_jax"
  assert not {n for n in _imports(lib / "inference.py") if n.startswith("replaid_jax.train")}
  assert not {n for n in _imports(lib / "config_lib.py") if n.startswith("replaid_jax.sample")}
  for path in sorted(lib.rglob("*.py")):
    assert not {n for n in _imports(path) if n.startswith("jax._src")}, path


def test_objective_specific_behaviour_lives_in_objectives():
  """Code outside replaid_jax/objectives asks the objective what it is instead of comparing its name."""
  for path in sorted((ROOT / "replaid_jax").rglob("*.py")):
    if "objectives" in path.parts:
      continue
    for number, line in enumerate(path.read_text().splitlines(), 1):
      assert not re.search(r"objective\s*[!=]=", line), f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
