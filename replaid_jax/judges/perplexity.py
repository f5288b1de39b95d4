"""Generative perplexity: corpus-level exp(mean NLL) of samples under a judge AR model.

The samples are decoded to text and retokenised with the judge's own tokenizer, so
judges with different vocabularies score the same text. A judge is anything with a
`name` and `score(texts) -> [(sum of token NLLs in nats, token count)]`:

  gpt2:DIR   GPT-2 (small to XL) in JAX from a local Hugging Face directory (judges/gpt2.py)
  ar:DIR     an autoregressive baseline trained with this codebase (objective "ar"; DIR@STEP
             picks a checkpoint, the latest by default; judges/ar.py)
"""

import math
import os
from typing import Callable, Protocol

import numpy as np

from replaid_jax import errors

KINDS = ("gpt2", "ar")


class Judge(Protocol):
  name: str

  def score(self, texts: list[str]) -> list[tuple[float, int]]:
    """(sum of token NLLs in nats, number of judge tokens) per text."""
    ...


def score_in_windows(texts: list[str], *, encode: Callable[[str], list[int]], window: int, batch_size: int,
                     batch_nll: Callable[[list[list[int]]], np.ndarray]) -> list[tuple[float, int]]:
  """The scoring loop every judge shares: each text's tokens cut into windows of at most `window`, the windows
  of all texts scored `batch_size` at a time by `batch_nll` (a list of token lists -> the NLL sum of each, in
  nats; the judge pads them to its batch), and the sums gathered back per text as (NLL sum, token count)."""
  rows = []  # (text index, window tokens)
  for i, text in enumerate(texts):
    ids = encode(text)
    rows.extend((i, ids[o:o + window]) for o in range(0, len(ids), window))
  totals = [[0.0, 0] for _ in texts]
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    nll = np.asarray(batch_nll([ids for _, ids in chunk]), np.float64)
    for r, (i, ids) in enumerate(chunk):
      totals[i][0] += float(nll[r])
      totals[i][1] += len(ids)
  return [(a, b) for a, b in totals]


def load(spec: str, *, batch_size: int = 8) -> Judge:
  """A judge from its `sample.judge` spec: "gpt2:DIR" (or a bare DIR holding a GPT-2)."""
  kind, sep, target = spec.partition(":")
  if not sep or kind not in KINDS:
    if os.path.isdir(os.path.expanduser(spec)):
      kind, target = "gpt2", spec
    else:
      raise errors.ConfigError(f"sample.judge={spec!r} is neither KIND:PATH with KIND in {KINDS} nor a directory; "
                               "use e.g. gpt2:/path/to/gpt2 (a local Hugging Face directory) or ar:/path/to/ar_run.")
  if kind == "ar":
    from replaid_jax.judges import ar  # pylint: disable=g-import-not-at-top
    return ar.ARJudge(target, batch_size=batch_size)
  from replaid_jax.judges import gpt2  # pylint: disable=g-import-not-at-top
  return gpt2.GPT2Judge(target, batch_size=batch_size)


def generative_perplexity(judge: Judge, texts: list[str]) -> dict:
  """{"gen_ppl", "nll_per_token", "judge_tokens", "judge"} over all texts together."""
  scores = judge.score(list(texts))
  total = sum(s for s, _ in scores)
  count = sum(n for _, n in scores)
  if count == 0:
    raise errors.DataError("the samples decode to no judge tokens at all; generative perplexity is undefined.")
  return {"judge": judge.name, "gen_ppl": math.exp(total / count), "nll_per_token": total / count,
          "judge_tokens": count}
