"""Fine-tune the pretrained SmolLM2-135M-Instruct on ThreadWeaver-format Countdown
trajectories: the protocol tags are added to its vocabulary (rows = mean of the tag word's
pieces), then supervised training on packed thread trees (ThreadWeaver's trie).
`python -m apr_jax.train --config configs/smollm2_threadweaver_sft.py`"""
from ml_collections import ConfigDict

from apr_jax.training.trainer import train_config


def get_config():
  c = ConfigDict()
  c.workdir = "runs/smollm2_threadweaver_sft"
  c.task = "countdown"
  c.setting = "small"
  c.beam = 2              # short traces: two candidate moves per node
  c.format = "threadweaver"
  c.n_train = 2000
  c.n_test = 1000
  c.data_seed = 0
  c.init_from = "smollm2"
  c.vocab_size = 0        # unused: the pretrained tokenizer is grown with the tags
  c.model = ConfigDict()  # unused: the pretrained architecture
  c.seq_len = 2048
  c.max_groups = 64
  c.train = train_config(steps=200, batch_size=2, lr=5e-5, warmup=20, weight_decay=0.0,
                         clip=1.0, seed=0, ckpt_every=50, keep=2, log_every=5)
  return c
