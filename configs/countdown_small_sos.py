"""Sequential Stream-of-Search model for the small Countdown setting (3 numbers in 1..30),
trained from scratch on a CPU: `python -m apr_jax.train --config configs/countdown_small_sos.py`."""
from ml_collections import ConfigDict

from apr_jax.training.trainer import train_config


def get_config():
  c = ConfigDict()
  c.workdir = "runs/countdown_small_sos"
  c.task = "countdown"
  c.setting = "small"
  c.beam = 0              # 0: the setting's default
  c.format = "sos"        # sos | apr | threadweaver | multiverse | sos_original | apr_original
  c.n_train = 12000
  c.n_test = 1000
  c.data_seed = 0
  c.init_from = ""        # "" (from scratch), "smollm2", or an apr_jax checkpoint
  c.vocab_size = 256
  c.model = ConfigDict(dict(arch="llama", dim=192, ffn_dim=512, n_layers=4, n_heads=4, n_kv_heads=4,
                            head_dim=48, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096,
                            tie_embeddings=True))
  c.seq_len = 1024
  c.max_groups = 64
  c.train = train_config(steps=600, batch_size=8, lr=2e-3, warmup=100, weight_decay=0.01,
                         clip=1.0, seed=0, ckpt_every=100, keep=3, log_every=10)
  return c
