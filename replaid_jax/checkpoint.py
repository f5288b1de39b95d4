"""Orbax checkpoints of a run: one wrapper around CheckpointManager.

Each step directory holds four items:
  state       step, params, optimizer state, loss-statistic EMAs
  ema_params  the EMA parameters (what eval and sampling restore, alone)
  data_iter   the grain iterator state (process-local files)
  metadata    JSON: the config, tokenizer identity, vocab size, objective, versions

Atomicity (orbax-checkpoint 0.12.8 on a local or network file system, checked
with SIGKILL by tests/test_preemption.py): a step is written into
<step>.orbax-checkpoint-tmp/, each item first into
<item>.orbax-checkpoint-tmp/ inside it and renamed to <item>/ when complete;
once every item (and every process's share of each array) is written,
commit_success.txt is placed in it and the directory is renamed to <step>/.
Steps are found by listing directories whose name is a number, so a save killed
at any moment leaves only the temporary directory, which is never listed,
restored or counted towards `keep`: the step before it stays the latest. A
writable Checkpointer deletes such leftovers when it opens the directory. Old
steps beyond `keep` are deleted (rmtree) only after the newer step is committed,
so a kill during that deletion can leave an older, partly deleted <step>/
listed, never the latest; the next save deletes it again. On GCS, where renames
are not atomic, orbax writes into <step>/ directly and a step counts only once
its commit_success.txt exists.

Integrity: once a step is committed, process 0 writes <step>/manifest.sha256.json,
the size and sha256 of every file of the step (before the next save starts, or
when the run ends, so never while orbax writes or deletes). `verify` compares a
step with its manifest; train, eval and sample call it before restoring. A step
without a manifest (killed between the commit and the manifest, or written by an
older version) is "unverified": it is restored, and any failure to read it counts
as damage.

Several processes: every process calls `save` (each writes its shards of the
arrays and its own data_iter/process_<i>-of-<n>.json); process 0 alone writes
the metadata and step metadata and performs the rename once all have finished.
The checkpoint directory must be on a file system all processes share.
"""

import hashlib
import json
import os
import shutil
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from replaid_jax import errors
from replaid_jax import paths

STATE_KEYS = ("step", "params", "opt_state", "loss_stats")
MANIFEST = "manifest.sha256.json"
DAMAGED_DIR = "checkpoints_damaged"  # <workdir>/checkpoints_damaged/<step>-<time>: steps a resume set aside

OK, UNVERIFIED, DAMAGED = "ok", "unverified", "damaged"


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with paths.open_file(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _size(path: str) -> int:
  return os.path.getsize(path) if not paths.is_uri(path) else paths.path(path).stat().length


def _step_files(step_dir: str) -> list[str]:
  """Paths, relative to the step directory, of its files (the manifest itself excluded)."""
  if paths.is_uri(step_dir):
    rels = []
    todo = [(paths.path(step_dir), "")]
    while todo:
      folder, prefix = todo.pop()
      for child in folder.iterdir():
        if child.is_dir():
          todo.append((child, prefix + child.name + "/"))
        else:
          rels.append(prefix + child.name)
  else:
    rels = [os.path.relpath(os.path.join(r, n), step_dir) for r, _, names in os.walk(step_dir) for n in names]
  return sorted(rel for rel in rels if not rel.startswith(MANIFEST))


def write_manifest(step_dir: str) -> None:
  """Records the size and sha256 of every file of a committed step (atomically)."""
  files = {rel: {"size": _size(paths.join(step_dir, rel)), "sha256": _sha256(paths.join(step_dir, rel))}
           for rel in _step_files(step_dir)}
  paths.write_text_atomic(paths.join(step_dir, MANIFEST),
                          json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True))


def verify(step_dir: str) -> tuple[str, str]:
  """(OK | UNVERIFIED | DAMAGED, what is wrong) for one step directory against its manifest."""
  if not paths.isdir(step_dir):
    return DAMAGED, "its directory is missing"
  present = _step_files(step_dir)
  manifest = paths.join(step_dir, MANIFEST)
  if not paths.exists(manifest):
    if not present:
      return DAMAGED, "its directory is empty"
    return UNVERIFIED, "it has no checksum manifest"
  try:
    with paths.open_file(manifest) as f:
      files = json.load(f)["files"]
    files = {str(k): (int(v["size"]), str(v["sha256"])) for k, v in files.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    return DAMAGED, f"its checksum manifest cannot be read ({type(e).__name__})"
  problems = []
  present = set(present)
  for rel, (size, digest) in sorted(files.items()):
    full = paths.join(step_dir, rel)
    if rel not in present:
      problems.append(f"{rel} is missing")
    elif _size(full) != size:
      problems.append(f"{rel} has {_size(full)} bytes instead of {size}")
    elif _sha256(full) != digest:
      problems.append(f"{rel} does not match its checksum")
  if problems:
    more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
    return DAMAGED, "; ".join(problems[:2]) + more
  return OK, ""


def all_finite(tree: Any) -> bool:
  """Whether every floating-point leaf of a tree of arrays is finite (one device reduction, then one fetch)."""
  leaves = [x for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
  if not leaves:
    return True
  return bool(_all_finite(leaves))


@jax.jit
def _all_finite(leaves):
  return jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves]))


def checkpoint_dir(workdir: str) -> str:
  return paths.join(paths.absolute(workdir), "checkpoints")


class Checkpointer:
  """Saves and restores the items of a run under <workdir>/checkpoints."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, every_steps: int = 0,
               read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    if read_only and not paths.isdir(self.directory):
      raise errors.CheckpointError(
          f"no checkpoints at {self.directory}: point --workdir at a training run's directory "
          "(it holds checkpoints/), or train one first with launch/train.py."
      )
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=max(every_steps, 1),
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,  # leftovers of saves that were killed
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._read_only = read_only

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def step_dir(self, step: int) -> str:
    return paths.join(self.directory, str(step))

  def verify(self, step: int) -> tuple[str, str]:
    return verify(self.step_dir(step))

  def write_missing_manifests(self) -> None:
    """Process 0 writes the manifest of every committed step lacking one (call with no save in flight)."""
    if jax.process_index() != 0:
      return
    for step in self.all_steps():
      step_dir = self.step_dir(step)
      if paths.isdir(step_dir) and not paths.exists(paths.join(step_dir, MANIFEST)):
        try:
          write_manifest(step_dir)
        except FileNotFoundError:  # removed meanwhile
          pass

  def set_aside(self, steps: list[int]) -> list[str]:
    """Moves damaged steps out of the checkpoint directory (process 0), to <workdir>/checkpoints_damaged/."""
    moved = []
    if jax.process_count() > 1:  # every process has finished verifying before any step moves
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("replaid_before_set_aside")
    if jax.process_index() == 0:
      target = paths.join(os.path.dirname(self.directory), DAMAGED_DIR)
      paths.makedirs(target)
      for step in steps:
        dest = paths.join(target, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if paths.exists(self.step_dir(step)):
          if paths.is_uri(dest):
            paths.path(self.step_dir(step)).rename(dest)
          else:
            shutil.move(self.step_dir(step), dest)
          moved.append(dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("replaid_set_aside_damaged_steps")
    self.manager.reload()
    return moved

  def save(self, step: int, state: Any, data_iter: Any, metadata: dict, *, force: bool = False) -> bool:
    if force or self.manager.should_save(step):
      # The previous save is complete (orbax's save would wait for it too): its manifest can be written
      # now, while nothing writes or deletes step directories.
      self.manager.wait_until_finished()
      self.write_missing_manifests()
    items = {
        "state": ocp.args.StandardSave({k: getattr(state, k) for k in STATE_KEYS}),
        "ema_params": ocp.args.StandardSave(state.ema_params),
        "metadata": ocp.args.JsonSave(metadata),
    }
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def metadata(self, step: int) -> dict:
    self._require(step)
    out = self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    return out["metadata"]

  def restore_state(self, step: int, abstract_state: Any, data_iter: Any) -> Any:
    """Restores the full train state (and the iterator in place) onto abstract shardings."""
    self._require(step)
    items = {
        "state": ocp.args.StandardRestore({k: getattr(abstract_state, k) for k in STATE_KEYS}),
        "ema_params": ocp.args.StandardRestore(abstract_state.ema_params),
    }
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self._restore(step, items)
    return abstract_state.replace(ema_params=out["ema_params"], **out["state"])

  def restore_ema_params(self, step: int, abstract_params: Any) -> Any:
    self._require(step)
    return self._restore(step, {"ema_params": ocp.args.StandardRestore(abstract_params)})["ema_params"]

  def wait(self) -> None:
    self.manager.wait_until_finished()
    if not self._read_only:
      self.write_missing_manifests()

  def close(self) -> None:
    self.wait()
    self.manager.close()

  def _require(self, step: int) -> None:
    steps = self.all_steps()
    if step not in steps:
      raise errors.CheckpointError(
          f"no complete checkpoint for step {step} in {self.directory}; available steps: {steps or 'none'}."
      )

  def _restore(self, step: int, items: dict) -> Any:
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      status, why = self.verify(step)
      if status == DAMAGED:
        raise errors.CheckpointError(f"checkpoint step {step} in {self.directory} is damaged: {why}.") from e
      raise errors.CheckpointError(
          f"checkpoint step {step} in {self.directory} cannot be restored into the model built from its config "
          f"({'the files match their checksums, so ' if status == OK else ''}shapes or structure differ, or a file "
          f"is damaged): {str(e)[:600]}. Use the code version and config that wrote it."
      ) from e


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def read_arrays(workdir: str, step: int, item: str = "state") -> Any:
  """One item of a step ("state" or "ema_params") as numpy arrays, whatever mesh or process count wrote it."""
  path = paths.join(checkpoint_dir(workdir), str(step), item)
  if not paths.isdir(path):
    raise errors.CheckpointError(f"no item '{item}' of a complete checkpoint at {path}.")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as reader:
    tree = reader.metadata(path).item_metadata.tree
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return jax.tree.map(np.asarray, reader.restore(path, abstract))
