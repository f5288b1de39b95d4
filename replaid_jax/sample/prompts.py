"""From the `sample` config's prompts and word lists to the arrays the samplers condition on.

Layout of one sample of L tokens (P prefix tokens, S suffix tokens):

  [ prefix (0..P) | generated | suffix (P+gap .. P+gap+S) | generated ]     gap > 0
  [ prefix (0..P) | generated                  | suffix (L-S .. L)     ]     gap = 0

Prefix and suffix positions are imposed by guidance, clamping or both
(`sample.condition`). Words in `sample.constraints` / `sample.avoid` are
"word", "word@POS" (starting at token position POS) or either with ":WEIGHT";
a word is tokenised as it reads after a space (" word"), and its weight
multiplies `sample.guidance_weight`. A word pinned to a position and included
becomes per-position targets; other words become spans (see
`replaid_jax.diffusion.guidance`).
"""

import dataclasses
import os

import jax.numpy as jnp
import numpy as np

from replaid_jax import errors
from replaid_jax.data import tokenizer as tokenizer_lib
from replaid_jax.diffusion import guidance
from replaid_jax import config_lib


@dataclasses.dataclass(frozen=True)
class Word:
  text: str
  position: int  # token position of the first piece, or -1 for anywhere
  weight: float


@dataclasses.dataclass
class Layout:
  """The conditioning of one sample, as host arrays (every sample of a run shares it)."""

  seq_len: int
  tokens: np.ndarray  # [L] int32 target token per position (0 where none)
  targeted: np.ndarray  # [L] bool: positions with a target token (prefix, suffix, pinned words)
  weights: np.ndarray  # [L] float32 guidance weight per position
  clamp: np.ndarray  # [L] bool
  span_tokens: np.ndarray  # [K, S] int32
  span_mask: np.ndarray  # [K, S] bool
  span_weights: np.ndarray  # [K] float32
  span_avoid: np.ndarray  # [K] bool
  span_position: np.ndarray  # [K] int32
  span_names: list[str]  # "include 'word'" / "avoid 'word@3'" per span, for reports
  prefix_len: int
  suffix_start: int  # -1 without a suffix
  suffix_len: int

  @property
  def is_conditional(self) -> bool:
    return bool(self.targeted.any()) or len(self.span_names) > 0

  def batch(self, batch_size: int) -> guidance.Conditioning:
    """The same conditioning for every row of a batch."""
    rep = lambda a: jnp.asarray(np.broadcast_to(a, (batch_size,) + a.shape))
    return guidance.Conditioning(
        tokens=rep(self.tokens), weights=rep(self.weights), clamp=rep(self.clamp),
        span_tokens=rep(self.span_tokens), span_mask=rep(self.span_mask), span_weights=rep(self.span_weights),
        span_avoid=rep(self.span_avoid), span_position=rep(self.span_position))


def read_prompt(text: str, path: str, key: str) -> str:
  """The prompt text: `text`, or the contents of the UTF-8 file `path` (config key `key`_file)."""
  if not path:
    return text
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise errors.DataError(f"sample.{key}_file: no file at '{path}'. Point it at a UTF-8 text file, "
                           f"or pass the text itself with --config.sample.{key}=...")
  with open(path, "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise errors.DataError(
        f"sample.{key}_file: '{path}' is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}). "
        "Re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8).") from None


def parse_words(spec: str, key: str) -> list[Word]:
  """'king, queen@5:3' -> [Word('king', -1, 1.0), Word('queen', 5, 3.0)]."""
  words = []
  for item in (part.strip() for part in spec.split(",")):
    if not item:
      continue
    weight, position = 1.0, -1
    head, sep, tail = item.rpartition(":")
    if sep and head:
      try:
        weight, item = float(tail), head
      except ValueError:
        pass
    head, sep, tail = item.rpartition("@")
    if sep and head and tail.strip().isdigit():
      position, item = int(tail), head
    if not item.strip():
      raise errors.ConfigError(f"sample.{key}: an entry has no word ({spec!r}); use 'word', 'word@POS' or 'word:W'.")
    if weight < 0:
      raise errors.ConfigError(f"sample.{key}: the weight of '{item}' is negative ({weight}); "
                               "list words to avoid in sample.avoid instead.")
    words.append(Word(item.strip(), position, weight))
  return words


# A word that is not pinned as targets: its ids, guidance weight, whether to avoid it, and position (-1: anywhere).
_Span = tuple[list[int], float, bool, int]


def _fits(what: str, start: int, n: int, seq_len: int, fix: str) -> None:
  if start + n > seq_len:
    raise errors.DataError(
        f"{what} needs positions {start}..{start + n - 1} but samples have {seq_len} tokens; {fix}")


def build(tok: tokenizer_lib.Tokenizer | None, s: config_lib.SampleConfig, seq_len: int, *,
          max_seq_len: int) -> Layout:
  """Tokenises the prompts and words of `s` for samples of `seq_len` tokens."""
  prefix, suffix, include, avoid = _read_inputs(tok, s)
  pre, suf, start = _place_prompts(tok, prefix, suffix, s, seq_len, max_seq_len)
  tokens, targeted, weights, clamp = _prompt_targets(pre, suf, start, s, seq_len)
  spans, names = _place_words(tok, include, avoid, s, seq_len, tokens, targeted, weights)
  return Layout(
      seq_len=seq_len, tokens=tokens, targeted=targeted, weights=weights, clamp=clamp, **_span_arrays(spans),
      span_names=names, prefix_len=len(pre), suffix_start=start, suffix_len=len(suf))


def _read_inputs(tok: tokenizer_lib.Tokenizer | None,
                 s: config_lib.SampleConfig) -> tuple[str, str, list[Word], list[Word]]:
  """The prefix and suffix texts and the words to include and avoid; text needs a tokenizer."""
  prefix = read_prompt(s.prefix, s.prefix_file, "prefix")
  suffix = read_prompt(s.suffix, s.suffix_file, "suffix")
  include, avoid = parse_words(s.constraints, "constraints"), parse_words(s.avoid, "avoid")
  if tok is None and (prefix or suffix or include or avoid):
    raise errors.CheckpointError(
        "this checkpoint has no tokenizer (it was trained on pre-tokenised .npy data without "
        "data.tokenizer_path), so text prompts cannot be tokenised; sample without prompts or constraints.")
  return prefix, suffix, include, avoid


def _place_prompts(tok: tokenizer_lib.Tokenizer | None, prefix: str, suffix: str, s: config_lib.SampleConfig,
                   seq_len: int, max_seq_len: int) -> tuple[list[int], list[int], int]:
  """The prefix and suffix token ids and where the suffix starts (-1 without one), checked to fit `seq_len`."""
  longer = f"shorten it, or raise sample.seq_len (up to model.max_seq_len={max_seq_len})."
  pre = tok.encode(prefix) if prefix else []
  suf = tok.encode(suffix) if suffix else []
  _fits(f"sample.prefix ({len(pre)} tokens)", 0, len(pre), seq_len, longer)
  _fits(f"sample.suffix ({len(suf)} tokens)", 0, len(suf), seq_len, longer)
  if suf:
    start = len(pre) + s.gap if s.gap else seq_len - len(suf)
    _fits(f"the prefix ({len(pre)} tokens), gap (sample.gap={s.gap}) and suffix ({len(suf)} tokens)",
          0, start + len(suf), seq_len, "shorten the prompts, lower sample.gap, or raise sample.seq_len "
          f"(up to model.max_seq_len={max_seq_len}).")
    if start < len(pre):
      raise errors.DataError(f"the prefix ({len(pre)} tokens) and suffix ({len(suf)} tokens) overlap in "
                             f"{seq_len} tokens; shorten them or raise sample.seq_len.")
  else:
    start = -1
    if s.gap:
      raise errors.ConfigError("sample.gap is set but there is no suffix; set sample.suffix (infilling) or leave "
                               "sample.gap at 0.")
  return pre, suf, start


def _prompt_targets(pre: list[int], suf: list[int], start: int, s: config_lib.SampleConfig,
                    seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Per-position target tokens, targeted flags, guidance weights and clamp flags of the prefix and suffix."""
  tokens = np.zeros(seq_len, np.int32)
  targeted = np.zeros(seq_len, bool)
  weights = np.zeros(seq_len, np.float32)
  guided = s.condition in ("guidance", "both")
  for offset, ids in ((0, pre), (start, suf)):
    if ids:
      tokens[offset:offset + len(ids)] = ids
      targeted[offset:offset + len(ids)] = True
  clamp = targeted.copy() if s.condition in ("clamp", "both") else np.zeros(seq_len, bool)
  if guided:
    weights[targeted] = s.guidance_weight
  return tokens, targeted, weights, clamp


def _place_words(tok: tokenizer_lib.Tokenizer | None, include: list[Word], avoid: list[Word],
                 s: config_lib.SampleConfig, seq_len: int, tokens: np.ndarray, targeted: np.ndarray,
                 weights: np.ndarray) -> tuple[list[_Span], list[str]]:
  """Adds the included words pinned to a position to `tokens`, `targeted` and `weights` (in place).

  Returns:
    The other words as spans (ids, weight, avoid, position) and their names.
  """
  spans, names = [], []
  for kind, words in (("include", include), ("avoid", avoid)):
    for w in words:
      ids = tok.encode(" " + w.text)
      label = f"sample.{'constraints' if kind == 'include' else 'avoid'} word '{w.text}' ({len(ids)} tokens)"
      _fits(label, max(w.position, 0), len(ids), seq_len, "choose an earlier position or a shorter word.")
      if kind == "include" and w.position >= 0:
        where = slice(w.position, w.position + len(ids))
        clash = targeted[where] & (tokens[where] != np.asarray(ids))
        if clash.any():
          raise errors.ConfigError(f"{label} at position {w.position} overlaps other fixed tokens (prefix, suffix "
                                   "or another word); move it.")
        tokens[where], targeted[where] = ids, True
        weights[where] += s.guidance_weight * w.weight
      else:
        spans.append((ids, s.guidance_weight * w.weight, kind == "avoid", w.position))
        names.append(f"{kind} '{w.text}'" + (f"@{w.position}" if w.position >= 0 else ""))
  return spans, names


def _span_arrays(spans: list[_Span]) -> dict[str, np.ndarray]:
  """The span fields of a Layout: ids padded to the longest span with their mask, weights, avoid flags, positions."""
  k, width = len(spans), max([len(ids) for ids, *_ in spans], default=1)
  span_tokens = np.zeros((k, width), np.int32)
  span_mask = np.zeros((k, width), bool)
  for i, (ids, *_rest) in enumerate(spans):
    span_tokens[i, :len(ids)], span_mask[i, :len(ids)] = ids, True
  return dict(
      span_tokens=span_tokens, span_mask=span_mask,
      span_weights=np.asarray([w for _, w, _, _ in spans], np.float32).reshape(k),
      span_avoid=np.asarray([a for _, _, a, _ in spans], bool).reshape(k),
      span_position=np.asarray([p for *_, p in spans], np.int32).reshape(k))


def span_present(tokens_L: np.ndarray, layout: Layout) -> list[bool]:
  """Whether each span occurs in a sample (at its position when pinned)."""
  out = []
  for ids, mask, pos in zip(layout.span_tokens, layout.span_mask, layout.span_position):
    ids = ids[mask]
    n = len(ids)
    starts = [int(pos)] if pos >= 0 else range(len(tokens_L) - n + 1)
    out.append(any(np.array_equal(tokens_L[o:o + n], ids) for o in starts))
  return out
