"""The shipped APR model's second stage: continue `countdown_small_apr.py` (600 steps) on more
problems with a longer schedule. The shipped model is this run's checkpoint at step 2200 of
the 4000-step cosine schedule (`train.stop_at`: the run was cut short for time; lowering
`train.steps` instead would change the schedule):

  python -m apr_jax.train --config configs/countdown_small_apr.py
  python -m apr_jax.train --config configs/countdown_small_apr_long.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from countdown_small_apr import get_config as _apr  # noqa: E402


def get_config():
  c = _apr()
  c.workdir = "runs/countdown_small_apr_long"
  c.init_from = "runs/countdown_small_apr/model"   # the first stage's export
  c.n_train = 20000
  c.train.steps = 4000
  c.train.stop_at = 2200
  c.train.lr = 1.5e-3
  c.train.warmup = 50
  c.train.seed = 1
  c.train.ckpt_every = 50
  c.train.keep = 2
  return c
