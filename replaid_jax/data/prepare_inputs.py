"""The inputs of data preparation (`prepare.py`): the raw files, read as units of documents.

A unit is a group of consecutive input files, or of consecutive members of an
OpenWebText archive; it is the step at which preparation saves its progress.
Every failure a user can fix raises `DataError` naming the file and the fix.
"""

import dataclasses
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

from replaid_jax.data import sources
from replaid_jax.errors import DataError

_SUFFIXES = {"text": (".txt",), "jsonl": (".jsonl",), "jsonl.zst": (".jsonl.zst", ".zst"),
             "owt": (".tar.xz", ".tar")}
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")


@dataclasses.dataclass
class Reading:
  """Bytes of the inputs consumed so far: finished files plus the open one's position."""
  done: int = 0
  current: Any = None

  def position(self) -> int:
    try:
      return self.done + (self.current.tell() if self.current is not None else 0)
    except (OSError, ValueError):
      return self.done


@dataclasses.dataclass
class Unit:
  """One group of consecutive inputs, the step at which progress is saved."""
  key: str  # identifies the unit's inputs (paths, member names)
  documents: Callable[[], Iterator[str]]  # its documents, in order
  skip: Callable[[], None]  # consumes the unit without reading it (owt)


def input_files(spec: str, input_format: str) -> list[str]:
  """The files named by `spec` (comma-separated paths or globs, as --inputs), in order."""
  return sources._expand(spec, what="--inputs", suffixes=_SUFFIXES[input_format])  # pylint: disable=protected-access


def zstd_module():
  """The `zstandard` module, which --input_format=jsonl.zst needs."""
  try:
    import zstandard  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError(
        "--input_format=jsonl.zst needs the `zstandard` package, which is not installed."
        " Install it with `pip install zstandard` (or `pip install -e .[prepare]`).") from None
  return zstandard


def units(files: list[str], reading: Reading, *, input_format: str, per_unit: int, jsonl_field: str,
          split_paragraphs: bool) -> Iterator[Unit]:
  """The units of `files`, each of `per_unit` files (owt: archive members), in order.

  Args:
    files: the input files, in order.
    reading: counts the bytes read, for progress lines.
    input_format: one of the keys of `_SUFFIXES`.
    per_unit: files (owt: archive members) per unit.
    jsonl_field: the field holding the document in jsonl records.
    split_paragraphs: text only: one document per blank-line-separated block.
  """
  if input_format == "owt":
    for path in files:
      yield from _owt_units(path, per_unit, reading)
    return
  for start in range(0, len(files), per_unit):
    group = files[start:start + per_unit]

    def documents(group=group):
      for path in group:
        yield from _file_documents(path, reading, input_format=input_format, jsonl_field=jsonl_field,
                                   split_paragraphs=split_paragraphs)

    def skip(group=group):
      reading.done += sum(os.path.getsize(p) for p in group)

    yield Unit(key="\n".join(group), documents=documents, skip=skip)


def _decode(data: bytes, where: str) -> str:
  try:
    return data.decode("utf-8").removeprefix("\ufeff")
  except UnicodeDecodeError as e:
    raise DataError(
        f"{where}: not valid UTF-8 (first bad byte 0x{data[e.start]:02x} at byte offset"
        f" {e.start}). Re-encode it as UTF-8 or leave it out of --inputs.") from None


def _text_documents(text: str, split_paragraphs: bool) -> list[str]:
  if not split_paragraphs:
    return [text]
  return _PARAGRAPH_BREAK.split(text)


def _jsonl_documents(lines, where: str, field: str) -> Iterator[str]:
  for lineno, raw in enumerate(lines, start=1):
    if not raw.strip():
      continue
    line = _decode(raw, f"{where}:{lineno}")
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{where}:{lineno}: not valid JSON ({e.msg}). Each line must be one JSON"
                      " object; fix or remove the line.") from None
    if not isinstance(record, dict) or field not in record:
      present = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise DataError(f"{where}:{lineno}: no field '{field}' (--jsonl_field); found {present}."
                      " Set --jsonl_field to the field that holds the document text.")
    value = record[field]
    if not isinstance(value, str):
      raise DataError(f"{where}:{lineno}: field '{field}' (--jsonl_field) holds a"
                      f" {type(value).__name__}, not a string.")
    yield value


def _file_documents(path: str, reading: Reading, *, input_format: str, jsonl_field: str,
                    split_paragraphs: bool) -> Iterator[str]:
  """The documents of one text, jsonl or jsonl.zst file."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    reading.current = f
    if input_format == "text":
      yield from _text_documents(_decode(f.read(), path), split_paragraphs)
    elif input_format == "jsonl":
      yield from _jsonl_documents(f, path, jsonl_field)
    else:
      zstd = zstd_module()
      reader = zstd.ZstdDecompressor().stream_reader(f, read_across_frames=True)
      try:
        yield from _jsonl_documents(io.BufferedReader(reader, 1 << 20), path, jsonl_field)
      except zstd.ZstdError as e:
        raise DataError(f"{path}: not a readable zstd file ({e}).") from None
  reading.current = None
  reading.done += size


def _owt_member_documents(data: bytes, where: str) -> Iterator[str]:
  """The .txt documents of one `urlsf_subset*.xz` member (an xz-compressed tar)."""
  try:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|xz") as inner:
      for member in inner:
        if member.isfile() and member.name.endswith(".txt"):
          yield _decode(inner.extractfile(member).read(), f"{where}:{member.name}")
  except (tarfile.TarError, EOFError, OSError) as e:  # lzma.LZMAError is an OSError
    raise DataError(f"{where}: not an xz-compressed tar of .txt files ({e}).") from None


def _owt_units(path: str, per_unit: int, reading: Reading) -> Iterator[Unit]:
  """Units of `per_unit` consecutive `*.xz` members of an OpenWebText archive, streamed."""
  size = os.path.getsize(path)
  mode = "r|xz" if path.lower().endswith(".xz") else "r|"
  with open(path, "rb") as f:
    reading.current = f
    try:
      with tarfile.open(fileobj=f, mode=mode) as outer:
        members = (m for m in outer if m.isfile() and m.name.endswith(".xz"))
        head = next(members, None)  # the next member not yet handed out
        if head is None:
          raise DataError(f"{path}: no *.xz member. --input_format=owt reads the released"
                          " openwebtext.tar.xz (openwebtext/urlsf_subset*.xz).")
        index = 0
        while head is not None:

          def unit_members():
            nonlocal head
            for _ in range(per_unit):
              if head is None:
                return
              # The archive is streamed: a member's data must be read (or is
              # skipped) before the next header is read.
              yield head
              head = next(members, None)

          taken = unit_members()

          def documents(taken=taken):
            for member in taken:
              data = outer.extractfile(member).read()
              yield from _owt_member_documents(data, f"{path}:{member.name}")

          def skip(taken=taken):
            for _ in taken:
              pass

          yield Unit(key=f"{path}#{index}:{head.name}", documents=documents, skip=skip)
          skip()  # whatever the consumer left of this unit
          index += 1
    except (tarfile.TarError, EOFError) as e:
      raise DataError(f"{path}: not a readable tar archive ({e}).") from None
  reading.current = None
  reading.done += size
