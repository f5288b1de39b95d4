"""The analyses of `run.evaluate_checkpoint` (run.ANALYSES): what each computes on one checkpoint and writes.

  bound     the likelihood bound per sequence (bound.py) with per-term standard errors, the protocol it was
            computed under, word-level and unigram reference figures, and its throughput: tokens/s, analytic
            FLOP/s and, with `timing`, its cost in measured forward passes of one batch;
  curves    information-loss curves on a grid of noise levels (curves.py), written to
            <output_dir>/curves_<dataset>_<split>_step<N>.json and .png;
  geometry  the PCA spectrum and neighbourhoods of the embedding table (geometry.py), written to
            <output_dir>/geometry_step<N>.json and .png.

Each returns the keys it adds to the results file. Compiled functions are kept in the evaluation's cache
(`cache(key, make)`, run.Session.fn), so that the checkpoints of one run share them.
"""

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from replaid_jax import config_lib
from replaid_jax import flops as flops_lib
from replaid_jax import inference
from replaid_jax import objectives
from replaid_jax import paths
from replaid_jax import progress as progress_lib
from replaid_jax.eval import bound as bound_lib
from replaid_jax.eval import curves as curves_lib
from replaid_jax.eval import datasets
from replaid_jax.eval import geometry as geometry_lib

Cache = Callable[[tuple, Callable[[], Any]], Any]  # (key, make) -> the cached make()
_EVAL_SALT = 2**31 - 3  # the eval key is fold_in(key(seed), salt): the same for every checkpoint of a run


def eval_key(c: config_lib.Config) -> jax.Array:
  """The key of every analysis of a checkpoint of this run: fold_in(key(seed), salt)."""
  return jax.random.fold_in(jax.random.key(c.seed), _EVAL_SALT)


class ProgressLog:
  """Logs the progress line (replaid_jax/progress.py) at most every `every` seconds, at the first and the last
  unit; the rate and ETA count from the end of the first unit, which carries the compilation."""

  def __init__(self, label: str, tokens_per_unit: int, unit: str = "batches", every: float = 10.0,
               clock=time.monotonic):
    self.label, self.tokens_per_unit, self.unit, self.every, self.clock = label, tokens_per_unit, unit, every, clock
    self.progress: progress_lib.Progress | None = None
    self.last = clock()

  def __call__(self, done: int, total: int) -> None:
    if self.progress is None:
      self.progress = progress_lib.Progress(total, unit=self.unit, label=self.label, start=done - 1, clock=self.clock)
    now = self.clock()
    self.progress.update(done, now)
    if done < total and now - self.last < self.every and done != 1:
      return
    self.last = now
    rate = self.progress.rate()
    tokens = f", {rate * self.tokens_per_unit:,.0f} tokens/s" if rate and self.tokens_per_unit else ""
    logging.info("%s%s", self.progress.line(now=now), tokens)


def _forward_fn(c: config_lib.Config, model: inference.Model, *, selfcond: bool):
  return curves_lib.make_terms_fn(model_cfg=c.model, cfg=c.diffusion, params_sharding=model.params_sharding,
                                  batch_sharding=model.batch_sharding, selfcond=selfcond)


def _run_key(c: config_lib.Config) -> str:
  """What the compiled functions of a checkpoint depend on: its config without the eval section."""
  return repr(dataclasses.replace(c, eval=None))


# ---- the bound.


def bound_report(bound_fn: Callable, params, tokens: np.ndarray, key: jax.Array, *, batch_size: int,
                 max_batches: int = 0, put=None, progress=None) -> tuple[dict, dict[str, np.ndarray]]:
  """`bound.evaluate` plus the per-sequence terms: (summary with per-term standard errors, {term: [N] array})."""
  outputs = []

  def recording(p, x, k):
    out = bound_fn(p, x, k)
    outputs.append(out)
    return out

  res = bound_lib.evaluate(recording, params, tokens, key, batch_size=batch_size, max_batches=max_batches,
                           put=put, progress=progress)
  m = res["num_sequences"]
  per = {name: np.concatenate([np.asarray(jax.device_get(getattr(o, name)), np.float64) for o in outputs])[:m]
         for name in ("recon", "diffusion", "prior")}
  per["total"] = per["recon"] + per["diffusion"] + per["prior"]
  se = lambda v: float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
  res["stderr_terms"] = {name: se(per[name]) for name in ("recon", "diffusion", "prior")}
  res["stderr_bits"] = res["stderr"] / math.log(2)
  res["ci95_bits"] = [x / math.log(2) for x in res["ci95"]]
  res["perplexity_ci95"] = [math.exp(x) for x in res["ci95"]]
  return res, per


def bound(cache: Cache, c: config_lib.Config, model: inference.Model, params, evalset: datasets.EvalSet, key, put,
          label: str, timing: bool) -> dict:
  """The bound of `evalset` with its protocol, reference figures and throughput: the keys of the results file."""
  k, b, seq_len = c.eval.final_num_times, c.eval.batch_size, evalset.tokens.shape[1]
  t0 = time.time()
  compiled = cache((_run_key(c), "bound", k, b, seq_len), functools.partial(_compile_bound, c, model, key, seq_len))
  compile_s = time.time() - t0
  t0 = time.time()
  res, per = bound_report(compiled, params, evalset.tokens, key, batch_size=b, max_batches=c.eval.max_batches,
                          put=put, progress=ProgressLog(f"bound {label}", b * seq_len))
  res["per_sequence"] = per["total"]  # written next to the JSON by run.evaluate_checkpoint
  seconds = time.time() - t0
  res["num_times"] = k
  objective = objectives.make(c)
  protocol = _bound_protocol(c, objective, evalset, res)
  _add_reference_figures(res, protocol, evalset)
  res["throughput"] = _throughput(cache, c, model, params, objective, evalset, key, put, res,
                                   seconds=seconds, compile_s=compile_s, timing=timing)
  res["protocol"] = protocol
  return res


def _compile_bound(c: config_lib.Config, model: inference.Model, key: jax.Array, seq_len: int):
  """The bound with eval.final_num_times lattice times, compiled for one batch of [eval.batch_size, seq_len]."""
  fn = bound_lib.make_bound_fn(objectives.make(c), num_times=c.eval.final_num_times,
                               params_sharding=model.params_sharding, batch_sharding=model.batch_sharding)
  batch = jax.ShapeDtypeStruct((c.eval.batch_size, seq_len), jnp.int32, sharding=model.batch_sharding)
  return fn.lower(model.abstract_params, batch, key).compile()


def _bound_protocol(c: config_lib.Config, objective, evalset: datasets.EvalSet, res: dict) -> dict:
  """How the bound `res` was computed: the set's protocol, the objective's estimator, the batches, key and tokens."""
  n = evalset.tokens.shape[0]
  protocol = dict(evalset.protocol)
  protocol.update({"objective": c.objective, **objective.bound_protocol(c.eval.final_num_times)})
  protocol.update({
      "batch_size": c.eval.batch_size, "seed": c.seed, "key": f"fold_in(key(seed), {_EVAL_SALT})",
      "num_sequences_available": n, "num_sequences": res["num_sequences"], "num_tokens": res["num_tokens"],
      "max_batches": c.eval.max_batches, "complete": res["num_sequences"] == n,
      "tokens_sha256": hashlib.sha256(np.ascontiguousarray(evalset.tokens[:res["num_sequences"]],
                                                           np.int32).tobytes()).hexdigest(),
  })
  return protocol


def _add_reference_figures(res: dict, protocol: dict, evalset: datasets.EvalSet) -> None:
  """Adds to `res` the word-level perplexity bound of a word-counted set and the unigram cross-entropy of the
  run's own splits."""
  if protocol.get("words_per_token"):
    res["word_perplexity_bound"] = math.exp(res["nats_per_token"] / protocol["words_per_token"])
  if evalset.unigram_counts is not None:
    res["unigram_nats_per_token"] = bound_lib.unigram_cross_entropy(evalset.unigram_counts,
                                                                   evalset.tokens[:res["num_sequences"]])
    res["ratio_to_unigram"] = res["nats_per_token"] / res["unigram_nats_per_token"]


# ---- throughput.


def _seconds_per_call(fn, *args, reps: int = 3) -> float:
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - t0) / reps


def _throughput(cache: Cache, c: config_lib.Config, model: inference.Model, params, objective, evalset, key, put,
                res: dict, *, seconds: float, compile_s: float, timing: bool) -> dict:
  """The throughput of the bound `res` that took `seconds` (and `compile_s` to compile): tokens/s, the analytic
  FLOPs of its forward passes and, with `timing`, its cost against one measured forward pass of a batch."""
  k, b, seq_len = c.eval.final_num_times, c.eval.batch_size, evalset.tokens.shape[1]
  total_batches = math.ceil(evalset.tokens.shape[0] / b)
  batches = min(total_batches, c.eval.max_batches) if c.eval.max_batches else total_batches
  fwd_flops = flops_lib.forward_flops_per_sequence(
      seq_len=seq_len, width=c.model.width, num_layers=c.model.num_layers, vocab_size=c.model.vocab_size,
      embed_dim=c.model.embed_dim, mlp_ratio=c.model.mlp_ratio, output_prior=c.diffusion.output_prior,
      token_input=objective.token_input)
  # Forward passes per sequence: RePlaid 2 (K + 1) (self-conditioned passes), discrete diffusion K, AR 1.
  passes = objective.forward_passes(k)
  thr = {"seconds": seconds, "compile_seconds": compile_s, "batches": batches, "seconds_per_batch": seconds / batches,
         "tokens_per_s": res["num_tokens"] / seconds, "sequences_per_s": res["num_sequences"] / seconds,
         "analytic_flops_per_token": passes * fwd_flops / seq_len,
         "flops_per_s": passes * fwd_flops * res["num_sequences"] / seconds, "ideal_ratio_to_forward": passes}
  if objective.self_conditions:
    thr["ideal_ratio_to_selfcond_forward"] = k + 1
  if timing:
    thr.update(_forward_timing(cache, c, model, params, objective, evalset, key, put, thr["seconds_per_batch"]))
  return thr


def _forward_timing(cache: Cache, c: config_lib.Config, model: inference.Model, params, objective, evalset, key,
                    put, seconds_per_batch: float) -> dict:
  """Seconds per forward pass of one eval batch, and the bound's `seconds_per_batch` as a multiple of it (for a
  self-conditioned objective also of one self-conditioned forward pass)."""
  b, seq_len, n = c.eval.batch_size, evalset.tokens.shape[1], evalset.tokens.shape[0]
  batch = put(evalset.tokens[:b] if n >= b else np.resize(evalset.tokens, (b, seq_len)))
  out = {}
  if not objective.self_conditions:
    fn = cache((_run_key(c), "forward", b, seq_len), lambda: jax.jit(objective.forward))
    out["forward_seconds_per_batch"] = _seconds_per_call(fn, params, batch)
    out["ratio_to_forward"] = seconds_per_batch / out["forward_seconds_per_batch"]
    return out
  t_b = jnp.full((b,), 0.5, jnp.float32)
  for name, sc in (("forward", False), ("selfcond_forward", True)):
    fn = cache((_run_key(c), name, b, seq_len), functools.partial(_forward_fn, c, model, selfcond=sc))
    out[f"{name}_seconds_per_batch"] = _seconds_per_call(fn, params, batch, t_b, key)
  out["ratio_to_forward"] = seconds_per_batch / out["forward_seconds_per_batch"]
  out["ratio_to_selfcond_forward"] = seconds_per_batch / out["selfcond_forward_seconds_per_batch"]
  return out


# ---- curves and geometry.


def curves(cache: Cache, c: config_lib.Config, model: inference.Model, params, evalset, key, put, label: str,
           out_dir: str, step: int) -> dict:
  """Information-loss curves on the first eval.curve_max_sequences rows, with their summary; process 0 writes
  them to <out_dir>/curves_<dataset>_<split>_step<N>.json and their plot to the .png beside it."""
  b, seq_len = c.eval.batch_size, evalset.tokens.shape[1]
  tokens = evalset.tokens[:c.eval.curve_max_sequences]
  fn = cache((_run_key(c), "curves", b, seq_len), functools.partial(_forward_fn, c, model, selfcond=True))
  t0 = time.time()
  result = curves_lib.compute(fn, params, tokens, jax.random.fold_in(key, 1), num_points=c.eval.curve_points,
                              batch_size=b, put=put,
                              progress=ProgressLog(f"curves {label}", tokens.size, unit="grid points"))
  summary = curves_lib.summarise(result)
  stem = f"curves_{evalset.name}_{evalset.split}_step{step}"
  out = {**result, "summary": summary, "seconds": time.time() - t0, "json": os.path.join(out_dir, stem + ".json")}
  if jax.process_index() == 0:
    paths.makedirs(out_dir)
    out["png"] = curves_lib.save_plot(result, summary, os.path.join(out_dir, stem + ".png"),
                                      f"information loss, {datasets.display_name(evalset.name, evalset.split)}, "
                                      f"step {step}")
    with paths.open_file(out["json"], "w") as f:
      json.dump(out, f, indent=2)
  logging.info("curves %s: CE(t) linear R^2 = %.4f, CV of l(t) = %.3f, integral of l(t) = %.4f", label,
               summary["ce_linear_fit"]["r2"], summary["diffusion_cv"], summary["diffusion_integral_trapezoid"])
  return out


def geometry(c: config_lib.Config, params, evalset, tok, out_dir: str, step: int) -> dict:
  """The embedding geometry, with token frequencies counted on `evalset`; process 0 writes it to
  <out_dir>/geometry_step<N>.json and its scree plot to the .png beside it."""
  counts = np.bincount(evalset.tokens.reshape(-1), minlength=c.model.vocab_size)
  result = geometry_lib.analyse(jax.device_get(params), counts, top_tokens=c.eval.geometry_top_tokens,
                                tokenizer=tok)
  result["counts_from"] = f"{evalset.name}/{evalset.split}"
  stem = f"geometry_step{step}"
  result["json"] = os.path.join(out_dir, stem + ".json")
  if jax.process_index() == 0:
    paths.makedirs(out_dir)
    result["png"] = geometry_lib.save_scree(result, os.path.join(out_dir, stem + ".png"),
                                            f"embedding PCA, step {step} (d_e={result['embed_dim']})")
    with paths.open_file(result["json"], "w") as f:
      json.dump(result, f, indent=2)
  logging.info("geometry step %d: %d of %d components hold 90%% of the variance (all rows; %s frequency-weighted)",
               step, result["all_rows"]["components_for_90pct"], result["embed_dim"],
               result.get("frequency_weighted", {}).get("components_for_90pct", "-"))
  return result
