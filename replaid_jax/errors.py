"""Errors a user can fix by changing a config value, a file or a path.

Each message names the problem and the fix. The launch binaries catch
`ReplaidError` and print its message without a traceback.
"""


class ReplaidError(Exception):
  """Base of the errors a user can fix; the launch binaries print them without a traceback."""


class ConfigError(ReplaidError):
  """A config value is invalid or inconsistent with another one."""


class DataError(ReplaidError):
  """Input data, a data file or a tokenizer cannot be used as given."""


class CheckpointError(ReplaidError):
  """A checkpoint is missing, incomplete or does not match the config."""


class TrainingError(ReplaidError):
  """Training cannot go on (for example a non-finite loss); checkpoints already written are intact."""
