"""The shipped APR model's second stage (settings shared with `countdown_small_sos_long.py`):
the checkpoint at step 2200 of a 4000-step cosine schedule, continued from
`countdown_small_apr.py` (600 steps) on 20,000 problems:

  python -m apr_jax.train --config configs/countdown_small_apr.py
  python -m apr_jax.train --config configs/countdown_small_apr_long.py
"""
from apr_jax.config_files import sibling

_apr = sibling(__file__, "countdown_small_apr").get_config
second_stage = sibling(__file__, "countdown_small_sos_long").second_stage


def get_config():
  return second_stage(_apr(), "countdown_small_apr")
