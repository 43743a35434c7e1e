"""The sequential (SoS) model's second stage, the exact twin of `countdown_small_apr_long.py`:
continue `countdown_small_sos.py` (600 steps) on 20,000 problems with the same 4000-step
schedule, stopped at step 2200, so that both shipped models have the same training budget:

  python -m apr_jax.train --config configs/countdown_small_sos.py
  python -m apr_jax.train --config configs/countdown_small_sos_long.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from countdown_small_sos import get_config as _sos  # noqa: E402


def get_config():
  c = _sos()
  c.workdir = "runs/countdown_small_sos_long"
  c.init_from = "runs/countdown_small_sos/model"   # the first stage's export
  c.n_train = 20000
  c.train.steps = 4000
  c.train.stop_at = 2200
  c.train.lr = 1.5e-3
  c.train.warmup = 50
  c.train.seed = 1
  c.train.ckpt_every = 50
  c.train.keep = 2
  return c
