"""One writer for metrics: console, a JSONL file a script can read, TensorBoard events.

TensorBoard files are written with tensorboardX (no TensorFlow). Only process 0
writes; other processes get a writer that drops everything.
"""

import io
import json
import math
import os
import time
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np

from replaid_jax import paths


def _plain(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "__array__"):
    a = np.asarray(v)
    return a.item() if a.ndim == 0 else a.tolist()
  return v


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4g}" if math.isfinite(v) else str(v)
  return str(v)


def console_text(scalars: Mapping[str, Any], prefix: str = "") -> str:
  """'loss=4.123  lr=0.002 ...': scalars as the console shows them (4 significant digits)."""
  return "  ".join(f"{prefix}{k}={_fmt(_plain(v))}" for k, v in scalars.items())


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"model": {"width": 32}} -> {"model.width": 32}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def parameter_table(params: Any) -> str:
  """clu's table of parameter names, shapes, dtypes and sizes, ending in whole-number totals."""
  from clu import parameter_overview  # pylint: disable=g-import-not-at-top
  lines = parameter_overview.get_parameter_overview(params, include_stats=False).rstrip("\n").split("\n")
  if lines[-1].startswith("Total:"):  # clu's totals read "Total: 67,746.0 -- 270,984.0 bytes"
    lines.pop()
  leaves = jax.tree.leaves(params)
  count = sum(math.prod(x.shape) for x in leaves)
  size = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)
  return "\n".join(lines + [f"Total: {count:,} parameters, {size:,} bytes"])


class MetricWriter:
  """Fans scalars out to the console, <dir>/metrics.jsonl (created on the first row) and TensorBoard."""

  def __init__(self, directory: str, *, tensorboard: bool = True, enabled: bool | None = None,
               resume_step: int | None = None):
    """`resume_step`: a run resumed from that step drops the rows (and TensorBoard events) logged after it
    by the invocation that stopped, since those steps are trained and logged again.

    `directory` may be a bucket URI (gs://...): there, where files cannot be appended to, metrics.jsonl is
    rewritten whole at most every `REMOTE_FLUSH_SECONDS` and on close.
    """
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.directory = directory
    self._tb = None
    self._jsonl = None
    self._remote_rows: list[str] | None = None
    self._last_flush = 0.0
    if not self.enabled:
      return
    paths.makedirs(directory)
    path = paths.join(directory, "metrics.jsonl")
    if paths.is_uri(directory):
      self._remote_rows = _read_rows(path, resume_step) if paths.exists(path) else []
    elif resume_step is not None and os.path.exists(path):
      paths.write_text_atomic(path, "".join(_read_rows(path, resume_step)))
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      purge = {} if resume_step is None else {"purge_step": resume_step + 1}
      self._tb = SummaryWriter(directory, flush_secs=30, **purge)

  def write(self, step: int, scalars: Mapping[str, Any], *, prefix: str = "", console: bool = True) -> None:
    if not self.enabled:
      return
    row = {k: _plain(v) for k, v in scalars.items()}
    record = {"step": int(step), "time": time.time(), **{f"{prefix}{k}": v for k, v in row.items()}}
    if self._remote_rows is not None:
      self._remote_rows.append(json.dumps(record) + "\n")
      if time.time() - self._last_flush >= REMOTE_FLUSH_SECONDS:
        self._flush_remote()
    else:
      if self._jsonl is None:
        self._jsonl = open(paths.join(self.directory, "metrics.jsonl"), "a", encoding="utf-8")
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
    if self._tb is not None:
      for k, v in row.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(f"{prefix}{k}", v, step)
    if console:
      logging.info("[%d] %s", step, console_text(row, prefix))

  def _flush_remote(self) -> None:
    paths.write_text_atomic(paths.join(self.directory, "metrics.jsonl"), "".join(self._remote_rows))
    self._last_flush = time.time()
  def write_hparams(self, config: Mapping[str, Any], metrics: tuple[str, ...]) -> None:
    """The config, flattened to section.key, as TensorBoard hparams, with `metrics` (scalar tags) as its metrics."""
    if self._tb is None:
      return
    from tensorboardX.summary import hparams  # pylint: disable=g-import-not-at-top
    values = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flatten(config).items()}
    experiment, session_start, _ = hparams(values, {m: 0.0 for m in metrics})
    self._tb._get_file_writer().add_summary(experiment)  # pylint: disable=protected-access
    self._tb._get_file_writer().add_summary(session_start)  # pylint: disable=protected-access

  def write_image(self, tag: str, png_path: str, step: int) -> None:
    """A PNG file (a plot already saved) as a TensorBoard image."""
    if self._tb is None or not paths.exists(png_path):
      return
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with paths.open_file(png_path, "rb") as f, Image.open(f) as im:
      pixels = np.asarray(im.convert("RGB"))
    self._tb.add_image(tag, pixels, step, dataformats="HWC")

  def write_text(self, tag: str, text: str, step: int) -> None:
    """Text shown verbatim (as a code block) in TensorBoard's text tab."""
    if self._tb is not None:
      self._tb.add_text(tag, "```\n" + text.replace("```", "` ` `") + "\n```", step)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def write_json(self, name: str, payload: Mapping[str, Any]) -> str:
    """Writes payload to <dir>/<name> atomically; returns the path."""
    path = paths.join(self.directory, name)
    if self.enabled:
      paths.write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=_plain))
    return path

  def write_array(self, name: str, array: np.ndarray) -> str:
    """Writes array to <dir>/<name> (.npy) atomically; returns the path."""
    path = paths.join(self.directory, name)
    if self.enabled:
      buf = io.BytesIO()
      np.save(buf, np.asarray(array))
      paths.write_bytes_atomic(path, buf.getvalue())
    return path

  def close(self) -> None:
    if self._remote_rows is not None:
      self._flush_remote()
      self._remote_rows = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


REMOTE_FLUSH_SECONDS = 30.0


def _read_rows(path: str, up_to_step: int | None) -> list[str]:
  """The rows of a metrics.jsonl, up to `up_to_step` when given; a partly written last line is dropped."""
  kept = []
  with paths.open_file(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict) and (up_to_step is None or int(row.get("step", 0)) <= up_to_step):
        kept.append(line if line.endswith("\n") else line + "\n")
  return kept
