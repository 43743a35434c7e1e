"""APR's paper setting (Pan et al. 2025): a Llama-2-style decoder with 228M non-embedding
parameters (18 layers, hidden 1024, 16 heads), 4k context, 4-number Countdown (1..99, target
10..100), trained on the original APR format (`apr_original`: each call of the original's
search, plain-text tags; run with `--protocol apr`). Meant for a TPU/GPU: runs unchanged there
(`python -m apr_jax.train --config configs/countdown_apr_paper.py`); the tests build it and
run two steps with a reduced batch and sequence on CPU."""
from ml_collections import ConfigDict

from apr_jax.training.trainer import train_config


def get_config():
  c = ConfigDict()
  c.workdir = "runs/countdown_apr_paper"
  c.task = "countdown"
  c.setting = "apr"
  c.beam = 0
  c.format = "apr_original"
  c.n_train = 500_000
  c.n_test = 1000
  c.data_seed = 0
  c.init_from = ""
  c.vocab_size = 1024
  c.model = ConfigDict(dict(arch="llama", dim=1024, ffn_dim=2816, n_layers=18, n_heads=16,
                            n_kv_heads=16, head_dim=64, norm_eps=1e-5, rope_theta=10000.0,
                            max_seq_len=4096, tie_embeddings=False))
  c.seq_len = 4096
  c.max_groups = 256
  # the batch is split over every device (params replicated, gradients all-reduced) and each
  # layer is recomputed in the backward (64 x 4k tokens do not fit one accelerator otherwise);
  # bfloat16 compute on float32 master weights. The device count must divide batch_size (or
  # set train.data_parallel to one that does).
  c.train = train_config(steps=20000, batch_size=64, lr=3e-4, warmup=1000, weight_decay=0.1,
                         clip=1.0, seed=0, ckpt_every=1000, keep=3, log_every=50,
                         data_parallel=0, remat=True, compute_dtype="bfloat16")
  return c
