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
from replaid_jax.judges import perplexity


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
    return perplexity.score_in_windows(texts, encode=self.tokenizer.encode, window=self.window,
                                       batch_size=self.batch_size, batch_nll=self._batch_nll)

  def _batch_nll(self, windows: list[list[int]]) -> np.ndarray:
    tokens = np.zeros((self.batch_size, self.window), np.int32)
    mask = np.zeros((self.batch_size, self.window), bool)
    for r, ids in enumerate(windows):
      tokens[r, :len(ids)] = ids
      mask[r, :len(ids)] = True
    return np.asarray(self._nll(self.params, tokens, mask))
