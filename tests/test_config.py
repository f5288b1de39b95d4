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


# The library's floors, lowest first: a module may import its own package and strictly lower floors only, so
# every arrow points down and there is no cycle between packages. Imports under `if TYPE_CHECKING:` are
# annotations, not dependencies, and are not counted.
FLOORS = {
    "errors": 0, "paths": 0, "logs": 0, "progress": 0, "base_config": 0, "flops": 0, "hostenv": 0,
    "metrics": 1, "workdir_lock": 1, "distributed": 1, "checkpoint": 1, "cli": 1, "chips": 1, "scaling": 1,
    "models": 2, "data": 2, "scaling_analysis": 2,
    "diffusion": 3, "sharding": 3, "scaling_report": 3,
    "objectives": 4,
    "config_lib": 5,
    "inference": 6,
    "eval": 7,
    "judges": 8,
    "sample": 9, "train": 9,
    "research": 10, "benchmark": 10,
    "cost_estimate": 11,
}


def _runtime_imports(path) -> set[str]:
  """The replaid_jax modules `path` imports at run time (module level or inside functions)."""
  tree = ast.parse(path.read_text())
  typing_only = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
      typing_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
  names = set()
  for node in ast.walk(tree):
    if id(node) in typing_only:
      continue
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.update([node.module] + [f"{node.module}.{a.name}" for a in node.names])
  return {n for n in names if n.startswith("replaid_jax.")}


def test_every_import_runs_down_the_floors():
  lib = ROOT / "replaid_jax"
  unit = lambda rel: rel.parts[0].removesuffix(".py")
  units = {unit(p.relative_to(lib)) for p in lib.rglob("*.py")} - {"__init__"}
  assert units <= set(FLOORS), f"give these a floor in FLOORS: {sorted(units - set(FLOORS))}"
  upward = []
  for path in sorted(lib.rglob("*.py")):
    here = unit(path.relative_to(lib))
    if here == "__init__":
      continue
    for name in _runtime_imports(path):
      there = name.split(".")[1]
      if there in FLOORS and there != here and FLOORS[there] >= FLOORS[here]:
        upward.append(f"{path.relative_to(ROOT)} imports {name} (floor {FLOORS[there]} from floor {FLOORS[here]})")
  assert not upward, "\n".join(upward)


def test_objective_specific_behaviour_lives_in_objectives():
  """Code outside replaid_jax/objectives asks the objective what it is instead of comparing its name."""
  for path in sorted((ROOT / "replaid_jax").rglob("*.py")):
    if "objectives" in path.parts:
      continue
    for number, line in enumerate(path.read_text().splitlines(), 1):
      assert not re.search(r"objective\s*[!=]=", line), f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
