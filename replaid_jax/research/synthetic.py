"""Synthetic token sources with an exactly known entropy, for testing how fast objectives learn structure.

A source is an order-k Markov chain over V tokens whose every context allows
only `successors` next tokens (its sparsity), with Dirichlet(`concentration`)
probabilities over them. Order 1 needs one token of context; order 2 needs two,
so a model must combine neighbours to reach the entropy. `sequence_entropy`
gives the exact entropy per token of a length-L window of the stationary chain,

  H(x_1..x_L) / L = [H(x_1..x_k) + (L - k) h] / L,  h = sum_s pi(s) H(P(. | s)),

which no likelihood bound on such windows can beat (a bound below it by more
than its standard error is a bug).
"""

import dataclasses
import json
import os

import numpy as np


@dataclasses.dataclass(frozen=True)
class MarkovSource:
  vocab: int
  order: int
  transition: np.ndarray  # [V**order, V]: next-token probabilities per context (contexts in base-V order)
  stationary: np.ndarray  # [V**order]: stationary distribution over contexts

  @property
  def entropy_rate(self) -> float:
    """h = E_pi H(next | context), nats/token."""
    p = self.transition
    row_h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
    return float(self.stationary @ row_h)

  def sequence_entropy(self, length: int) -> float:
    """Exact entropy per token (nats) of a window of `length` tokens drawn from the stationary chain."""
    if length < self.order:
      raise ValueError(f"window {length} is shorter than the order {self.order}.")
    pi = self.stationary[self.stationary > 0]
    h_start = float(-np.sum(pi * np.log(pi)))
    return (h_start + (length - self.order) * self.entropy_rate) / length

  def unigram_entropy(self) -> float:
    """Entropy of the stationary single-token marginal (what a context-free model reaches at best)."""
    marg = self.stationary.reshape((-1, self.vocab)).sum(0) if self.order else self.stationary
    marg = marg[marg > 0]
    return float(-np.sum(marg * np.log(marg)))

  def sample(self, num_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """One stationary stream of `num_tokens` int32 tokens."""
    ctx = int(rng.choice(self.stationary.size, p=self.stationary))
    out = np.empty(num_tokens, np.int32)
    digits = [(ctx // self.vocab ** (self.order - 1 - i)) % self.vocab for i in range(self.order)]
    out[:self.order] = digits
    cum = np.cumsum(self.transition, axis=1)
    u = rng.random(num_tokens)
    for i in range(self.order, num_tokens):
      nxt = int(np.searchsorted(cum[ctx], u[i] * cum[ctx, -1], side="right"))
      nxt = min(nxt, self.vocab - 1)
      out[i] = nxt
      ctx = (ctx * self.vocab + nxt) % (self.vocab ** self.order)
    return out


def make_markov(vocab: int, order: int, successors: int, *, concentration: float = 1.0, seed: int = 0) -> MarkovSource:
  """A random sparse order-`order` chain; each context has `successors` possible next tokens."""
  if not 1 <= successors <= vocab:
    raise ValueError(f"successors must lie in [1, {vocab}], got {successors}.")
  rng = np.random.default_rng(seed)
  n_ctx = vocab ** order
  trans = np.zeros((n_ctx, vocab))
  for s in range(n_ctx):
    nxt = rng.choice(vocab, size=successors, replace=False)
    trans[s, nxt] = rng.dirichlet(np.full(successors, concentration))
  # Mix in a tiny uniform share so the chain is irreducible and aperiodic (a unique stationary law).
  trans = 0.999 * trans + 0.001 / vocab
  trans /= trans.sum(1, keepdims=True)
  # Stationary distribution over contexts: power iteration on the context-to-context chain.
  pi = np.full(n_ctx, 1.0 / n_ctx)
  for _ in range(5000):
    new = np.zeros(n_ctx)
    nxt_ctx = (np.arange(n_ctx)[:, None] * vocab + np.arange(vocab)[None, :]) % n_ctx
    np.add.at(new, nxt_ctx.reshape(-1), (pi[:, None] * trans).reshape(-1))
    if np.abs(new - pi).max() < 1e-13:
      pi = new
      break
    pi = new
  return MarkovSource(vocab, order, trans, pi / pi.sum())


def write_source(source: MarkovSource, out: str, *, train_tokens: int, val_tokens: int, seq_len: int,
                 seed: int = 0, name: str = "") -> dict:
  """Writes OUT/train.npy, OUT/val.npy and OUT/info.json (with the exact entropies) for data.source=npy."""
  os.makedirs(out, exist_ok=True)
  rng = np.random.default_rng(seed + 1)
  np.save(os.path.join(out, "train.npy"), source.sample(train_tokens, rng))
  np.save(os.path.join(out, "val.npy"), source.sample(val_tokens, rng))
  info = {"name": name, "vocab": source.vocab, "order": source.order, "seq_len": seq_len,
          "entropy_rate": source.entropy_rate, "sequence_entropy": source.sequence_entropy(seq_len),
          "unigram_entropy": source.unigram_entropy(), "train_tokens": train_tokens, "val_tokens": val_tokens}
  with open(os.path.join(out, "info.json"), "w") as f:
    json.dump(info, f, indent=1)
  return info
