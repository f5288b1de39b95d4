"""The zero-shot benchmark sets, read offline: where each one's files live, how they are read and detokenised.

Each set (`ZERO_SHOT`) is found under `eval.data_dir`, as a local copy of its
original release (the first of its candidate paths that exists), or as a
tensorflow-datasets builder prepared there with file_format="array_record" (read
with tfds.data_source, no TensorFlow) when that package is installed. Its
documents are kept as released (the word counts of datasets.py are taken on
them); its detokeniser turns word-level benchmark text back into ordinary text.
"""

import csv
import dataclasses
import glob
import io
import json
import os
import re
from typing import Callable

from replaid_jax import errors


# ---- detokenisers: word-level benchmark text back to ordinary text.


def _tidy_punctuation(s: str) -> str:
  """Joins tokenised punctuation to its word: 'a , b .' -> 'a, b.', '( x )' -> '(x)'."""
  s = re.sub(r" ([.,:;!?%])(?=\s|$)", r"\1", s)
  s = re.sub(r"([(\[{]) ", r"\1", s)
  s = re.sub(r" ([)\]}])", r"\1", s)
  s = re.sub(r'" ([^"\n]*?) "', r'"\1"', s)
  s = re.sub(r" (n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1", s, flags=re.IGNORECASE)
  s = re.sub(r"s ' ", "s' ", s)
  s = re.sub(r"\$ (?=\d)", "$", s)
  s = re.sub(r"# (?=\d)", "#", s)
  return s


def detok_wikitext(s: str) -> str:
  """WikiText: ' @-@ ' -> '-', ' @,@ ' -> ',', ' @.@ ' -> '.', heading markers '= = x = =' -> '== x ==', punctuation."""
  s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
  for n in (4, 3, 2):
    s = s.replace(" ".join("=" * n), "=" * n)
  s = s.replace(" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}")
  s = _tidy_punctuation(s)
  return "\n".join(line.strip() for line in s.split("\n"))


def detok_ptb(s: str) -> str:
  """PTB: contractions and punctuation re-attached, '\\/' -> '/', the number mask 'N' and '<unk>' kept as written."""
  s = s.replace("\\/", "/").replace("\\*", "*")
  return "\n".join(_tidy_punctuation(line.strip()) for line in s.split("\n"))


def detok_lm1b(s: str) -> str:
  """LM1B (and other Moses-tokenised text): punctuation and contractions re-attached, ' @-@ ' -> '-'."""
  s = s.replace(" @-@ ", "-").replace("http : / / ", "http://").replace("https : / / ", "https://")
  return _tidy_punctuation(s)


def detok_lambada(s: str) -> str:
  """LAMBADA: curly quotes -> straight quotes, surrounding whitespace stripped."""
  s = s.replace("\N{LEFT DOUBLE QUOTATION MARK}", '"').replace("\N{RIGHT DOUBLE QUOTATION MARK}", '"')
  s = s.replace("\N{LEFT SINGLE QUOTATION MARK}", "'").replace("\N{RIGHT SINGLE QUOTATION MARK}", "'")
  return s.strip()


def detok_ag_news(s: str) -> str:
  """AG News: the CSV's HTML remnants (' #39;' -> "'", 'quot;' -> '"', '&amp;' -> '&'); '\\' line marks -> space."""
  s = s.replace(" #39;", "'").replace("#39;", "'").replace("quot;", '"').replace("&amp;", "&")
  s = s.replace("&lt;", "<").replace("&gt;", ">").replace("\\", " ")
  return re.sub(r"[ \t]+", " ", s).strip()


def detok_papers(s: str) -> str:
  """PubMed / arXiv articles (lower-cased, tokenised): punctuation and contractions re-attached; @xmath kept."""
  return _tidy_punctuation(s.replace(" @-@ ", "-"))


def detok_none(s: str) -> str:
  """Text used as written."""
  return s


# ---- readers: a local file -> documents (original text).


def _read(path: str) -> str:
  with open(path, "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8").removeprefix("\ufeff")
  except UnicodeDecodeError as e:
    raise errors.DataError(f"{path}: not valid UTF-8 at byte {e.start}; re-encode it as UTF-8.") from None


_WIKI_TITLE = re.compile(r"^ = [^=].* = $")


def read_wikitext(path: str) -> list[str]:
  """One document per article; an article starts at a top-level heading line ' = Title = '."""
  docs, current = [], []

  def flush():
    while current and not current[-1].strip():
      current.pop()
    if current:
      docs.append("\n".join(current))

  for line in _read(path).split("\n"):
    if _WIKI_TITLE.match(line):
      flush()
      current = []
    if current or line.strip():
      current.append(line)
  flush()
  return docs


def read_lines(path: str) -> list[str]:
  """One document per non-blank line (sentences of PTB and LM1B, passages of LAMBADA)."""
  return [line.strip() for line in _read(path).split("\n") if line.strip()]


def _jsonl_field(path: str, fields: tuple[str, ...]) -> list[str]:
  docs = []
  for lineno, line in enumerate(_read(path).split("\n"), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise errors.DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object.") from None
    for field in fields:
      if isinstance(record, dict) and field in record:
        value = record[field]
        docs.append(" ".join(value) if isinstance(value, list) else str(value))
        break
    else:
      raise errors.DataError(f"{path}:{lineno}: none of the fields {list(fields)} is present; this is not the "
                             "expected release of the data set.")
  return [d for d in docs if d.strip()]


def read_ag_news_csv(path: str) -> list[str]:
  """The original AG News CSV (class, title, description): 'title. description' per row; .jsonl: field 'text'."""
  if path.endswith(".jsonl"):
    return _jsonl_field(path, ("text",))
  docs = []
  for row in csv.reader(io.StringIO(_read(path))):
    if len(row) < 3:
      continue
    title, description = row[1].strip(), row[2].strip()
    docs.append(f"{title} {description}".strip())
  return docs


def read_papers(path: str) -> list[str]:
  """Scientific papers: the original release (one JSON per line, 'article_text' a list of sentences) or an
  export with an 'article' field."""
  return _jsonl_field(path, ("article", "article_text", "text"))


def read_lambada(path: str) -> list[str]:
  """LAMBADA plain text (one passage per line) or the jsonl release (field 'text')."""
  return _jsonl_field(path, ("text",)) if path.endswith(".jsonl") else read_lines(path)


@dataclasses.dataclass(frozen=True)
class ZeroShot:
  """Where a zero-shot set lives offline and how it is read."""

  title: str
  origin: str  # the archive the files come from, for the error message
  files: dict  # split -> candidate paths under eval.data_dir (globs allowed), first match wins
  reader: Callable[[str], list[str]]
  detokenizer: Callable[[str], str]
  word_level: bool
  tfds: tuple[str, tuple[str, ...]] | None = None  # (builder, text features joined by a space)
  tfds_splits: tuple[str, ...] = ()


def _wikitext(n: str, title: str) -> ZeroShot:
  files = {split: (f"wikitext-{n}-raw/wiki.{name}.raw", f"wikitext-{n}-raw-v1/wiki.{name}.raw",
                   f"wikitext-{n}/wiki.{name}.tokens")
           for split, name in (("test", "test"), ("validation", "valid"), ("train", "train"))}
  return ZeroShot(title, f"wikitext-{n}-raw-v1.zip (Salesforce WikiText release), unzipped", files, read_wikitext,
                  detok_wikitext, True)


_LM1B = "1-billion-word-language-modeling-benchmark-r13output"
ZERO_SHOT = {
    "wikitext2": _wikitext("2", "WikiText-2"),
    "wikitext103": _wikitext("103", "WikiText-103"),
    "ptb": ZeroShot(
        "Penn Treebank (Mikolov)", "simple-examples.tgz (Mikolov's PTB language-modelling data), data/ptb.*.txt",
        {s: (f"ptb.{n}.txt", f"ptb/ptb.{n}.txt", f"simple-examples/data/ptb.{n}.txt")
         for s, n in (("test", "test"), ("validation", "valid"), ("train", "train"))},
        read_lines, detok_ptb, True),
    "lm1b": ZeroShot(
        "One Billion Word benchmark", "1-billion-word-language-modeling-benchmark-r13output.tar.gz, unpacked",
        {"test": (f"{_LM1B}/heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050", "lm1b/test.txt"),
         "train": (f"{_LM1B}/training-monolingual.tokenized.shuffled/news.en-*-of-00100", "lm1b/train.txt")},
        read_lines, detok_lm1b, True, tfds=("lm1b", ("text",)), tfds_splits=("test", "train")),
    "lambada": ZeroShot(
        "LAMBADA", "lambada-dataset.tar.gz (plain-text passages) or lambada_test.jsonl (field 'text')",
        {"test": ("lambada_test_plain_text.txt", "lambada/lambada_test_plain_text.txt", "lambada_test.jsonl",
                  "lambada/lambada_test.jsonl"),
         "validation": ("lambada_development_plain_text.txt", "lambada/lambada_development_plain_text.txt")},
        read_lambada, detok_lambada, True),
    "ag_news": ZeroShot(
        "AG News", "ag_news_csv.tgz (columns class, title, description), unpacked; or ag_news/<split>.jsonl ('text')",
        {"test": ("ag_news_csv/test.csv", "ag_news/test.csv", "ag_news/test.jsonl"),
         "train": ("ag_news_csv/train.csv", "ag_news/train.csv", "ag_news/train.jsonl")},
        read_ag_news_csv, detok_ag_news, False, tfds=("ag_news_subset", ("title", "description")),
        tfds_splits=("test", "train")),
    "pubmed": ZeroShot(
        "PubMed (scientific_papers)", "pubmed-dataset.zip (Cohan et al. 2018), unzipped; or pubmed/<split>.jsonl",
        {s: (f"pubmed-dataset/{n}.txt", f"pubmed/{n}.jsonl", f"pubmed/{s}.jsonl")
         for s, n in (("test", "test"), ("validation", "val"), ("train", "train"))},
        read_papers, detok_papers, False, tfds=("scientific_papers/pubmed", ("article",)),
        tfds_splits=("test", "validation", "train")),
    "arxiv": ZeroShot(
        "arXiv (scientific_papers)", "arxiv-dataset.zip (Cohan et al. 2018), unzipped; or arxiv/<split>.jsonl",
        {s: (f"arxiv-dataset/{n}.txt", f"arxiv/{n}.jsonl", f"arxiv/{s}.jsonl")
         for s, n in (("test", "test"), ("validation", "val"), ("train", "train"))},
        read_papers, detok_papers, False, tfds=("scientific_papers/arxiv", ("article",)),
        tfds_splits=("test", "validation", "train")),
}


# ---- finding a set offline.


def _local_files(spec: ZeroShot, split: str, data_dir: str) -> list[str]:
  for pattern in spec.files.get(split, ()):
    path = os.path.join(data_dir, pattern)
    matches = sorted(glob.glob(path)) if glob.has_magic(path) else ([path] if os.path.isfile(path) else [])
    if matches:
      return matches
  return []


def _tfds_text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _tfds_docs(spec: ZeroShot, split: str, data_dir: str) -> tuple[list[str], str] | None:
  """Documents from an already prepared tensorflow-datasets builder; None when unavailable (never downloads).

  Read through `tfds.data_source` (random access to ArrayRecord files), which needs no TensorFlow: the builder
  must have been prepared with file_format="array_record".
  """
  if spec.tfds is None or split not in spec.tfds_splits:
    return None
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  builder_name, fields = spec.tfds
  try:
    builder = tfds.builder(builder_name, data_dir=data_dir or None)
    if not os.path.isfile(os.path.join(builder.data_dir, "dataset_info.json")):
      return None
  except Exception:  # pylint: disable=broad-except
    return None  # not prepared here (tfds raises when it finds neither a registered builder nor its files)
  try:
    source = tfds.data_source(builder_name, split=split, data_dir=data_dir or None, download=False)
    docs = [" ".join(_tfds_text(source[i][f]).strip() for f in fields) for i in range(len(source))]
  except Exception as e:  # pylint: disable=broad-except
    raise errors.DataError(
        f"tensorflow-datasets builder {builder_name} at {builder.data_dir} could not be read offline "
        f"({type(e).__name__}: {str(e)[:300]}). It is read without TensorFlow through tfds.data_source, which needs "
        "the builder prepared with file_format='array_record'; prepare it so, or supply a local copy of the "
        "original files under eval.data_dir instead.") from None
  return docs, f"tensorflow-datasets builder {builder_name} at {builder.data_dir} (array_record, {split})"


def documents(name: str, split: str, data_dir: str) -> tuple[list[str], str]:
  """The non-blank documents of split `split` of zero-shot set `name` as released, and where they were read from.

  Raises a DataError naming the files to supply when neither a local copy nor a prepared builder is found.
  """
  spec = ZERO_SHOT[name]
  data_dir = os.path.expanduser(data_dir) if data_dir else ""
  files = _local_files(spec, split, data_dir) if data_dir else []
  if files:
    docs = [d for path in files for d in spec.reader(path)]
    source = ", ".join(files) if len(files) <= 4 else f"{files[0]} ... {files[-1]} ({len(files)} files)"
  else:
    got = _tfds_docs(spec, split, data_dir)
    if got is None:
      where = data_dir or "<unset>"
      wanted = " or ".join(os.path.join(data_dir or "DIR", p) for p in spec.files.get(split, ()))
      tfds_hint = (f" (or a tensorflow-datasets '{spec.tfds[0]}' builder prepared there with "
                   "file_format='array_record')"
                   if spec.tfds and split in spec.tfds_splits else "")
      raise errors.DataError(
          f"{spec.title} ({name}, split '{split}') is not available offline: eval.data_dir={where} holds none of "
          f"{wanted or 'the expected files'}{tfds_hint}. Supply {spec.origin} and pass "
          f"--config.eval.data_dir=DIR (nothing is downloaded).")
    docs, source = got
  docs = [d for d in docs if d.strip()]
  if not docs:
    raise errors.DataError(f"{name} ({split}) from {source} holds no non-blank document; check the files.")
  return docs, source
