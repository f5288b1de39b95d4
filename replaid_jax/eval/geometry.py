"""Embedding geometry (method.md 1.8): PCA spectrum of the unit-norm embedding matrix and nearest neighbours.

The paper reports a low-rank scree at d_e = 16 (about 6 components for 90% of
the variance) and neighbourhoods that group tokens by syntactic role.
"""

import math

import jax
import numpy as np

from replaid_jax import paths
from replaid_jax.models import embedding


def normalized_table(params: dict) -> np.ndarray:
  """E with unit-norm rows, float64 [V, d_e], as the model uses it."""
  return np.asarray(jax.device_get(embedding.normalized(params["embedding"])), np.float64)


def pca_spectrum(table_VE: np.ndarray, weights_V: np.ndarray | None = None) -> dict:
  """Explained-variance ratios of the (optionally weighted) centred rows, components for 90%, effective rank."""
  x = np.asarray(table_VE, np.float64)
  w = np.ones(x.shape[0]) if weights_V is None else np.asarray(weights_V, np.float64)
  w = w / w.sum()
  mean = w @ x
  cov = (x - mean).T @ ((x - mean) * w[:, None])
  eig = np.clip(np.linalg.eigvalsh(cov)[::-1], 0.0, None)
  ratio = eig / eig.sum() if eig.sum() > 0 else eig
  cum = np.cumsum(ratio)
  p = ratio[ratio > 0]
  return {
      "explained_variance_ratio": ratio.tolist(),
      "cumulative": cum.tolist(),
      "components_for_90pct": int(np.searchsorted(cum, 0.9 - 1e-12) + 1),
      "effective_rank": float(math.exp(-np.sum(p * np.log(p)))) if p.size else 0.0,
      "num_rows": int(np.count_nonzero(w)),
  }


def _piece(tokenizer, token_id: int) -> str:
  return tokenizer.id_to_piece(token_id) if tokenizer is not None else str(token_id)


def nearest_neighbours(table_VE: np.ndarray, query_ids: list[int], *, k: int = 8, tokenizer=None,
                       allowed_V: np.ndarray | None = None) -> list[dict]:
  """For each query token: its k nearest other tokens by cosine similarity (rows are unit-norm)."""
  x = np.asarray(table_VE, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  out = []
  for q in query_ids:
    sim = x @ x[q]
    sim[q] = -np.inf
    if allowed_V is not None:
      sim[~allowed_V] = -np.inf
    top = np.argsort(-sim)[:k]
    out.append({"id": int(q), "piece": _piece(tokenizer, q),
                "neighbours": [{"id": int(i), "piece": _piece(tokenizer, i), "cosine": float(sim[i])}
                               for i in top if np.isfinite(sim[i])]})
  return out


def analyse(params: dict, counts_V: np.ndarray | None, *, top_tokens: int = 20, k: int = 8, tokenizer=None) -> dict:
  """Spectrum over all rows and over the tokens seen in `counts_V` (frequency-weighted), and neighbours of the
  `top_tokens` most frequent tokens among the seen ones."""
  table = normalized_table(params)
  result = {"vocab_size": int(table.shape[0]), "embed_dim": int(table.shape[1]), "all_rows": pca_spectrum(table)}
  if counts_V is not None:
    counts = np.asarray(counts_V, np.float64)
    seen = counts > 0
    result["seen_rows"] = pca_spectrum(table[seen])
    result["frequency_weighted"] = pca_spectrum(table[seen], counts[seen])
    order = np.argsort(-counts)[:top_tokens]
    order = [int(i) for i in order if counts[i] > 0]
    result["neighbours"] = nearest_neighbours(table, order, k=k, tokenizer=tokenizer, allowed_V=seen)
    for row in result["neighbours"]:
      row["count"] = int(counts[row["id"]])
  return result


def save_scree(result: dict, path: str, title: str) -> str:
  """Bars of the explained-variance ratio, the cumulative curve and the 90% line."""
  plt = paths.pyplot()

  fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
  for key, colour in (("all_rows", "tab:blue"), ("frequency_weighted", "tab:orange")):
    if key not in result:
      continue
    spec = result[key]
    r = np.asarray(spec["explained_variance_ratio"])
    idx = np.arange(1, r.size + 1)
    ax.bar(idx + (0.2 if key != "all_rows" else -0.2), r, width=0.4, color=colour, alpha=0.6,
           label=f"{key.replace('_', ' ')}: {spec['components_for_90pct']} PCs for 90%")
    ax.plot(idx, spec["cumulative"], color=colour, marker=".")
  ax.axhline(0.9, color="gray", ls="--", lw=1)
  ax.set_xlabel("principal component")
  ax.set_ylabel("explained variance (bars), cumulative (lines)")
  ax.set_ylim(0, 1.02)
  ax.legend(fontsize=8, loc="center right")
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  paths.save_figure(fig, path)
  plt.close(fig)
  return path
