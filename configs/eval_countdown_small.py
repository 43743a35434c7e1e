"""Evaluate the shipped sequential and parallel Countdown models on held-out problems of the
small setting: `python -m apr_jax.eval --config configs/eval_countdown_small.py --num_problems 500 --seed 0 --out eval_out`."""
from ml_collections import ConfigDict, FieldReference


def get_config():
  c = ConfigDict()
  c.task = "countdown"
  c.setting = "small"
  c.n_train = 12000        # the training split's size and seed: the test split is disjoint
  c.n_test = 1000
  c.data_seed = 0
  c.methods = ConfigDict({"sequential": {"path": "countdown_small_sos"},
                          "parallel": {"path": "countdown_small_apr"},
                          # the parallel model through the host-orchestrated baseline
                          "parallel_host": {"path": "countdown_small_apr", "engine": "host"}})
  c.lanes = 32
  c.rows = 8
  c.requests_per_lane = 1  # requests in flight per lane (sharing its rows, pool and log)
  # KV slots per lane; "auto" (also --config.slots=auto): the most that fit in device memory
  c.slots = FieldReference(1536, field_type=object)
  c.dtype = "auto"         # parameters and KV: auto = bfloat16 on GPU/TPU, float32 on CPU
  c.attention = "tree"     # "tree": read only the KV each step sees; "dense": every slot (the
                           # reference); "pallas": the TPU kernel (interpreted off TPU: slow)
  c.batch = 128
  c.max_thread_tokens = 1536
  c.max_total_tokens = 6000
  # step sizes by measured cost (more problems/s on a CPU); "" = cover the busiest lane, the
  # schedule that depends on nothing but the problems (outputs differ only if a total-token
  # budget cuts in)
  c.step_cost = "auto"
  return c
