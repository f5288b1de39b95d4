"""Writes an isoFLOP sweep: one training run per (method, budget, size), with steps set by the budget.

  python launch/sweeps/isoflop.py --config=configs/FILE.py --methods=replaid,ar,mdlm \
      --budgets=1e15,3e15,1e16 --sizes=S1,S2,S3 --out=runs/isoflop [--extra=train.batch_size=64 ...]

The config file exposes `SIZES` (label -> (width, num_layers, num_heads)) and
`get_config(size_label)`; each run trains `--config=FILE.py:SIZE`. Steps are
`floor(C / (3 F B))` with F the analytic forward FLOPs of one sequence
(replaid_jax.flops) and B the batch size, so every run of a budget spends the
same training FLOPs.

--methods is a comma-separated list of entries
  OBJECTIVE                              e.g. ar
  NAME:OBJECTIVE                         e.g. replaid_b:replaid
  NAME:OBJECTIVE:KEY=VALUE[:KEY=VALUE]   e.g. nosc:replaid:diffusion.selfcond_fraction=0
NAME labels the method in the sweep (default: the objective) and must be
unique; OBJECTIVE becomes --config.objective; each KEY=VALUE becomes
--config.KEY=VALUE for that method only. A value holding ',' or ':' goes in
--extra (repeatable, applied to every run) instead.

Writes DIR/sweep.json (the runs, each with its argv) and DIR/commands.sh, and
prints a table. With --append the runs are added to DIR/sweep.json, so that
each budget can sample its own sizes (those around its optimum):

  python launch/sweeps/isoflop.py ... --budgets=1e15 --sizes=S1,S2,S3 --out=DIR
  python launch/sweeps/isoflop.py ... --budgets=1e16 --sizes=S2,S3,S4 --out=DIR --append

Run the sweep with launch/sweeps/run.py and fit the laws with
launch/sweeps/analyze.py.
"""

import ast
import importlib.util
import json
import os
import re
import shlex
import sys
from typing import Any, Iterable, Sequence

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from replaid_jax import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from replaid_jax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from replaid_jax import flops  # pylint: disable=g-import-not-at-top,wrong-import-position
from replaid_jax import objectives  # pylint: disable=g-import-not-at-top,wrong-import-position
from replaid_jax import scaling  # pylint: disable=g-import-not-at-top,wrong-import-position

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def load_config_module(path: str):
  """Imports a config file by path (as ml_collections' config_flags does), with the repository importable."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found.")
  name = "_isoflop_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.abspath(path))[0])
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for attr in ("SIZES", "get_config"):
    if not hasattr(module, attr):
      raise ValueError(f"{path} must define {attr} (SIZES: label -> (width, num_layers, num_heads); "
                       "get_config(size_label)).")
  return module


def parse_method(spec: str) -> dict[str, Any]:
  """`OBJECTIVE`, `NAME:OBJECTIVE` or `NAME:OBJECTIVE:KEY=VALUE[:KEY=VALUE...]` -> name, objective, overrides."""
  parts = spec.strip().split(":")
  name, objective = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
  if not _NAME.match(name) or not objective:
    raise ValueError(f"method {spec!r}: the name must match {_NAME.pattern} and the objective be non-empty.")
  return {"name": name, "objective": objective, "overrides": [parse_override(p) for p in parts[2:]]}


def parse_override(text: str) -> tuple[str, str]:
  """`KEY=VALUE` (an optional `--config.` or `config.` prefix is dropped) -> (KEY, VALUE)."""
  text = text.strip()
  for prefix in ("--config.", "config."):
    if text.startswith(prefix):
      text = text[len(prefix):]
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise ValueError(f"override {text!r} is not KEY=VALUE (e.g. diffusion.selfcond_fraction=0).")
  if key == "train.num_steps":
    raise ValueError("train.num_steps is set by the budget; do not override it.")
  return key, value


def _parse_value(current: Any, value_type: type | None, text: str) -> Any:
  kind = type(current) if current is not None else value_type
  if kind is bool:
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{text!r} is not a boolean.")
    return text.lower() in ("true", "1")
  if kind is str:
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  return float(value) if kind is float and isinstance(value, int) else value


def apply_override(cd, key: str, text: str) -> None:
  """Sets `cd.KEY` from its command-line text, parsed as the field's type."""
  *path, leaf = key.split(".")
  parent = cd
  for p in path:
    parent = parent[p]
  if leaf not in parent:
    raise KeyError(f"unknown config key {key!r}; every valid key is defined in replaid_jax/base_config.py.")
  current = parent[leaf]
  value_type = None
  if current is None:
    try:
      value_type = parent.get_ref(leaf).get_type()
    except ValueError:
      pass
  parent[leaf] = _parse_value(current, value_type, text)


def config_dict_vocab_size(cd) -> int:
  """model.vocab_size if set, else data.npy_vocab_size for .npy data, else data.tokenizer_vocab_size."""
  if cd.model.vocab_size:
    return int(cd.model.vocab_size)
  if cd.data.source == "npy" and cd.data.npy_vocab_size:
    return int(cd.data.npy_vocab_size)
  return int(cd.data.tokenizer_vocab_size)


def config_dict_forward_flops(cd) -> float:
  """Forward FLOPs of one sequence, read straight from the ConfigDict (no validation needed)."""
  return flops.forward_flops_per_sequence(
      seq_len=cd.data.seq_len, width=cd.model.width, num_layers=cd.model.num_layers,
      vocab_size=config_dict_vocab_size(cd), embed_dim=cd.model.embed_dim, mlp_ratio=cd.model.mlp_ratio,
      output_prior=bool(cd.diffusion.output_prior), token_input=_token_input(cd.objective))


def _token_input(objective: str) -> bool:
  """Whether the objective's network reads token ids; an objective this checkout lacks is counted like RePlaid."""
  cls = objectives.REGISTRY.get(objective)
  return bool(cls and cls.token_input)


def _validate(cd, strict: bool) -> str:
  """Converts the config with config_lib; returns what it rejects as a note (raises it when `strict`).

  An objective that this checkout does not accept yet is reported
  as such; the FLOP count never depends on validation.
  """
  try:
    config_lib.from_config_dict(cd)
    return ""
  except errors.ConfigError as e:
    error = e
  if cd.objective not in objectives.REGISTRY:
    return f"objective {cd.objective!r} not accepted by this checkout's config validation"
  if strict:
    raise error
  return f"config validation failed: {error}"


def _budget_label(budget: float) -> str:
  return f"{budget:.3g}".replace("+", "")


def _config_arg(path: str) -> str:
  full = os.path.abspath(path)
  rel = os.path.relpath(full, _REPO)
  return full if rel.startswith("..") else rel


def generate(config_path: str, methods: Sequence[str], budgets: Iterable[float], sizes: Sequence[str], out: str,
             extra: Sequence[str] = (), vocab_size: int | None = None,
             strict: bool = False, append: bool = False) -> list[dict[str, Any]]:
  """Builds the runs of a sweep and writes out/sweep.json and out/commands.sh.

  Args:
    config_path: config file exposing SIZES and get_config(size_label).
    methods: entries as documented in this module.
    budgets: training FLOPs per run.
    sizes: labels of SIZES.
    out: sweep directory (runs go to out/runs/NAME).
    extra: KEY=VALUE overrides applied to every run.
    vocab_size: vocabulary for the FLOP count; None reads it from the config.
    strict: raise when config_lib rejects a run's config (else a note on the run).
    append: add the runs to out/sweep.json instead of replacing it, so one sweep
      can sample different sizes at different budgets (as around each budget's
      optimum). A run already listed must have the same command; it is kept once.

  Returns:
    The runs written to sweep.json (with `append`, the old ones first).
  """
  module, specs, sizes = _checked_inputs(config_path, methods, sizes)
  extra_overrides = [parse_override(e) for e in extra]
  out = os.path.abspath(out)
  config_arg = _config_arg(config_path)
  runs = []
  for spec in specs:
    for budget in sorted({float(b) for b in budgets}):
      for size in sizes:
        cd = _run_config(module, size, spec["objective"], spec["overrides"] + extra_overrides, vocab_size)
        runs.append(_plan_run(cd, spec, budget, size, extra_overrides, strict, out, config_arg))
  if append:
    runs = merge_runs(read_sweep(out), runs)
  _write_sweep(out, runs)
  return runs


def _checked_inputs(config_path: str, methods: Sequence[str],
                    sizes: Sequence[str]) -> tuple[Any, list[dict[str, Any]], list[str]]:
  """The config module, the parsed methods and the distinct sizes, each checked.

  Raises:
    ValueError: on repeated method names, sizes missing from SIZES, or size
      labels that cannot name a run directory.
  """
  module = load_config_module(config_path)
  specs = [parse_method(m) for m in methods]
  names = [s["name"] for s in specs]
  if len(set(names)) != len(names):
    raise ValueError(f"method names must be unique, got {names}; label repeats as NAME:OBJECTIVE.")
  sizes = list(dict.fromkeys(sizes))
  unknown = [s for s in sizes if s not in module.SIZES]
  if unknown:
    raise ValueError(f"sizes {unknown} are not in SIZES of {config_path} ({sorted(module.SIZES)}).")
  if not all(_NAME.match(s) for s in sizes):
    raise ValueError(f"size labels must match {_NAME.pattern} (they name run directories), got {sizes}.")
  return module, specs, sizes


def _run_config(module, size: str, objective: str, overrides: Sequence[tuple[str, str]], vocab_size: int | None):
  """The ConfigDict of one run: SIZES[size] with the objective, the overrides and the counted vocabulary."""
  cd = module.get_config(size)
  cd.objective = objective
  for key, text in overrides:
    apply_override(cd, key, text)
  cd.model.vocab_size = int(vocab_size) if vocab_size else config_dict_vocab_size(cd)
  return cd


def _plan_run(cd, spec: dict[str, Any], budget: float, size: str, extra_overrides: Sequence[tuple[str, str]],
              strict: bool, out: str, config_arg: str) -> dict[str, Any]:
  """One run of the sweep as sweep.json lists it: its steps for `budget`, its sizes, command and notes."""
  notes = [_validate(cd, strict)]
  fwd = config_dict_forward_flops(cd)
  batch = int(cd.train.batch_size)
  steps = flops.steps_for_budget(budget, fwd, batch)
  n = scaling.non_embedding_params(cd.model.width, cd.model.num_layers, cd.model.mlp_ratio, cd.model.cond_dim)
  notes += _budget_notes(cd, steps)
  name = f"{spec['name']}-C{_budget_label(budget)}-{size}"
  workdir = os.path.join(out, "runs", name)
  command = ["python", "launch/train.py", f"--config={config_arg}:{size}", f"--workdir={workdir}",
             f"--config.objective={spec['objective']}"]
  command += [f"--config.{k}={v}" for k, v in spec["overrides"] + extra_overrides]
  command.append(f"--config.train.num_steps={steps}")
  tokens = steps * batch * int(cd.data.seq_len)
  return {
      "name": name, "method": spec["name"], "objective": spec["objective"], "size": size, "budget": budget,
      "num_steps": steps, "batch_size": batch, "seq_len": int(cd.data.seq_len),
      "vocab_size": int(cd.model.vocab_size), "width": int(cd.model.width),
      "num_layers": int(cd.model.num_layers), "num_heads": int(cd.model.num_heads),
      "fwd_flops_per_seq": fwd, "train_flops": 3.0 * fwd * batch * steps, "tokens": tokens,
      "non_embedding_params": n, "tokens_per_param": tokens / n, "workdir": workdir, "command": command,
      "note": "; ".join(x for x in notes if x),
  }


def _budget_notes(cd, steps: int) -> list[str]:
  """Notes on settings that keep a run of `steps` steps from spending its budget as planned."""
  notes = []
  if steps <= cd.optim.warmup_steps:
    notes.append(f"{steps} steps do not exceed optim.warmup_steps={cd.optim.warmup_steps}")
  if cd.train.max_minutes:
    notes.append(f"train.max_minutes={cd.train.max_minutes} may end the run before it spends its budget")
  if cd.train.size_to_minutes:
    notes.append(f"train.size_to_minutes={cd.train.size_to_minutes} may take fewer steps than the FLOP "
                 "budget's")
  return notes


def _write_sweep(out: str, runs: Sequence[dict[str, Any]]) -> None:
  """Writes out/sweep.json and the executable out/commands.sh (one command per run)."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "sweep.json"), "w", encoding="utf-8") as f:
    json.dump(runs, f, indent=1)
  with open(os.path.join(out, "commands.sh"), "w", encoding="utf-8") as f:
    f.write("#!/usr/bin/env bash\n# isoFLOP sweep of %d runs, one per line. launch/sweeps/run.py runs them resumably,"
            "\n# in parallel and with logs: python launch/sweeps/run.py --sweep=%s\n" % (len(runs), shlex.quote(out)))
    f.write(f"cd {shlex.quote(_REPO)} || exit 1\n")
    for run in runs:
      f.write(shlex.join(run["command"]) + "\n")
  os.chmod(os.path.join(out, "commands.sh"), 0o755)


def read_sweep(out: str) -> list[dict[str, Any]]:
  """The runs of out/sweep.json, or [] when there is none yet."""
  path = os.path.join(out, "sweep.json")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def merge_runs(old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """old + the runs of new not in old; a name in both must carry the same command."""
  by_name = {r["name"]: r for r in old}
  merged = list(old)
  for r in new:
    prev = by_name.get(r["name"])
    if prev is None:
      merged.append(r)
      by_name[r["name"]] = r
    elif prev["command"] != r["command"]:
      raise ValueError(f"run {r['name']} is already in the sweep with another command:\n  {shlex.join(prev['command'])}"
                       f"\nnow:\n  {shlex.join(r['command'])}\nUse a new --out (or another method NAME) for a "
                       "changed setup.")
  return merged


def format_table(runs: Sequence[dict[str, Any]]) -> str:
  """One line per run: size, parameters, FLOPs, steps and tokens."""
  header = f"{'name':<32} {'N (non-emb)':>12} {'F fwd/seq':>10} {'steps':>8} {'tokens':>10} {'tok/N':>7}  note"
  rows = [header, "-" * len(header)]
  for r in runs:
    rows.append(f"{r['name']:<32} {r['non_embedding_params']:>12,d} {r['fwd_flops_per_seq']:>10.3g} "
                f"{r['num_steps']:>8d} {r['tokens']:>10.3g} {r['tokens_per_param']:>7.2f}  {r['note']}")
  return "\n".join(rows)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("config", None, "Config file exposing SIZES and get_config(size_label).")
  flags.DEFINE_list("methods", ["replaid"], "Comma-separated OBJECTIVE | NAME:OBJECTIVE[:KEY=VALUE...] entries.")
  flags.DEFINE_list("budgets", None, "Comma-separated training FLOP budgets, e.g. 1e15,3e15,1e16.")
  flags.DEFINE_list("sizes", None, "Comma-separated labels of SIZES.")
  flags.DEFINE_string("out", None, "Sweep directory.")
  flags.DEFINE_multi_string("extra", [], "KEY=VALUE config override applied to every run (repeatable).")
  flags.DEFINE_integer("vocab_size", None, "Vocabulary for the FLOP count (default: from the config).")
  flags.DEFINE_bool("strict", False, "Fail when config validation rejects a run (default: a note on the run).")
  flags.DEFINE_bool("append", False, "Add the runs to an existing OUT/sweep.json instead of replacing it.")
  flags.mark_flags_as_required(["config", "budgets", "sizes", "out"])
  return flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  f = FLAGS
  runs = generate(f.config, f.methods, [float(b) for b in f.budgets], f.sizes, f.out, f.extra, f.vocab_size,
                  f.strict, f.append)
  print(format_table(runs))
  print(f"\n{len(runs)} runs, {sum(r['train_flops'] for r in runs):.3g} training FLOPs in all; wrote "
        f"{os.path.join(os.path.abspath(f.out), 'sweep.json')} and commands.sh")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  FLAGS = _define_flags()
  app.run(main)
