"""Log hygiene shared by the library and the launch binaries: orbax's by-design notices are not warnings here."""

import logging
import os


class OrbaxNotices(logging.Filter):
  """Drops the WARNING records orbax writes whenever a checkpoint is opened read-only or one item is read alone.

  They describe intended behaviour, not a problem: the options that read-only mode overrides, that the directory
  is read-only, and that an item directory has no _CHECKPOINT_METADATA of its own (only the step has one; the
  reader then falls back to the item's array metadata). Every other orbax warning passes.
  """

  _MESSAGES = ("CheckpointManagerOptions.read_only=True, setting", "Given directory is read only")

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno != logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    msg = str(record.msg)
    if msg.startswith(self._MESSAGES):
      return False
    if msg.startswith("Metadata file does not exist"):
      return not (record.args and str(record.args[0]).endswith("_CHECKPOINT_METADATA"))
    return True


def quiet_orbax_notices() -> None:
  """Installs `OrbaxNotices` on the absl logger, through which orbax logs (idempotent)."""
  logger = logging.getLogger("absl")
  if not any(isinstance(f, OrbaxNotices) for f in logger.filters):
    logger.addFilter(OrbaxNotices())
