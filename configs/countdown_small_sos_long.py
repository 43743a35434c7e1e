"""The sequential (SoS) model's second stage; `countdown_small_apr_long.py` is its twin (the
same settings via `second_stage`), so both shipped models have the same training budget:
continue the 600-step first stage on 20,000 problems with a 4000-step cosine schedule, cut at
step 2200 (`train.stop_at`; lowering `train.steps` instead would change the schedule):

  python -m apr_jax.train --config configs/countdown_small_sos.py
  python -m apr_jax.train --config configs/countdown_small_sos_long.py
"""
from apr_jax.config_files import sibling

_sos = sibling(__file__, "countdown_small_sos").get_config


def second_stage(c, first: str):
  """Continues the first stage `first` (its workdir under runs/) with the long schedule."""
  c.workdir = f"runs/{first}_long"
  c.init_from = f"runs/{first}/model"   # the first stage's export
  c.n_train = 20000
  c.train.steps = 4000
  c.train.stop_at = 2200
  c.train.lr = 1.5e-3
  c.train.warmup = 50
  c.train.seed = 1
  c.train.ckpt_every = 50
  c.train.keep = 2
  return c


def get_config():
  return second_stage(_sos(), "countdown_small_sos")
