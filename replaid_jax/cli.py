"""What every launch binary shares: flag parsing with readable errors, and error reporting."""

import logging as py_logging
import os
import re
import sys
from typing import Callable

import ml_collections

from absl import app
from absl import flags
from absl import logging

from replaid_jax import errors
from replaid_jax import logs


def _explain(exc: BaseException, argv: list[str]) -> str:
  text = str(exc).strip("'\"")
  overrides = [a for a in argv if a.startswith("--config.")]
  if isinstance(exc, (AttributeError, KeyError)) and overrides:
    bad = [a.split("=", 1)[0][len("--config."):] for a in overrides if re.search(rf"\b{re.escape(text)}\b", a)]
    key = bad[0] if bad else text
    return (f"unknown config key '{key}' (from {', '.join('--config.' + b for b in bad) or 'the command line'}); "
            "every valid key is defined, with its meaning, in configs/base.py.")
  return f"{type(exc).__name__}: {exc}"


def flags_parser(argv: list[str]) -> list[str]:
  """absl's parser, with config-override mistakes reported in one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}\nPass --helpfull to see the flags.", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    print(f"error: {_explain(e, argv)}", file=sys.stderr)
    sys.exit(2)


def config(flag) -> "ml_collections.ConfigDict":
  """The parsed --config value; a file that cannot be loaded becomes a ConfigError naming it."""
  try:
    value = flag.value
    value.keys()  # a config that failed to load raises on first use
    return value
  except OSError as e:
    first = str(e).split("\n")
    detail = " ".join(line.strip() for line in first if line.strip())
    raise errors.ConfigError(f"the --config file could not be loaded ({detail}). Pass an existing config such as "
                             "configs/demo.py.") from None


class _QuietLibraries(py_logging.Filter):
  """Drops INFO records of orbax and jax's backend discovery (warnings and errors still pass)."""

  _NOISY = (f"{os.sep}orbax{os.sep}", "xla_bridge.py", f"{os.sep}grain{os.sep}")

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno > py_logging.INFO or not any(n in record.pathname for n in self._NOISY)


def run(main: Callable[[list[str]], None]) -> None:
  """app.run(main) where user-fixable errors end with their message and exit code 2, no traceback."""
  def wrapped(argv):
    for handler in py_logging.getLogger().handlers + [logging.get_absl_handler()]:
      handler.addFilter(_QuietLibraries())
    logs.quiet_orbax_notices()
    try:
      main(argv)
    except errors.ReplaidError as e:
      print(f"error: {e}", file=sys.stderr)  # once: not also logged
      sys.exit(2)

  app.run(wrapped, flags_parser=flags_parser)
