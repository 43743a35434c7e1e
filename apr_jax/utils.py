"""Small process-level helpers shared by the command-line entry points."""
from __future__ import annotations

import os


def setup_jax():
  """Multi-host init (launch/*.sh set APR_JAX_DISTRIBUTED=1) and a persistent XLA
  compilation cache, so a second run of the same shapes starts fast."""
  import jax
  if os.environ.get("JAX_CPU_COLLECTIVES"):  # e.g. gloo: CPU processes that share a mesh
    jax.config.update("jax_cpu_collectives_implementation", os.environ["JAX_CPU_COLLECTIVES"])
  if os.environ.get("APR_JAX_DISTRIBUTED") == "1":
    kw = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
      kw = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                process_id=int(os.environ["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kw)
  cache = os.environ.get("APR_JAX_CACHE_DIR", os.path.expanduser("~/.cache/apr_jax/xla"))
  if cache and cache != "off":
    try:
      os.makedirs(cache, exist_ok=True)
      jax.config.update("jax_compilation_cache_dir", cache)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except OSError:
      pass  # a read-only home must not stop the run


def apply_config_file(flags_module, config):
  """Values of an ml_collections config fill the flags the user did not set explicitly."""
  from apr_jax.errors import UserError
  if config is None:
    return
  F = flags_module.FLAGS
  for key, value in config.items():
    if key not in F:
      raise UserError(f"config file sets {key!r}, which is not a flag of this command")
    if not F[key].present:
      F[key].value = value


def quiet_logs():
  """absl INFO lines (e.g. JAX probing for a TPU) are noise for a CLI user; keep warnings."""
  from absl import logging
  if not logging.get_verbosity() > logging.INFO:  # unless the user passed -v
    logging.set_verbosity(logging.WARNING)
