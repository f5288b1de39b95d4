"""The shuffled, per-process batching that every training source shares (in-memory rows or shards)."""

from typing import Callable

from absl import flags
import grain
import numpy as np

from replaid_jax.errors import ConfigError


def check_batching(*, global_batch: int, process_index: int, process_count: int, num_workers: int) -> None:
  """Clear errors for a batch/process layout `batch_iterator` cannot serve."""
  if global_batch < 1:
    raise ConfigError(
        f"The global batch size is {global_batch}. Set train.batch_size to a"
        " positive number of sequences.")
  if global_batch % process_count:
    raise ConfigError(
        f"The global batch size {global_batch} does not divide by the"
        f" {process_count} processes. Set train.batch_size to a multiple of"
        f" {process_count}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
  if num_workers < 0:
    raise ConfigError(
        f"data.num_workers={num_workers} is negative. Use 0 (read in the main"
        " process) or a positive number of worker processes.")


def batch_iterator(num_rows: int, gather: Callable[[np.ndarray], dict], *, global_batch: int, seed: int,
                   process_index: int, process_count: int, num_workers: int) -> grain.DatasetIterator:
  """Rows 0..num_rows-1 shuffled with `seed`, reshuffled every epoch, cut into global batches.

  Process `p` receives rows [p * b, (p + 1) * b) of each global batch
  (b = global_batch // process_count), turned into a batch by `gather` (a
  picklable grain.transforms.Map taking the row indices). The iterator
  supports get_state() / set_state() and grain.checkpoint; a state is only
  valid for the same num_workers. With num_workers > 0, call close() when done.
  """
  per_process = global_batch // process_count
  ds = (grain.MapDataset.range(num_rows)
        .shuffle(seed=seed % 2**32)
        .repeat()
        .batch(per_process, drop_remainder=True)
        [process_index::process_count]
        .map(gather))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read absl flags; outside absl.app (tests,
      # notebooks) use their defaults.
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it_ds)
