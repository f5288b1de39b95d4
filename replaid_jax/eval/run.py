"""Evaluates saved checkpoints: the likelihood bound with error bars, information-loss curves, embedding geometry.

`evaluate_checkpoint(workdir, step=None, dataset="validation", overrides={})`:
  1. opens <workdir>/checkpoints read-only and checks that the step is complete;
  2. rebuilds the config saved in the checkpoint metadata. The model, diffusion,
     data and mesh sections come from the checkpoint; only `eval.*` may be set
     (`overrides`, e.g. {"eval.final_num_times": 16}). The eval section starts
     from the defaults of replaid_jax/base_config.py, not from the run's in-training
     quick-look settings, so every checkpoint is evaluated under one pinned
     protocol: K = eval.final_num_times (8) lattice times per sequence and the
     whole split (eval.max_batches = 0); only the run's eval.batch_size (known to
     fit in memory) is kept;
  3. rebuilds the model on its own mesh and restores only the EMA parameters;
  4. loads the dataset with the checkpoint's tokenizer (sha256-verified);
  5. computes the bound per sequence (own t = 0 pass, K lattice times, prior,
     self-conditioning on every pass), its mean, standard error and 95% interval,
     and the throughput of the computation against one forward pass;
  6. writes <output_dir>/<dataset>_<split>_step<N>.json (with the protocol),
     each sequence's bound to ..._step<N>_per_sequence.npy (for paired
     comparisons between checkpoints), TensorBoard scalars and a one-line
     summary; optionally curves and geometry.
The bound, curves and geometry are computed in analyses.py; `watch(...)` evaluates each new checkpoint once.
"""

import dataclasses
import datetime
import functools
import math
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import ml_collections

import replaid_jax
from replaid_jax import base_config
from replaid_jax import checkpoint as ckpt_lib
from replaid_jax import config_lib
from replaid_jax import errors
from replaid_jax import inference
from replaid_jax import metrics as metrics_lib
from replaid_jax import objectives
from replaid_jax import paths
from replaid_jax.eval import analyses as analyses_lib
from replaid_jax.eval import datasets
from replaid_jax.models import model as model_lib

ANALYSES = ("bound", "curves", "geometry")


# ---- config.


def eval_section(saved_eval: dict, overrides: dict[str, Any]) -> dict:
  """The eval section of an evaluation: base defaults, the run's batch size, then the overrides."""
  ev = ml_collections.ConfigDict(base_config.get_base_config().eval.to_dict())
  if isinstance(saved_eval, dict) and "batch_size" in saved_eval:
    ev.batch_size = int(saved_eval["batch_size"])
  for key, value in overrides.items():
    if not key.startswith("eval."):
      raise errors.ConfigError(
          f"--config.{key} cannot be set when evaluating: only eval.* keys can; the model, diffusion, data and mesh "
          "sections come from the checkpoint's saved config.")
    name = key[len("eval."):]
    if name not in ev:
      raise errors.ConfigError(f"unknown config key '{key}'; the eval keys are {', '.join(sorted(ev.keys()))} "
                               "(each explained in replaid_jax/base_config.py).")
    try:
      ev[name] = value
    except (TypeError, ValueError) as e:
      raise errors.ConfigError(f"--config.{key}={value!r}: {e}") from None
  return ev.to_dict()


def checkpoint_config(meta: dict, overrides: dict[str, Any] | None = None) -> config_lib.Config:
  """The Config a checkpoint was trained with (model.vocab_size resolved), with the eval section of `eval_section`."""
  saved = meta.get("config")
  vocab = meta.get("vocab_size")
  if isinstance(saved, dict) and not isinstance(vocab, int):
    raise errors.CheckpointError("the checkpoint metadata records no vocab_size; it was not written by "
                                 "launch/train.py.")
  saved_eval = saved.get("eval", {}) if isinstance(saved, dict) else {}
  c, filled = inference.saved_config(saved, vocab, section="eval",
                                     section_values=eval_section(saved_eval, overrides or {}))
  filled = [k for k in filled if k.split(".")[0] in ("model", "diffusion", "data", "mesh")]  # what evaluation reads
  if filled:
    logging.warning("the saved config lacks %s; using the defaults of replaid_jax/base_config.py", ", ".join(filled))
  for key, value in (("eval.final_num_times", c.eval.final_num_times), ("eval.curve_points", c.eval.curve_points),
                     ("eval.curve_max_sequences", c.eval.curve_max_sequences)):
    if value < (2 if key == "eval.curve_points" else 1):
      raise errors.ConfigError(f"{key}={value} is too small; pass a positive value (at least 2 grid points).")
  if c.eval.max_batches < 0:
    raise errors.ConfigError(f"eval.max_batches={c.eval.max_batches} must be 0 (whole split) or positive.")
  return c


# ---- opening a checkpoint (shared with sampling and the AR judge: replaid_jax/inference.py).

open_checkpoint = inference.open_checkpoint
Model = inference.Model
restore_params = inference.restore_params


def build_model(c: config_lib.Config, devices=None) -> inference.Model:
  """The checkpoint's model on its mesh, with the eval batch checked against the batch split."""
  return inference.build_model(c, devices, batch_size=c.eval.batch_size, batch_key="eval.batch_size")


# ---- one checkpoint.


class Session:
  """Caches what several evaluations of one run share (`watch`): models, datasets, compiled functions."""

  def __init__(self, devices=None):
    self.devices = devices
    self._models: dict[str, Model] = {}
    self._sets: dict[tuple, datasets.EvalSet] = {}
    self._fns: dict[tuple, Any] = {}

  def model(self, c: config_lib.Config) -> Model:
    key = repr(dataclasses.replace(c, eval=None))
    if key not in self._models or self._models[key].config.eval.batch_size != c.eval.batch_size:
      self._models[key] = build_model(c, self.devices)
    return self._models[key]

  def dataset(self, name: str, c: config_lib.Config, tok, workdir: str) -> datasets.EvalSet:
    key = (name, c.eval.split, repr(c.data), c.eval.data_dir, tok.identity()["sha256"] if tok else None)
    if key not in self._sets:
      t0 = time.time()
      self._sets[key] = datasets.load(name, split=c.eval.split, data_cfg=c.data, vocab_size=c.model.vocab_size,
                                      tok=tok, workdir=workdir, data_dir=c.eval.data_dir)
      logging.info("dataset %s (%s): %d sequences of %d tokens in %.1fs", name, self._sets[key].split,
                   *self._sets[key].tokens.shape, time.time() - t0)
    return self._sets[key]

  def fn(self, key: tuple, make: Callable) -> Any:
    if key not in self._fns:
      self._fns[key] = make()
    return self._fns[key]


def output_dir_for(workdir: str, output_dir: str | None) -> str:
  return paths.absolute(output_dir) if output_dir else paths.join(paths.absolute(workdir), "eval")


def result_path(workdir: str, step: int, dataset: str, split: str, output_dir: str | None = None,
                max_batches: int = 0) -> str:
  """<output_dir>/<dataset>_<split>_step<N>.json; a quick look (max_batches > 0) adds _quick<M> to the name, so it
  never replaces a whole-split result."""
  name, split = datasets.set_name(dataset, split)
  quick = f"_quick{max_batches}" if max_batches else ""
  return os.path.join(output_dir_for(workdir, output_dir), f"{name}_{split}_step{step}{quick}.json")


def per_sequence_path(result_json: str) -> str:
  """Where the per-sequence bounds of a results file go: the same name, `_per_sequence.npy` for `.json`."""
  return os.path.splitext(result_json)[0] + "_per_sequence.npy"


@dataclasses.dataclass
class _Restored:
  """A checkpoint opened for evaluation: its config, tokenizer, model and EMA parameters."""

  step: int
  directory: str  # <workdir>/checkpoints/<step>
  meta: dict
  config: config_lib.Config
  tok: Any
  model: Model
  params: Any


def evaluate_checkpoint(workdir: str, *, step: int | None = None, dataset: str = "validation",
                        overrides: dict[str, Any] | None = None, output_dir: str | None = None,
                        analyses: tuple[str, ...] = ("bound",), timing: bool = True,
                        session: Session | None = None) -> dict:
  """Evaluates one checkpoint of the run in `workdir` (see the module docstring); returns the results written."""
  unknown = sorted(set(analyses) - set(ANALYSES))
  if unknown:
    raise errors.ConfigError(f"unknown analyses {unknown}; choose from {ANALYSES}.")
  session = session or Session()
  t_start = time.time()
  r = _restore(session, workdir, step, overrides)
  c = r.config
  out_dir = output_dir_for(workdir, output_dir)
  evalset = session.dataset(dataset, c, r.tok, workdir)
  if not objectives.REGISTRY[c.objective].learned_embeddings and set(analyses) - {"bound"}:
    raise errors.ConfigError(f"--curves and --geometry analyse RePlaid's embeddings and noise schedule; this "
                             f"checkpoint was trained with objective={c.objective!r}. Evaluate its bound only.")
  result = _result_head(r, workdir, evalset)
  writer = metrics_lib.MetricWriter(out_dir)
  try:
    _run_analyses(session, r, evalset, analyses, timing, out_dir, writer, result)
    result["seconds_total"] = time.time() - t_start
    _write_result(writer, result, result_path(workdir, r.step, dataset, c.eval.split, output_dir,
                                              c.eval.max_batches))
  finally:
    writer.close()
  line = summary_line(result)
  logging.info("%s", line)
  if jax.process_index() == 0:
    print(line, flush=True)
  return result


def _restore(session: Session, workdir: str, step: int | None, overrides: dict[str, Any] | None) -> _Restored:
  """Opens the checkpoint read-only, rebuilds its config and model and restores its EMA parameters."""
  ckpt, step, meta = open_checkpoint(workdir, step)
  try:
    c = checkpoint_config(meta, overrides)
    tok = inference.checkpoint_tokenizer(meta, workdir)
    model = session.model(c)
    params = restore_params(ckpt, step, model)
  finally:
    ckpt.close()
  return _Restored(step, paths.join(ckpt.directory, str(step)), meta, c, tok, model, params)


def _result_head(r: _Restored, workdir: str, evalset: datasets.EvalSet) -> dict:
  """The results' first keys: what was evaluated, on what, with which versions and devices."""
  c = r.config
  bounds = (jax.tree.map(float, jax.device_get(r.params["bounds"])) if "bounds" in r.params
            else {"gamma_0": None, "gamma_1": None})
  return {
      "objective": c.objective,
      "step": r.step, "workdir": paths.absolute(workdir), "checkpoint": r.directory,
      "dataset": evalset.name, "split": evalset.split, "time": datetime.datetime.now(datetime.UTC).isoformat(),
      "gamma_0": bounds["gamma_0"], "gamma_1": bounds["gamma_1"],
      "model": {"num_params": model_lib.count(r.params), "vocab_size": c.model.vocab_size, "width": c.model.width,
                "num_layers": c.model.num_layers, "embed_dim": c.model.embed_dim},
      "checkpoint_metadata": {k: r.meta.get(k) for k in ("objective", "tokenizer", "data", "replaid_jax_version",
                                                         "jax_version", "num_params")},
      "eval_config": dataclasses.asdict(c.eval), "replaid_jax_version": replaid_jax.__version__,
      "jax_version": jax.__version__, "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
  }


def _run_analyses(session: Session, r: _Restored, evalset: datasets.EvalSet, analyses: tuple[str, ...],
                  timing: bool, out_dir: str, writer: metrics_lib.MetricWriter, result: dict) -> None:
  """Runs the chosen analyses into `result` and writes their TensorBoard scalars and images."""
  c, step, model, params = r.config, r.step, r.model, r.params
  label = f"{datasets.display_name(evalset.name, evalset.split)} step {step}"
  key = analyses_lib.eval_key(c)
  put = functools.partial(jax.device_put, device=model.batch_sharding)
  prefix = f"{evalset.name}_{evalset.split}/"
  if "bound" in analyses:
    result.update(analyses_lib.bound(session.fn, c, model, params, evalset, key, put, label, timing))
    if not math.isfinite(result["nats_per_token"]):
      raise errors.CheckpointError(
          f"the bound of checkpoint step {step} is not finite ({result['nats_per_token']}); nothing was written. "
          "The parameters are finite, so the model overflows on this data; evaluate an earlier step (--step).")
    scalars = {k: result[k] for k in ("nats_per_token", "bits_per_token", "perplexity_bound", "stderr", "recon",
                                      "diffusion", "prior")}
    if "tokens_per_s" in result.get("throughput", {}):
      scalars["tokens_per_s"] = result["throughput"]["tokens_per_s"]
    writer.write(step, scalars, prefix=prefix, console=False)
  if "curves" in analyses:
    result["curves"] = analyses_lib.curves(session.fn, c, model, params, evalset, key, put, label, out_dir, step)
    writer.write(step, {"ce_linear_r2": result["curves"]["summary"]["ce_linear_fit"]["r2"],
                        "diffusion_cv": result["curves"]["summary"]["diffusion_cv"]},
                 prefix=prefix + "curves/", console=False)
    writer.write_image(prefix + "curves", result["curves"].get("png", ""), step)
  if "geometry" in analyses:
    result["geometry"] = analyses_lib.geometry(c, params, evalset, r.tok, out_dir, step)
    writer.write(step, {"pcs_for_90pct": result["geometry"]["all_rows"]["components_for_90pct"]},
                 prefix="geometry/", console=False)
    writer.write_image("geometry/pca_scree", result["geometry"].get("png", ""), step)


def _write_result(writer: metrics_lib.MetricWriter, result: dict, path: str) -> None:
  """Writes the results to `path` (its name in the writer's directory) and the per-sequence bounds beside it."""
  per_sequence = result.pop("per_sequence", None)
  if per_sequence is not None:
    # Each sequence's bound (nats/token), in evaluation order: two checkpoints evaluated on the same tokens
    # (protocol.tokens_sha256) with the same key can be compared per sequence (launch/sweeps/compare.py).
    result["per_sequence_file"] = os.path.basename(per_sequence_path(path))
    writer.write_array(result["per_sequence_file"], per_sequence)
  result["path"] = writer.write_json(os.path.basename(path), result)


def summary_line(r: dict) -> str:
  """One human line: the bound with its error bar, the protocol in brief, throughput."""
  head = f"step {r['step']} | {datasets.display_name(r['dataset'], r['split'])}"
  if "nats_per_token" not in r:
    return head + " | " + ", ".join(k for k in ("curves", "geometry") if k in r) + f" -> {r.get('path')}"
  p, thr = r["protocol"], r.get("throughput", {})
  parts = [head,
           f"{r['nats_per_token']:.4f} ± {r['stderr']:.4f} nats/token ({r['bits_per_token']:.4f} bits, "
           f"perplexity ≤ {r['perplexity_bound']:.2f}; 95% CI [{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}])",
           f"recon {r['recon']:.4f} diffusion {r['diffusion']:.4f} prior {r['prior']:.4g}",
           f"{r['num_sequences']} seqs x {p['seq_len']} tokens, K={r['num_times']}"
           + ("" if p["complete"] else f" (QUICK LOOK: {r['num_sequences']} of {p['num_sequences_available']} seqs)")]
  if "word_perplexity_bound" in r and p.get("word_level"):
    parts.append(f"word perplexity ≤ {r['word_perplexity_bound']:.2f}")
  if "ratio_to_unigram" in r:
    parts.append(f"unigram {r['unigram_nats_per_token']:.4f}")
  if thr:
    cost = ""
    if "ratio_to_selfcond_forward" in thr:
      cost = (f", {thr['ratio_to_selfcond_forward']:.1f}x a self-cond forward "
              f"(ideal {thr['ideal_ratio_to_selfcond_forward']})")
    parts.append(f"{thr['tokens_per_s']:.0f} tokens/s{cost}")
  return " | ".join(parts) + f" -> {r.get('path')}"


# ---- every new checkpoint.


def _listed_steps(workdir: str) -> list[int] | None:
  """Complete checkpoint steps now, or None while <workdir>/checkpoints does not exist yet."""
  if not paths.isdir(ckpt_lib.checkpoint_dir(workdir)):
    return None
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    return sorted(ckpt.all_steps())
  finally:
    ckpt.close()


def watch(workdir: str, *, dataset: str = "validation", overrides: dict[str, Any] | None = None,
          poll_seconds: float = 60.0, max_iterations: int | None = None, output_dir: str | None = None,
          analyses: tuple[str, ...] = ("bound",), timing: bool = True, sleep: Callable[[float], None] = time.sleep
          ) -> list[dict]:
  """Evaluates each checkpoint of `workdir` once, as it appears; polls every `poll_seconds` until Ctrl-C
  (or `max_iterations` polls). Steps whose results file already exists are skipped."""
  session = Session()
  ev = eval_section({}, overrides or {})
  done: set[int] = set()
  results = []
  polls = 0
  try:
    while max_iterations is None or polls < max_iterations:
      polls += 1
      steps = _listed_steps(workdir)
      if steps is None:
        logging.info("waiting for checkpoints at %s", ckpt_lib.checkpoint_dir(workdir))
      for step in sorted(set(steps or []) - done):
        done.add(step)
        path = result_path(workdir, step, dataset, ev["split"], output_dir, ev["max_batches"])
        results += _evaluate_new_step(workdir, step, path, dataset=dataset, overrides=overrides,
                                      output_dir=output_dir, analyses=analyses, timing=timing, session=session)
      if max_iterations is not None and polls >= max_iterations:
        break
      sleep(poll_seconds)
  except KeyboardInterrupt:
    logging.info("watch stopped after %d evaluation(s)", len(results))
  return results


def _evaluate_new_step(workdir: str, step: int, path: str, **kwargs) -> list[dict]:
  """[the results of `step`], or [] when its results file `path` exists or the step was removed meanwhile."""
  if paths.exists(path):
    logging.info("step %d already evaluated (%s)", step, path)
    return []
  try:
    return [evaluate_checkpoint(workdir, step=step, **kwargs)]
  except errors.CheckpointError as e:
    if step in (_listed_steps(workdir) or []):
      raise
    logging.warning("step %d was removed before it could be evaluated (%s)", step, e)
    return []
