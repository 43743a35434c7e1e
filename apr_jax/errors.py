"""User-facing errors: one clear line and a non-zero exit, never a traceback."""
from __future__ import annotations

import functools
import os
import sys


class UserError(Exception):
  """A mistake in the user's input (path, file, flag value, prompt length...)."""


def cli_main(fn):
  """Wraps an absl `main(argv)` so user mistakes print one line and exit 2.

  Set APR_JAX_DEBUG=1 to see the full traceback instead.
  """

  @functools.wraps(fn)
  def wrapper(argv):
    try:
      return fn(argv)
    except UserError as e:
      if os.environ.get("APR_JAX_DEBUG"):
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      sys.exit(130)

  return wrapper


def parse_flags(argv):
  """absl `flags_parser` for `app.run`: a bad flag or config override (an unknown
  `--config.x.y` key, a value of the wrong type, a config file that fails to load) prints
  one line and exits 2 instead of a traceback."""
  from absl import flags
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS.config is not None:
      getattr(flags.FLAGS.config, "keys")  # a config file that failed to load raises here
    return rest
  except Exception as e:  # noqa: BLE001 - config_flags raises plain Attribute/Key/OSErrors
    if os.environ.get("APR_JAX_DEBUG"):
      raise
    unknown = isinstance(e, (AttributeError, KeyError))
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    msg = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    if unknown:
      msg = f"unknown config key {msg}"
    print("error: " + " ".join(str(msg).split()), file=sys.stderr)
    sys.exit(2)
