"""The shipped APR model's second stage (settings shared with `countdown_small_sos_long.py`):
the checkpoint at step 2200 of a 4000-step cosine schedule, continued from
`countdown_small_apr.py` (600 steps) on 20,000 problems:

  python -m apr_jax.train --config configs/countdown_small_apr.py
  python -m apr_jax.train --config configs/countdown_small_apr_long.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from countdown_small_apr import get_config as _apr  # noqa: E402
from countdown_small_sos_long import second_stage  # noqa: E402


def get_config():
  return second_stage(_apr(), "countdown_small_apr")
