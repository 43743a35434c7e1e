"""Small array helpers of the engine: fixed-size packing and scatters onto requests."""
from __future__ import annotations

import jax.numpy as jnp


def compact(tokens, valid, size):
  """The valid entries of `tokens`, in order, packed into [size] (rest 0), and their count."""
  idx = jnp.cumsum(valid) - 1
  idx = jnp.where(valid, idx, size + jnp.arange(tokens.shape[0]))
  out = jnp.zeros((size,), jnp.int32).at[idx].set(tokens.astype(jnp.int32), mode="drop")
  return out, jnp.minimum(jnp.sum(valid), size).astype(jnp.int32)


def const(x):
  """(ids as an int32 array, never empty, and how many are real)."""
  return jnp.asarray(x if len(x) else [-1], jnp.int32), len(x)


def isin(x, ids):
  return jnp.isin(x, jnp.asarray(ids, jnp.int32)) if len(ids) else jnp.zeros_like(x, bool)


def bucket_sorted(tokens, bucket, valid, n_buckets, size):
  """The valid tokens ordered by bucket in [0, n_buckets), in array order within a bucket
  (a stable counting sort: O(n x n_buckets), no comparison sort), packed into [size], and
  their count (which can exceed `size`: the caller decides what overflow means)."""
  n = tokens.shape[0]
  b = jnp.where(valid, bucket, n_buckets)
  onehot = (b[:, None] == jnp.arange(n_buckets)[None, :]).astype(jnp.int32)   # [n, B]
  within = jnp.cumsum(onehot, axis=0) - 1
  counts = jnp.sum(onehot, axis=0)
  offs = jnp.cumsum(counts) - counts
  bc = jnp.clip(b, 0, n_buckets - 1)
  dest = jnp.take_along_axis(within, bc[:, None], axis=1)[:, 0] + offs[bc]
  dest = jnp.where(valid, dest, max(n, size) + jnp.arange(n))  # dropped, never colliding
  out = jnp.zeros((size,), jnp.int32).at[dest].set(tokens.astype(jnp.int32), mode="drop",
                                                    unique_indices=True)
  return out, jnp.sum(counts).astype(jnp.int32)


def per_request(idx, vals, n_req, op="add"):
  """Scatter `vals` onto requests `idx` (entries with idx < 0 dropped)."""
  idx = jnp.where(idx >= 0, idx, n_req)
  z = jnp.zeros((n_req,), vals.dtype)
  return getattr(z.at[idx], op)(vals, mode="drop")


def any_per_request(idx, cond, n_req):
  """[R] bool: some entry with cond holds request idx."""
  return per_request(jnp.where(cond, idx, -1), jnp.ones(idx.shape, jnp.int32), n_req) > 0


def before_in_request(req, weights, n_req):
  """For each entry, the summed `weights` of the earlier entries of the same request
  (entries take a per-request budget in array order)."""
  oh = jnp.where(req[:, None] == jnp.arange(n_req)[None, :], weights[:, None], 0)
  return (jnp.cumsum(oh, axis=0) - oh)[jnp.arange(req.shape[0]), jnp.clip(req, 0)]


def targets(cond, ids, n):
  """Scatter targets: `ids` where `cond`, else distinct ids >= n (dropped with mode="drop")."""
  return jnp.where(cond, ids, n + jnp.arange(ids.shape[0]))
