"""Sampling from a trained run: the one place where sampling meets checkpoints, files and devices.

`sample_checkpoint(workdir, step=None, overrides={...})`:
  1. restores the EMA parameters of the checkpoint and its saved config (keys the
     code gained since are filled from replaid_jax/base_config.py; `overrides` replace keys of
     the `sample` section only);
  2. loads the checkpoint's tokenizer and checks it against the recorded sha256 and
     vocabulary, then tokenises the prompts and words (sample.prefix, ...);
  3. samples in batches sharded over the mesh's batch axes, with a progress line (replaid_jax/progress.py);
  4. writes <workdir>/samples/step<N>.jsonl, or step<N>_2.jsonl, ... when that exists, or
     --output (one row per sample: text, tokens, seed,
     sampler settings, checkpoint step, unigram entropy, conditioning figures) and
     <same name>.summary.json (means, generative perplexity if sample.judge is set, timing),
     prints the samples and adds them as TensorBoard text to <workdir>/train.
"""

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from replaid_jax import config_lib
from replaid_jax import errors
from replaid_jax import sharding as sharding_lib
from replaid_jax.data import tokenizer as tokenizer_lib
from replaid_jax.diffusion import sampler
from replaid_jax.judges import perplexity
from replaid_jax import inference
from replaid_jax import metrics as metrics_lib
from replaid_jax import objectives
from replaid_jax import paths
from replaid_jax import progress as progress_lib
from replaid_jax.sample import prompts
from replaid_jax.sample import quality


def resolve_config(saved: dict, overrides: dict[str, Any] | None = None,
                   vocab_size: int | None = None) -> tuple[config_lib.Config, list[str]]:
  """The saved config with keys it lacks taken from replaid_jax/base_config.py, and `sample` overrides applied.

  Returns (config, the keys filled from the base config).
  """
  return inference.saved_config(saved, vocab_size, section="sample", overrides=overrides)


class ProgressBar:
  """The progress line (replaid_jax/progress.py) over the sampler steps of all batches, redrawn in place on
  stderr and fed from the device by the sampler loop. Its rate and ETA count from the first report, which comes
  after the compilation."""

  def __init__(self, num_batches: int, steps: int, enabled: bool = True, clock=time.monotonic):
    self.num_batches, self.steps, self.enabled = num_batches, steps, enabled
    self.batch, self.width = 0, 0
    self.progress = progress_lib.Progress(num_batches * steps, unit="steps", label="sampling", clock=clock)

  def _show(self, text: str, end: str = "") -> None:
    sys.stderr.write("\r" + text.ljust(self.width) + end)
    sys.stderr.flush()
    self.width = 0 if end else len(text)

  def begin(self, batch: int) -> None:
    self.batch = batch
    if self.enabled and batch == 0:
      self._show(f"{self.progress.line()} (batch 1/{self.num_batches})")

  def __call__(self, done, total) -> None:
    if not self.enabled:
      return
    done, total = int(done), int(total)
    self.progress.update(self.batch * self.steps + done * self.steps // max(total, 1))
    last = done == total and self.batch + 1 == self.num_batches
    self._show(f"{self.progress.line()} (batch {self.batch + 1}/{self.num_batches})", "\n" if last else "")


def _time_forward(denoiser, params, batch: int, seq_len: int, embed_dim: int, gamma: float, shard) -> float:
  """Seconds of one self-conditioned forward pass of the denoiser at this batch (mean over repeats)."""
  fwd = jax.jit(lambda p, z, g, x: denoiser(p, z, g, x, t=g)[1])  # t's value does not change the cost
  k1, k2 = jax.random.split(jax.random.key(0))
  z = jax.device_put(jax.random.normal(k1, (batch, seq_len, embed_dim)), shard)
  x_sc = jax.device_put(0.1 * jax.random.normal(k2, (batch, seq_len, embed_dim)), shard)
  g = jnp.full((batch,), gamma, jnp.float32)
  fwd(params, z, g, x_sc).block_until_ready()
  reps, t0 = 0, time.time()
  while reps < 5 or (time.time() - t0 < 2.0 and reps < 200):
    fwd(params, z, g, x_sc).block_until_ready()
    reps += 1
  return (time.time() - t0) / reps


def batch_size(requested: int, num_samples: int, divisor: int) -> int:
  """The sampling batch: a multiple of the devices it is split over, no larger than the samples need."""
  round_up = lambda n: -(-n // divisor) * divisor
  return min(round_up(requested), round_up(num_samples))


def output_path(workdir: str, step: int, output: str | None = None) -> str:
  """Where a sampling run writes: `output` (which must not exist), else the first free name of
  <workdir>/samples/step<N>.jsonl, step<N>_2.jsonl, step<N>_3.jsonl, ... (earlier samples are never overwritten)."""
  if output:
    path = paths.absolute(output)
    if not path.endswith(".jsonl"):
      raise errors.ConfigError(f"--output={output} must name a .jsonl file.")
    if paths.exists(path):
      raise errors.ConfigError(f"--output={output} exists; pass a new file name (samples are never overwritten).")
    return path
  folder = paths.join(workdir, "samples")
  n = 1
  while True:
    path = paths.join(folder, f"step{step}{'' if n == 1 else f'_{n}'}.jsonl")
    if not paths.exists(path) and not paths.exists(path[:-len(".jsonl")] + ".summary.json"):
      return path
    n += 1


@dataclasses.dataclass
class _Sampling:
  """A sampling run, restored and checked: what the steps after `_restore` read."""

  workdir: str
  step: int
  c: config_lib.Config
  objective: objectives.Objective
  params: dict
  mesh: Any
  tok: Any  # the checkpoint's tokenizer, or None for token-id data
  layout: prompts.Layout
  seq_len: int

  @property
  def s(self):
    return self.c.sample


def sample_checkpoint(workdir: str, *, step: int | None = None, overrides: dict[str, Any] | None = None,
                      benchmark: bool = False, output: str | None = None) -> dict:
  """Generates samples from a run's checkpoint; returns the summary (also written next to the samples).

  The samples go to `output_path(workdir, step, output)`, the summary next to them (<name>.summary.json).
  Every objective samples through `Objective.batch_sampler`: RePlaid's guided sampler, the baselines' own.
  """
  workdir = paths.absolute(workdir)
  if output:
    output_path(workdir, 0, output)  # fail before any work
  run = _restore(workdir, step, overrides)
  if benchmark and not run.objective.learned_embeddings:
    raise errors.ConfigError("--benchmark compares RePlaid sampler steps with forward passes; this checkpoint's "
                             f"objective is {run.c.objective!r}.")
  tokens_out, timing, sample_batch = _generate_all(run)
  if benchmark:
    timing.update(_benchmark(run, sample_batch, timing["batch_size"]))
  rows, summary = _records(run, tokens_out, timing)
  if run.s.judge:
    summary["generative_perplexity"] = _judge(run, [r["text"] for r in rows])
  if jax.process_index() == 0:
    _write(run, tokens_out["tokens"], rows, summary, output)
  return summary


def _restore(workdir: str, step: int | None, overrides: dict[str, Any] | None) -> _Sampling:
  """Opens the checkpoint, resolves its config, checks the prompt against the model and restores the EMA params."""
  ck, step, meta = inference.open_checkpoint(workdir, step)
  try:
    c, filled = resolve_config(meta.get("config") or {}, overrides, meta.get("vocab_size"))
    if filled:
      logging.info("the saved config lacks %s; taken from replaid_jax/base_config.py", ", ".join(filled))
    seq_len = c.sample.seq_len or c.data.seq_len
    if seq_len > c.model.max_seq_len:
      raise errors.ConfigError(f"sample.seq_len={seq_len} exceeds the model's max_seq_len={c.model.max_seq_len}; "
                               "lower sample.seq_len.")
    tok = inference.checkpoint_tokenizer(meta, workdir, c.sample.tokenizer_path)
    layout = prompts.build(tok, c.sample, seq_len, max_seq_len=c.model.max_seq_len)
    objective = objectives.make(c)
    objective.check_prompt(c.sample, has_suffix=layout.suffix_start >= 0)
    model = inference.build_model(c)
    params = inference.restore_params(ck, step, model)
  finally:
    ck.close()
  logging.info("restored the EMA parameters of step %d from %s", step, workdir)
  return _Sampling(workdir, step, c, objective, params, model.mesh, tok, layout, seq_len)


def _generate_all(run: _Sampling) -> tuple[dict[str, np.ndarray], dict, Any]:
  """Samples every batch; returns (host arrays over all samples, timing, the function that samples batch b)."""
  s, c = run.s, run.c
  divisor = sharding_lib.batch_divisor(run.mesh, c.mesh.rules)
  batch = batch_size(s.batch_size, s.num_samples, divisor)
  if batch != s.batch_size:
    logging.info("sampling in batches of %d (sample.batch_size=%d; a multiple of the %d devices the batch is split "
                 "over, and no larger than sample.num_samples needs)", batch, s.batch_size, divisor)
  shard = lambda ndim: sharding_lib.batch_sharding(run.mesh, c.mesh.rules, ndim)
  put = lambda x: jax.device_put(x, shard(x.ndim))
  num_batches = math.ceil(s.num_samples / batch)
  bar = ProgressBar(num_batches, s.steps,
                    enabled=s.progress and jax.process_index() == 0 and run.objective.reports_sampler_steps)
  key = jax.random.key(s.seed)
  cond = jax.tree.map(put, run.layout.batch(batch))
  known = put(np.broadcast_to(run.layout.tokens, (batch, run.seq_len)))  # 0 where untargeted
  known_mask = put(np.broadcast_to(run.layout.targeted, (batch, run.seq_len)))
  draw = run.objective.batch_sampler(run.params, s)

  def sample_batch(b: int) -> dict:
    ids = put(np.arange(b * batch, (b + 1) * batch, dtype=np.int32))
    request = objectives.SampleRequest(index=b, sample_ids=ids, seq_len=run.seq_len, cond=cond, known_BL=known,
                                       known_mask_BL=known_mask, batch_sharding=shard(3), progress=bar)
    out = draw(key, request)
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), out)

  t0, outs, batch_seconds = time.time(), [], []
  for b in range(num_batches):
    bar.begin(b)
    tb = time.time()
    outs.append(sample_batch(b))
    batch_seconds.append(time.time() - tb)
  bar.enabled = False
  out = {k: np.concatenate([o[k] for o in outs])[:s.num_samples] for k in outs[0]}
  return out, {"seconds": time.time() - t0, "batch_seconds": batch_seconds, "batch_size": batch}, sample_batch


def _benchmark(run: _Sampling, sample_batch, batch: int) -> dict:
  """Seconds per sampler step (batch 0 again, compiled) against one self-conditioned forward pass."""
  s = run.s
  tb = time.time()
  jax.block_until_ready(sample_batch(0))
  sample_s = time.time() - tb
  host = jax.device_get({"schedule": run.params["schedule"], "bounds": run.params["bounds"]})
  gammas = sampler.schedule_grid(host, s.steps, run.c.diffusion.schedule, s.time_grid)[1]
  shard = sharding_lib.batch_sharding(run.mesh, run.c.mesh.rules, 3)
  fwd_s = _time_forward(run.objective.denoiser(), run.params, batch, run.seq_len, run.c.model.embed_dim,
                        float(gammas[len(gammas) // 2]), shard)
  logging.info("speed at batch %d: %.3f ms per sampler step (%d steps, compiled, final decode included) vs "
               "%.3f ms per self-conditioned forward pass: ratio %.3f", batch, 1e3 * sample_s / s.steps, s.steps,
               1e3 * fwd_s, sample_s / s.steps / fwd_s)
  return {"sampler_seconds_per_step": sample_s / s.steps, "forward_seconds": fwd_s,
          "step_over_forward": sample_s / s.steps / fwd_s, "device": jax.devices()[0].device_kind}


def _records(run: _Sampling, out: dict[str, np.ndarray], timing: dict) -> tuple[list[dict], dict]:
  """One JSON row per sample and the run's summary (means, conditioning figures, timing)."""
  s, layout, tokens = run.s, run.layout, out["tokens"]
  texts = [run.tok.decode(row) if run.tok is not None else None for row in tokens]
  entropy = np.asarray([quality.unigram_entropy(row) for row in tokens])
  summary = {"checkpoint_step": run.step, "workdir": run.workdir, "num_samples": s.num_samples, "seed": s.seed,
             "objective": run.c.objective, "sampler": run.objective.sampler_record(s, run.seq_len),
             "unigram_entropy_mean": float(entropy.mean()), "timing": timing}
  per_row = [{} for _ in tokens]
  if layout.targeted.any() and "position_logp" in out:
    logp, hits = quality.target_stats(tokens, out["position_logp"], np.broadcast_to(layout.tokens, tokens.shape),
                                      layout.targeted)
    summary.update({"target_positions": int(layout.targeted.sum()), "target_logp_mean": float(logp.mean()),
                    "target_match_rate": float(hits.mean())})
    for i, r in enumerate(per_row):
      r.update({"target_logp": float(logp[i]), "target_match": float(hits[i])})
  if layout.span_names and "span_logp" in out:
    present = np.asarray([prompts.span_present(row, layout) for row in tokens], bool).reshape(len(tokens), -1)
    summary["spans"] = {name: {"present_rate": float(present[:, k].mean()),
                               "logp_mean": float(out["span_logp"][:, k].mean())}
                        for k, name in enumerate(layout.span_names)}
    for i, r in enumerate(per_row):
      r["spans"] = {name: {"present": bool(present[i, k]), "logp": float(out["span_logp"][i, k])}
                    for k, name in enumerate(layout.span_names)}
  rows = [{"index": i, "seed": s.seed, "checkpoint_step": run.step, "text": texts[i], "tokens": row.tolist(),
           "unigram_entropy": float(entropy[i]), "sampler": summary["sampler"], **per_row[i]}
          for i, row in enumerate(tokens)]
  return rows, summary


def _judge(run: _Sampling, texts: list[str | None]) -> dict:
  """Generative perplexity of the samples under the `sample.judge` language model."""
  if run.tok is None:
    raise errors.ConfigError("sample.judge needs text, but this checkpoint has no tokenizer to decode samples.")
  judge = perplexity.load(run.s.judge, batch_size=run.s.judge_batch_size)
  out = perplexity.generative_perplexity(judge, texts)
  logging.info("generative perplexity under %s: %.2f (%d judge tokens)", judge.name, out["gen_ppl"],
               out["judge_tokens"])
  return out


def _write(run: _Sampling, tokens: np.ndarray, rows: list[dict], summary: dict, output: str | None) -> None:
  """The samples' JSONL and summary JSON (atomically, never over earlier ones), the console and TensorBoard."""
  path = output_path(run.workdir, run.step, output)
  paths.makedirs(os.path.dirname(path))
  paths.write_text_atomic(path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in rows))
  summary["samples_file"] = path
  paths.write_text_atomic(path[:-len(".jsonl")] + ".summary.json", json.dumps(summary, indent=2, ensure_ascii=False))
  shown = [tokenizer_lib.display_text(run.tok, row) if run.tok is not None else " ".join(map(str, row.tolist()))
           for row in tokens]
  _print(rows, shown, summary, run.s.print_samples)
  write_tensorboard(run.workdir, run.step, path, shown, summary)


def write_tensorboard(workdir: str, step: int, path: str, shown_text: list[str], summary: dict) -> None:
  """The samples as TensorBoard text in the run's <workdir>/train, beside the training-time samples: tags
  `sampled/<file name>/<index>` at the checkpoint's step, each with its settings."""
  stem = os.path.basename(path)[:-len(".jsonl")]
  st = summary["sampler"]
  head = (f"{st['sampler']}, {st['steps']} steps ({st['time_grid']} grid), score_temp {st['score_temp']}, "
          f"seed {summary['seed']}")
  writer = metrics_lib.MetricWriter(paths.join(workdir, "train"))
  try:
    for i, text in enumerate(shown_text):
      writer.write_text(f"sampled/{stem}/{i}", f"{head}, noise stream {i}\n\n{text}", step)
  finally:
    writer.close()
  logging.info("samples also in TensorBoard (text tab, sampled/%s): tensorboard --logdir %s", stem,
               paths.join(workdir, "train"))


def _print(rows: list[dict], shown_text: list[str], summary: dict, limit: int) -> None:
  """Prints the samples (as `Tokenizer.display` shows them: control characters and stray bytes escaped; the JSONL
  keeps the exact text) and a summary."""
  shown = rows if limit < 0 else rows[:limit]
  for rec in shown:
    head = (f"sample {rec['index'] + 1} of {len(rows)} (noise stream {rec['index']}, unigram entropy "
            f"{rec['unigram_entropy']:.2f} nats)")
    print(f"{'=' * 8} {head} {'=' * 8}")
    print(shown_text[rec["index"]])
  st = summary["sampler"]
  lines = [f"{summary['num_samples']} samples (seed {summary['seed']}) from step {summary['checkpoint_step']}: "
           f"{st['sampler']}, {st['steps']} steps ({st['time_grid']} grid), score_temp {st['score_temp']}, "
           f"seq_len {st['seq_len']}, {summary['timing']['seconds']:.1f}s",
           f"mean unigram entropy {summary['unigram_entropy_mean']:.3f} nats"]
  if "target_logp_mean" in summary:
    how = st["condition"] + (f", w={st['guidance_weight']}" if st["condition"] != "clamp" else "")
    lines.append(f"conditioning ({how}): mean log p of the "
                 f"{summary['target_positions']} target tokens {summary['target_logp_mean']:.3f}, "
                 f"match rate {summary['target_match_rate']:.3f}")
  for name, v in summary.get("spans", {}).items():
    lines.append(f"{name}: present in {100 * v['present_rate']:.0f}% of samples, mean log p {v['logp_mean']:.3f}")
  if "generative_perplexity" in summary:
    g = summary["generative_perplexity"]
    lines.append(f"generative perplexity {g['gen_ppl']:.2f} under {g['judge']} ({g['judge_tokens']} tokens)")
  lines.append(f"wrote {summary['samples_file']}")
  print("\n".join(lines))
  sys.stdout.flush()

