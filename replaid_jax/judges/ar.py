"""An autoregressive baseline trained with this codebase (`objective = "ar"`) as a generative-perplexity judge.

Texts are retokenised with the judge checkpoint's own tokenizer and scored in
windows of the model's training length; each window's first token is
predicted from BOS alone, as at training (packed rows start with BOS).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from replaid_jax import errors
from replaid_jax import inference
from replaid_jax import objectives
from replaid_jax.eval import run as eval_run


class ARJudge:
  """Scores texts with the EMA parameters of an AR run's checkpoint (`WORKDIR` or `WORKDIR@STEP`)."""

  def __init__(self, spec: str, *, batch_size: int = 8):
    workdir, _, step = spec.partition("@")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    ckpt, step, meta = inference.open_checkpoint(workdir, int(step) if step else None)
    try:
      c = eval_run.checkpoint_config(meta)
      if not objectives.REGISTRY[c.objective].autoregressive:
        raise errors.ConfigError(f"sample.judge=ar:{spec} is a checkpoint of objective {c.objective!r}; an AR judge "
                                 "needs a run trained with --config.objective=ar.")
      self.tokenizer = inference.checkpoint_tokenizer(meta, workdir)
      if self.tokenizer is None:
        raise errors.ConfigError(f"the AR run at {workdir} was trained without a tokenizer (pre-tokenised data), so "
                                 "it cannot score text.")
      model = inference.build_model(c)
      self.params = inference.restore_params(ckpt, step, model)
    finally:
      ckpt.close()
    self.objective = objectives.make(c)
    self.window = c.data.seq_len
    self.batch_size = batch_size
    self.name = f"ar:{workdir}@{step}"

  @functools.partial(jax.jit, static_argnums=0)
  def _nll(self, params, tokens, mask):
    return jnp.sum(jnp.where(mask, self.objective.nll(params, tokens), 0.0), axis=-1)

  def __hash__(self):
    return id(self)

  def score(self, texts: list[str]) -> list[tuple[float, int]]:
    """(sum of token NLLs in nats, number of judge tokens) per text."""
    rows = []
    for i, text in enumerate(texts):
      ids = self.tokenizer.encode(text)
      rows.extend((i, ids[o:o + self.window]) for o in range(0, len(ids), self.window))
    totals = [[0.0, 0] for _ in texts]
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      tokens = np.zeros((self.batch_size, self.window), np.int32)
      mask = np.zeros((self.batch_size, self.window), bool)
      for r, (_, ids) in enumerate(chunk):
        tokens[r, :len(ids)] = ids
        mask[r, :len(ids)] = True
      nll = np.asarray(self._nll(self.params, tokens, mask), np.float64)
      for r, (i, ids) in enumerate(chunk):
        totals[i][0] += float(nll[r])
        totals[i][1] += len(ids)
    return [(a, b) for a, b in totals]
