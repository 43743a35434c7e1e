"""APR fork/join model for the small Countdown setting (the parent spawns sub searches with
fresh contexts): the sequential config with the APR format and shorter rows (each thread is
its own sequence). `python -m apr_jax.train --config configs/countdown_small_apr.py`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from countdown_small_sos import get_config as _sos  # noqa: E402


def get_config():
  c = _sos()
  c.workdir = "runs/countdown_small_apr"
  c.format = "apr"
  c.seq_len = 512
  c.train.batch_size = 16
  return c
