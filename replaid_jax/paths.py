"""Workdir paths: a local directory or a bucket URI (gs://bucket/run), through etils.epath.

Orbax writes checkpoints to either; metrics, TensorBoard events, JSON results,
plots, checksum manifests, the workdir lock and text/.npy data files go through
these helpers, so that
a URI is never mistaken for a local relative path (os.path.abspath("gs://b/r")
would be ./gs:/b/r).
"""

import io
import os
import tempfile

from etils import epath


def is_uri(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
  """A URI as given (without a trailing slash); a local path made absolute."""
  path = os.fspath(path)
  return path.rstrip("/") if is_uri(path) else os.path.abspath(path)


def join(base: str | os.PathLike, *parts: str) -> str:
  return os.fspath(epath.Path(os.fspath(base)).joinpath(*parts)) if is_uri(base) else os.path.join(base, *parts)


def path(p: str | os.PathLike) -> epath.Path:
  return epath.Path(os.fspath(p))


def exists(p: str | os.PathLike) -> bool:
  return path(p).exists()


def isdir(p: str | os.PathLike) -> bool:
  return path(p).is_dir()


def makedirs(p: str | os.PathLike) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def write_bytes_atomic(p: str | os.PathLike, data: bytes) -> None:
  """Writes a file that readers see whole or not at all: locally through a synced temporary file beside it and a
  rename, on a bucket in one upload (atomic there)."""
  p = os.fspath(p)
  if is_uri(p):
    path(p).write_bytes(data)
    return
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(p) or ".", prefix=f".{os.path.basename(p)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, p)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text_atomic(p: str | os.PathLike, text: str) -> None:
  """`write_bytes_atomic` of UTF-8 text."""
  write_bytes_atomic(p, text.encode("utf-8"))


def pyplot():
  """matplotlib.pyplot on the headless Agg backend, imported on first use (plots are optional work)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, p: str | os.PathLike, **savefig_kwargs) -> str:
  """A matplotlib figure as a PNG at a local path or a URI, its folder made and the file written atomically."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", **savefig_kwargs)
  makedirs(os.path.dirname(os.fspath(p)) or ".")
  write_bytes_atomic(p, buf.getvalue())
  return os.fspath(p)


def open_file(p: str | os.PathLike, mode: str = "r"):
  """A file object for a local path or a URI."""
  if is_uri(p):
    return path(p).open(mode)
  return open(os.fspath(p), mode, **({} if "b" in mode else {"encoding": "utf-8"}))
