"""Multi-process start-up and preemption: what a launch binary does before and around training.

Start-up (`initialize`): with an explicit coordinator (all three of
coordinator_address, num_processes, process_id) the processes join through it;
without one, `jax.distributed.initialize()` is called only where a cluster is
detected (Cloud TPU VMs and pods, SLURM job steps of more than one task, Open
MPI), and jax's own detection fills in the rest; otherwise the run stays one
process. CPU processes exchange collectives through gloo. Processes other than
0 log warnings and errors only (metrics, JSON and plots are written by process
0 alone, see metrics.MetricWriter).

Preemption (`handle_preemption`, `preemption_point`): SIGTERM (and SIGINT)
asks the train loop to stop at a step boundary, save a checkpoint and exit
cleanly. Every process must stop at the same step, because saving is
collective:
  * with jax.distributed initialised, jax's preemption sync manager catches
    SIGTERM on any process, tells the others through the coordinator, and
    `multihost_utils.reached_preemption_sync_point(step)` becomes true on all
    processes at the same step (the largest step any process had reached,
    plus one); SIGINT and a Cloud TPU maintenance notice are routed to it by
    sending the process SIGTERM. While the manager runs, a second SIGTERM
    does not end the process (jax's handler swallows it); SIGKILL does.
  * in a single process without it, a Python handler sets a flag, read at
    every step;
  * with several processes but the jax preemption service disabled
    (jax_enable_preemption_service=False), the flags are combined with an
    all-gather every `FALLBACK_SYNC_EVERY` steps.
A second SIGINT raises KeyboardInterrupt at once.

CPU devices (`cpu_devices_for`, `split_cpu`): a single CPU process shows its
cores to JAX as several devices (mesh.cpu_devices), over which the batch is
split; see the comment above `MAX_AUTO_CPU_DEVICES`.
"""

import contextlib
import glob
import math
import os
import re
import signal
import threading
import time
from typing import Any, Iterator, Sequence

from absl import flags
from absl import logging
import jax
import numpy as np

from replaid_jax import errors

# With several processes and no jax preemption service, how often (in steps) the
# processes compare their preemption flags: one small all-gather per interval.
FALLBACK_SYNC_EVERY = 10

# Environment variables that mark a multi-host TPU job (GKE, multislice, pods).
_TPU_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS", "CLOUD_TPU_TASK_ID")
# What jax's SLURM detection reads: present inside `srun` job steps.
_SLURM_ENV = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def define_flags() -> None:
  """Defines --coordinator_address, --num_processes and --process_id (once per program)."""
  if "coordinator_address" in flags.FLAGS:
    return
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 for a multi-process run (with --num_processes and --process_id); "
                      "leave unset on TPU pods and SLURM, where it is detected.")
  flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index in [0, --num_processes).")


def detect_cluster() -> str | None:
  """The cluster kind whose environment marks this process as one of several, or None."""
  if any(os.environ.get(name) for name in _TPU_ENV) or _tpu_chips() > 0:
    return "tpu"
  if all(name in os.environ for name in _SLURM_ENV) and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in os.environ:
    return "openmpi"
  return None


# Google's PCI vendor id, and the device ids of its TPU chips up to TPU7x. Google's virtual NIC and NVMe disks share
# the vendor id (PCI classes 0x01 storage, 0x02 network); an unknown Google device of another class (a TPU generation
# newer than this list) is counted too.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


_PCI_DEVICES = "/sys/bus/pci/devices"


def _tpu_chips() -> int:
  """TPU chips on this host, read from PCI ids (under _PCI_DEVICES) without starting a backend (0 when unknown)."""
  chips = 0
  for vendor in glob.glob(os.path.join(_PCI_DEVICES, "*", "vendor")):
    directory = os.path.dirname(vendor)
    try:
      if _read(vendor) != _GOOGLE_PCI_VENDOR:
        continue
      device, pci_class = _read(os.path.join(directory, "device")), _read(os.path.join(directory, "class"))
    except OSError:
      continue
    if device in _TPU_PCI_DEVICES or not pci_class.startswith(("0x01", "0x02")):
      chips += 1
  return chips


def _read(path: str) -> str:
  with open(path, encoding="ascii") as f:
    return f.read().strip()


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_devices: int | None = None) -> bool:
  """Joins a multi-process run when one is configured or detected; returns whether jax.distributed started.

  Call before anything touches a jax device. `cpu_devices` (from
  `cpu_devices_for`) is how many devices the CPU backend shows when the run stays
  one process (see `split_cpu`); None leaves the backend as it is.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
    raise errors.ConfigError("--coordinator_address, --num_processes and --process_id go together; set all three "
                             "(or none, on TPU pods and SLURM, where they are detected).")
  if "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1 and "SLURM_PROCID" not in os.environ:
    logging.warning("SLURM_NTASKS=%s but no SLURM_PROCID: start each process with srun to train on all tasks; "
                    "running as one process.", os.environ["SLURM_NTASKS"])
  cluster = "explicit" if coordinator_address is not None else detect_cluster()
  if cluster is None:
    split_cpu(cpu_devices)
    return False
  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    # Cross-process collectives of CPU devices (ignored by GPU and TPU backends).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if cluster == "explicit":
    # Every local device, without consulting cluster environments.
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, cluster_detection_method="deactivate")
  else:
    jax.distributed.initialize()
  logging.info("jax.distributed (%s): process %d of %d, %d local / %d global device(s)", cluster,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def initialize_from_flags(cpu_devices: int | None = None) -> bool:
  """`initialize` with the values of the flags from `define_flags`; quiets logs of processes other than 0."""
  fl = flags.FLAGS
  started = initialize(fl.coordinator_address, fl.num_processes, fl.process_id, cpu_devices)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  return started


# ---- CPU devices.
#
# XLA:CPU runs one device's program with intra-op parallelism: its large matmuls use every core, while much
# of a train step's other work (copies, fills, elementwise fusions, the scan's slices) runs one op at a time.
# Shown as several devices, a single process splits the batch over them and runs their programs side by
# side. The demo's train step then ran about 1.13x faster on 2 cores (paired processes; part of the gain
# comes with the client holding several devices, not from the split batch alone: docs/performance.md).
# Values do not depend on the split (data-parallel steps equal one-device steps to float rounding), and a
# run resumes across device counts. Multi-process runs keep the backend's own count.

# The most CPU devices that mesh.cpu_devices = 0 chooses (one per core up to this; measured on 2 cores only).
MAX_AUTO_CPU_DEVICES = 8


def usable_cores() -> int:
  """CPU cores this process may run on (its affinity mask where the OS has one)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def cpu_count_fixed_by() -> str | None:
  """What already fixes the CPU backend's device count (a jax option or XLA flag the user set), or None."""
  if jax.config.jax_num_cpu_devices >= 0:
    return f"jax_num_cpu_devices={jax.config.jax_num_cpu_devices} (JAX_NUM_CPU_DEVICES or --jax_num_cpu_devices)"
  if re.search(r"--xla_force_host_platform_device_count\b", os.environ.get("XLA_FLAGS", "")):
    return "--xla_force_host_platform_device_count in XLA_FLAGS"
  return None


def cpu_devices_for(setting: int, batch_rows: Sequence[int], mesh_shape: Sequence[int],
                    cores: int | None = None) -> int | None:
  """The CPU device count for `mesh.cpu_devices` = `setting`; None where the choice is left to the backend.

  Args:
    setting: n > 0 asks for n devices; 0 chooses: one per usable core (at most
      MAX_AUTO_CPU_DEVICES), lowered to the largest count that divides every
      entry of `batch_rows`, and only for a mesh whose shape is one -1 with 1s
      elsewhere (any other shape names its own device counts: left alone).
    batch_rows: the batch sizes the mesh splits (train micro-batch, eval batch).
    mesh_shape: mesh.shape.
    cores: usable cores (default: `usable_cores()`).
  """
  if setting < 0:
    raise errors.ConfigError(f"mesh.cpu_devices={setting} must be 0 (one per core) or a device count.")
  if setting:
    return setting
  if sorted(mesh_shape) != [-1] + [1] * (len(mesh_shape) - 1):
    return None
  rows = math.gcd(*(int(r) for r in batch_rows if r))
  most = min(cores or usable_cores(), MAX_AUTO_CPU_DEVICES)
  return max(n for n in range(1, most + 1) if rows % n == 0) if rows else 1


def cpu_devices_of(cd: Any, mesh_shape: Sequence[int] | None = None) -> int | None:
  """`cpu_devices_for` a training config (ConfigDict): its micro-batch and eval batch, its mesh (or `mesh_shape`)."""
  t = cd.train
  rows = (t.batch_size // max(t.grad_accum_steps, 1), cd.eval.batch_size)
  return cpu_devices_for(cd.mesh.cpu_devices, rows, tuple(mesh_shape or cd.mesh.shape))


def split_cpu(count: int | None) -> bool:
  """Makes the CPU backend show `count` devices (None: as it is); returns whether it did.

  Call before anything starts a jax backend. A count the user fixed already
  (`cpu_count_fixed_by`) is kept, as is a backend already started. Other
  backends (GPU, TPU) are not affected: a GPU run's CPU devices go unused.
  """
  if count is None:
    return False
  fixed = cpu_count_fixed_by()
  if fixed:
    if count != 1:
      logging.info("CPU devices: %s is set; not splitting the host into %d", fixed, count)
    return False
  if count == 1:
    return False
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:
    logging.warning("CPU devices: a jax backend has started already; staying with its devices, not %d", count)
    return False
  logging.info("CPU devices: %d (mesh.cpu_devices; the batch is split over them, %d usable cores)", count,
               usable_cores())
  return True


def _sync_manager_active() -> bool:
  """Whether jax's preemption sync manager runs: jax.distributed started it, unless the service is disabled."""
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class _Watcher:
  """Signal handlers and the flag they set."""

  def __init__(self):
    self.requested = threading.Event()
    self.reason = ""
    self.synced = _sync_manager_active()
    self._previous = {}

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return  # signal handlers can only be set from the main thread
    self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_signal)
    if not self.synced:  # else jax's preemption notifier owns SIGTERM
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)

  def uninstall(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _on_signal(self, signum, frame):
    del frame
    if self.requested.is_set() and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.request(signal.Signals(signum).name)

  def request(self, reason: str) -> None:
    """Asks every process to stop at a common step boundary."""
    first = not self.requested.is_set()
    self.reason = self.reason or reason
    self.requested.set()
    if first and self.synced:
      os.kill(os.getpid(), signal.SIGTERM)  # jax's notifier propagates it to every process


_watcher: _Watcher | None = None


@contextlib.contextmanager
def handle_preemption(*, watch_maintenance: bool = True) -> Iterator[None]:
  """Within the block, SIGTERM/SIGINT make `preemption_point` true at a step boundary.

  Call after `initialize`. On Cloud TPU VMs, a pending host maintenance event
  (GCE metadata) counts as a preemption notice too.
  """
  global _watcher
  watcher = _Watcher()
  watcher.install()
  _watcher = watcher
  if watch_maintenance and _tpu_chips() > 0:
    threading.Thread(target=_watch_maintenance_event, args=(watcher,), daemon=True,
                     name="maintenance-event").start()
  try:
    yield
  finally:
    watcher.uninstall()
    _watcher = None


def preemption_point(step: int) -> bool:
  """True when all processes should save and stop after `step`; call at every step, on every process.

  Without `handle_preemption` (library use) only jax's own preemption sync
  manager, when running, can make it true.
  """
  if _sync_manager_active():
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(multihost_utils.reached_preemption_sync_point(step))
  local = _watcher is not None and _watcher.requested.is_set()
  if jax.process_count() == 1:
    return local
  if step % FALLBACK_SYNC_EVERY:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.asarray([local], np.int32))))


def preemption_reason() -> str:
  """The signal or event that asked for the stop ('' when it came from another process)."""
  return _watcher.reason if _watcher is not None else ""


def _watch_maintenance_event(watcher: _Watcher) -> None:
  """Long-polls the GCE metadata server; any maintenance event other than NONE requests a stop.

  Gives up quietly where there is no metadata server.
  """
  import urllib.request  # pylint: disable=g-import-not-at-top
  host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
  url = f"http://{host}/computeMetadata/v1/instance/maintenance-event?wait_for_change=true"
  failures = 0
  while failures < 3 and not watcher.requested.is_set():
    try:
      req = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
      with urllib.request.urlopen(req, timeout=3600) as resp:
        event = resp.read().decode().strip()
      failures = 0
    except Exception:  # pylint: disable=broad-except
      failures += 1
      time.sleep(10.0)
      continue
    if event and event.upper() != "NONE":
      logging.warning("host maintenance event %s: saving and stopping at the next step", event)
      watcher.request(f"maintenance event {event}")
      return
