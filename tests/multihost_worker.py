"""One process of the multi-process engine test (`test_multihost.py`): a (data 4, model 2)
mesh over every process's fake CPU devices, the tiny model sharded over it, a batch of
requests through the fork/join engine and a batch through `Generator`; process 0 writes the
results as JSON.

  python -m tests.multihost_worker PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS OUT
"""
import json
import os
import sys


def main(pid: int, nproc: int, port: int, devices: int, out: str):
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  import jax
  import numpy as np
  # the package is imported before jax.distributed.initialize: importing it must allocate
  # nothing on a device (initialize refuses to run after any computation)
  from apr_jax import run  # noqa: F401  (a command-line module and what it imports)
  from apr_jax.engine import generate, host, host_original  # noqa: F401
  from apr_jax.evaluation import countdown  # noqa: F401
  from apr_jax.training import trainer  # noqa: F401
  from apr_jax.checkpoint.build import shard_model
  from apr_jax.engine.runner import Request, TreeEngine
  from apr_jax.engine.sampling import SamplingConfig
  from apr_jax.engine.tree import TreeSpec
  from apr_jax.model.sharding import make_mesh
  from tests import tree_fixtures as tf
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if nproc > 1:
    jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid)

  assert jax.device_count() == 8 and jax.local_device_count() == devices
  mesh = make_mesh(4, 2)
  model = shard_model(tf.tiny_model(), mesh)
  spec = TreeSpec(protocol=tf.PROTOCOLS["multiverse"], root_stop=(tf.EOS,), lanes=4, requests=2,
                  rows=3, threads=32, slots=256, log=2048, chunk=8, script=64, script_rows=16,
                  sampling=SamplingConfig(temperature=1.0), prefill=8, prefill_min=2)
  # "auto" step costs: each process times its own segments; process 0's fit decides
  eng = TreeEngine(model, None, spec, mesh=mesh, segment_steps=8, step_cost="auto")
  rng = np.random.default_rng(5)
  reqs = []
  for i in range(10):
    p, sc = tf.random_trajectory("multiverse", rng, blocks=1)
    reqs.append(Request(p, seed=i, script={(): sc[()][:sc[()].index(tf.FORK) + 1]},
                        max_thread_tokens=24, max_threads=8, deadline_s=600.0,
                        n=3 if i == 4 else 1))
  results = eng.run(reqs)
  assert eng.stats["prefill_calls"] > 0  # prompts written by the prefill program, a lane per shard
  # plain decoding on the same mesh: rows over the data axis
  gen = generate.Generator(model, None, mesh=mesh)
  toks, n_gen, _ = gen.generate_ids([r.prompt for r in reqs[:4]], max_new_tokens=12,
                                    sampling=SamplingConfig(temperature=1.0), stop_ids=[], seed=3)
  if pid == 0:
    with open(out, "w") as f:
      json.dump({"results": [r.summary() for r in results], "processes": jax.process_count(),
                 "generator": [t[:k].tolist() for t, k in zip(toks, n_gen)]}, f)


if __name__ == "__main__":
  a = sys.argv[1:]
  main(int(a[0]), int(a[1]), int(a[2]), int(a[3]), a[4])
