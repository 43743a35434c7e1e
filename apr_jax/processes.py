"""Multi-process (multi-host) safety for the host side of the engines and the loaders.

In a multi-controller run every process executes the same host code on its own copy of the
host state, and each jitted call is one collective program over the whole mesh: the calls
and their arguments must be identical on every process. So

- device values are read with `fetch`: the global value on every process (an all-gather of
  the shards it does not hold), never `jax.device_get` of an array another process holds;
- decisions that depend on a process's own observations (its clock: deadlines, segment
  times for the step-cost fit) are taken on process 0 and broadcast (`agree`);
- host arguments are numpy values, identical on every process by construction, and host
  tensors become global arrays with `put`.

With one process these are plain `jax.device_get` and the identity.
"""
from __future__ import annotations

import jax
import numpy as np


def multi() -> bool:
  return jax.process_count() > 1


def fetch(tree):
  """The global value of every array in `tree`, as numpy, on every process."""
  if not multi():
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return jax.tree.map(lambda x: np.asarray(x) if getattr(x, "is_fully_replicated", True)
                      else np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def agree(tree):
  """Process 0's value of `tree` (numpy arrays / scalars) on every process."""
  if not multi():
    return tree
  from jax.experimental import multihost_utils
  return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


def put(x, sharding):
  """A host (numpy) value, the same on every process, as a global array with `sharding`
  (`jax.device_put` accepts only shardings of this process's devices)."""
  if not multi():
    return jax.device_put(x, sharding)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
