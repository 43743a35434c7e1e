"""Evaluate a checkpoint in the original APR format (plain-text tags, e.g. a released APR
model converted to a Hugging Face directory) as the original evaluation runs and scores it,
on held-out problems of the APR setting (4 numbers, target first):
`python -m apr_jax.eval --config configs/eval_apr_original.py --config.methods.apr.path=DIR --num_problems 500 --out eval_out`."""
from ml_collections import ConfigDict


def get_config():
  c = ConfigDict()
  c.task = "countdown"
  c.setting = "apr"
  c.n_test = 1000
  c.data_seed = 0
  # engine "apr_device": the original protocol in the on-device engine, as `run --protocol
  # apr` runs it; "apr_original": the original's orchestration of calls on the host
  # (engine/host_original.py, `run --protocol apr --apr_host`)
  c.methods = ConfigDict({"apr": {"path": "", "engine": "apr_device"}})
  c.max_call_tokens = 4096  # each call's budget (the original's --max_tokens)
  c.max_total_tokens = 16384  # apr_device: sampled tokens per search, every call and child
  c.max_threads = 32         # apr_device: threads per search, the root included
  c.lanes = 8               # apr_device: lanes, thread rows per lane, KV slots per lane
  c.rows = 8
  c.slots = 16384
  c.batch = 64              # apr_original: problems per round of batched calls
  c.dtype = "auto"
  return c
