"""APR fork/join model for the small Countdown setting (the parent spawns sub searches with
fresh contexts): the sequential config with the single-token APR format (`apr_tok`) and
shorter rows (each thread is its own sequence). `python -m apr_jax.train --config configs/countdown_small_apr.py`."""
from apr_jax.config_files import sibling

_sos = sibling(__file__, "countdown_small_sos").get_config


def get_config():
  c = _sos()
  c.workdir = "runs/countdown_small_apr"
  c.format = "apr_tok"
  c.seq_len = 512
  c.train.batch_size = 16
  return c
