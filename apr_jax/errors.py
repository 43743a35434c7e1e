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
