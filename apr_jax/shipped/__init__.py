"""Models shipped with the package (small orbax checkpoints with their tokenizer and config).

`countdown_small_sos`: sequential Stream-of-Search; `countdown_small_apr`: APR fork/join.
Both were trained on this project's CPU machine (`configs/countdown_small_*.py`)."""
from __future__ import annotations

import os

from apr_jax.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))


def resolve(path: str) -> str:
  """A shipped model name ("countdown_small_apr") or a path."""
  cand = os.path.join(HERE, path)
  if os.path.isdir(cand) and os.path.exists(os.path.join(cand, "apr_config.json")):
    return cand
  if os.path.isdir(path):
    return path
  raise UserError(f"no model at {path!r} (and no shipped model of that name in {HERE})")
