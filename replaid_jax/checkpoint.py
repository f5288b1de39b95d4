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

Several processes: every process calls `save` (each writes its shards of the
arrays and its own data_iter/process_<i>-of-<n>.json); process 0 alone writes
the metadata and step metadata and performs the rename once all have finished.
The checkpoint directory must be on a file system all processes share.
"""

import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from replaid_jax import errors

STATE_KEYS = ("step", "params", "opt_state", "loss_stats")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  """Saves and restores the items of a run under <workdir>/checkpoints."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, every_steps: int = 0,
               read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    if read_only and not os.path.isdir(self.directory):
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

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any, metadata: dict, *, force: bool = False) -> bool:
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

  def close(self) -> None:
    self.manager.wait_until_finished()
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
      raise errors.CheckpointError(
          f"checkpoint step {step} in {self.directory} does not fit the model built from its config "
          f"(shapes or structure differ): {str(e)[:600]}. Use the code version and config that wrote it."
      ) from e


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def read_arrays(workdir: str, step: int, item: str = "state") -> Any:
  """One item of a step ("state" or "ema_params") as numpy arrays, whatever mesh or process count wrote it."""
  path = os.path.join(checkpoint_dir(workdir), str(step), item)
  if not os.path.isdir(path):
    raise errors.CheckpointError(f"no item '{item}' of a complete checkpoint at {path}.")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as reader:
    tree = reader.metadata(path).item_metadata.tree
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return jax.tree.map(np.asarray, reader.restore(path, abstract))
