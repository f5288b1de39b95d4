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


def _unknown_key(exc: BaseException, argv: list[str]) -> str | None:
  """'unknown config key train.nmu_steps; did you mean train.num_steps?' for ml_collections' KeyError or
  AttributeError about an override, or None when `exc` is not about one."""
  inner: object = exc
  while isinstance(inner, BaseException) and inner.args:  # AttributeError(KeyError("'key'\nDid you mean ..."))
    inner = inner.args[0]
  text = str(inner)
  first = text.split("\n", 1)[0].strip().strip("'\"")
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    parts = arg.split("=", 1)[0][len("--config."):].split(".")
    if first in parts:
      key = ".".join(parts)
      hint = ""
      if suggestion:
        fixed = [suggestion[1] if p == first else p for p in parts]
        hint = f"; did you mean {'.'.join(fixed)}?"
      return f"unknown config key {key}{hint}"
  return None


def _explain(exc: BaseException, argv: list[str], only_section: str | None = None, why: str = "") -> str:
  if only_section:
    others = [a.split("=", 1)[0] for a in argv
              if a.startswith("--config.") and not a.startswith(f"--config.{only_section}.")]
    if others:
      return (f"{', '.join(others)}: only --config.{only_section}.KEY=VALUE overrides are accepted (only "
              f"{only_section}.* keys can be set{'; ' + why if why else ''}).")
  if isinstance(exc, (AttributeError, KeyError)):
    unknown = _unknown_key(exc, argv)
    if unknown:
      return f"{unknown} (every valid key is defined, with its meaning, in replaid_jax/base_config.py)."
  return f"{type(exc).__name__}: {exc}"


# (section, why) of a binary whose --config holds one section only (define_section_config).
_ONLY_SECTION: tuple[str | None, str] = (None, "")


def _experiment_configs_importable(argv: list[str]) -> None:
  """Puts the folder that holds `configs/` first on sys.path, so that a --config file can `from configs import base`.

  `configs` is a folder of the repository, not an installed package (that name would clash with others): the
  folder is the parent of a --config file's `configs/` folder, or else the working directory when it holds one.
  """
  roots = []
  for i, arg in enumerate(argv):
    path = arg.split("=", 1)[1] if arg.startswith("--config=") else (
        argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
    folder = os.path.dirname(os.path.abspath(path.split(":", 1)[0])) if path else ""
    if os.path.basename(folder) == "configs":
      roots.append(os.path.dirname(folder))
  if os.path.isfile(os.path.join(os.getcwd(), "configs", "__init__.py")):
    roots.append(os.getcwd())
  for root in reversed(roots):
    if root not in sys.path:
      sys.path.insert(0, root)


def flags_parser(argv: list[str]) -> list[str]:
  """absl's parser, with config-override mistakes reported in one line instead of a traceback."""
  _experiment_configs_importable(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}\nPass --helpfull to see the flags.", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    print(f"error: {_explain(e, argv, *_ONLY_SECTION)}", file=sys.stderr)
    sys.exit(2)


def define_section_config(section: str, values: "ml_collections.ConfigDict", what: str, why: str):
  """--config holding one config section, whose --config.SECTION.KEY=VALUE overrides alone are accepted.

  `--help` lists the section's keys and defaults on a few lines (not as YAML). Overrides are read when the flag
  is defined, so a bad one ends here with one line; `why` says where the other sections come from.
  """
  global _ONLY_SECTION
  _ONLY_SECTION = (section, why)
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  keys = ", ".join(f"{k}={v!r}" for k, v in sorted(values.items()))
  try:
    holder = config_flags.DEFINE_config_dict(
        "config", ml_collections.ConfigDict({section: values}),
        f"{what}: only --config.{section}.KEY=VALUE overrides are read ({why}). Keys and defaults: {keys}; "
        "each is described in replaid_jax/base_config.py.", lock_config=True)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    print(f"error: {_explain(e, sys.argv, section, why)}", file=sys.stderr)
    sys.exit(2)
  flags.FLAGS["config"].default_as_str = None  # the keys are in the help text
  return holder


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
