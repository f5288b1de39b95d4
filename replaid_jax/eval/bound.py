"""The likelihood bound over a whole split, with its standard error.

Every sequence gets its own unbiased NELBO estimate (for RePlaid a t = 0 pass,
K lattice times and the prior, self-conditioning on every pass; for masked
diffusion K lattice times; for the AR model the exact NLL), so the spread
across sequences gives an honest standard error of the split's mean bound.
"""

import functools
import math
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np



def make_bound_fn(objective, *, num_times: int, params_sharding=None, batch_sharding=None):
  """A jitted (params, tokens [B, L], key) -> per-sequence Terms of `objective` (replaid_jax.objectives)."""
  fn = functools.partial(objective.sequence_bound, num_times=num_times)
  if params_sharding is None:
    return jax.jit(fn)
  return jax.jit(fn, in_shardings=(params_sharding, batch_sharding, None))


def padded_batches(tokens: np.ndarray, batch_size: int, num_batches: int | None = None
                   ) -> Iterator[tuple[int, np.ndarray, int]]:
  """(index b, batch [batch_size, L], valid rows) over the rows of `tokens` [N, L], the first `num_batches`
  batches (default: all). A last partial batch is padded with copies of its first row, so that every batch has
  one shape (one compile); the caller keeps the first `valid` rows of each result, so every row counts once."""
  total = math.ceil(tokens.shape[0] / batch_size)
  for b in range(total if num_batches is None else min(num_batches, total)):
    chunk = tokens[b * batch_size:(b + 1) * batch_size]
    valid = chunk.shape[0]
    if valid < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - valid, axis=0)], axis=0)
    yield b, chunk, valid


def evaluate(bound_fn, params, tokens: np.ndarray, key: jax.Array, *, batch_size: int, max_batches: int = 0,
             put=None, progress=None) -> dict:
  """Mean bound (nats/token) over the rows of `tokens` [N, L] with its standard error.

  Batches come from `padded_batches` (every row counts exactly once). `put`
  places a host batch on the devices (default: jnp.asarray).
  """
  put = put or jnp.asarray
  num_batches = math.ceil(tokens.shape[0] / batch_size)
  if max_batches:
    num_batches = min(num_batches, max_batches)
  rows = {"recon": [], "diffusion": [], "prior": []}
  for b, chunk, valid in padded_batches(tokens, batch_size, num_batches):
    terms = jax.device_get(bound_fn(params, put(chunk), jax.random.fold_in(key, b)))
    for name in rows:
      rows[name].append(np.asarray(getattr(terms, name), np.float64)[:valid])
    if progress is not None:
      progress(b + 1, num_batches)
  per = {k: np.concatenate(v) for k, v in rows.items()}
  total = per["recon"] + per["diffusion"] + per["prior"]
  m = total.shape[0]
  se = float(total.std(ddof=1) / math.sqrt(m)) if m > 1 else float("nan")
  mean = float(total.mean())
  return {
      "nats_per_token": mean,
      "stderr": se,
      "ci95": [mean - 1.96 * se, mean + 1.96 * se],
      "bits_per_token": mean / math.log(2),
      "perplexity_bound": math.exp(mean),
      "recon": float(per["recon"].mean()),
      "diffusion": float(per["diffusion"].mean()),
      "prior": float(per["prior"].mean()),
      "num_sequences": int(m),
      "num_tokens": int(m * tokens.shape[1]),
      "num_times": None,
  }


def log_unigram(train_counts: np.ndarray) -> np.ndarray:
  """Log-probabilities (float64) of the add-one smoothed unigram distribution of the training counts."""
  counts = np.asarray(train_counts, np.float64) + 1.0
  return np.log(counts / counts.sum())


def unigram_cross_entropy(train_counts: np.ndarray, eval_tokens: np.ndarray) -> float:
  """Nats/token of eval_tokens under the unigram distribution of the training counts (add-one smoothed)."""
  return float(-log_unigram(train_counts)[np.asarray(eval_tokens).reshape(-1)].mean())
