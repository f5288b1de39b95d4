"""Sample-quality figures that need no judge: unigram entropy and how well conditioning was met."""

import numpy as np


def unigram_entropy(tokens_L: np.ndarray) -> float:
  """Entropy (nats) of the empirical token distribution of one sample; low values flag repetition."""
  _, counts = np.unique(np.asarray(tokens_L).reshape(-1), return_counts=True)
  p = counts / counts.sum()
  return float(-np.sum(p * np.log(p)))


def target_stats(tokens_BL: np.ndarray, position_logp_BL: np.ndarray, target_BL: np.ndarray,
                 targeted_L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per sample: (mean log p of the target tokens under the final logits, fraction of targets hit)."""
  n = max(int(targeted_L.sum()), 1)
  logp = np.sum(np.where(targeted_L, position_logp_BL, 0.0), axis=-1) / n
  hits = np.sum((tokens_BL == target_BL) & targeted_L, axis=-1) / n
  return logp, hits
