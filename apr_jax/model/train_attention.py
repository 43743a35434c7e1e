"""Training attention: causal query blocks over packed thread trees, with a hand-written
backward (`attend_blocks`). The dense reference it is tested against is `attention.attend`
with the full tree mask (`training.packing.TreeMask.dense`)."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from apr_jax.model.ops import NEG_INF, dot_f32


ATTN_TILE_BYTES = 256 << 20  # accelerators: score tiles of one query block, per iteration


def attend_blocks(q, k, v, mask_fn):
  """Causal blockwise attention for training, with a hand-written backward.

  q [B, T, H, D]; k, v [B, T, K, D] (the projection's layout, no cache); mask_fn a block
  mask (`training.packing.TreeMask`): `mask_fn.block` (query block size), `mask_fn.arrays`
  (the mask's arrays, batch-major) and `mask_fn.block_mask(arrays, q0, q1, k1)` -> [B, q1-q0, k1].
  Query block [q0, q1) attends keys [0, q1) only: the same values as `attend` with the full
  mask when no query sees a later key, for about half the score work and memory.

  The backward uses the flash-attention identity dS = P (dP - rowsum(dO O)): no softmax
  re-derivation, no mask select. P is either saved by the forward (`save_probs`; default on
  CPU, where re-reading it is cheaper than XLA:CPU's exp) or recomputed from the saved
  softmax max and log-sum (default on accelerators: O(T) residuals per row instead of
  O(T^2)). A query that sees no key gets the uniform average and no gradient, as in `attend`.
  Rows go through a `lax.map`, `rows_per_iteration` at a time (CPU default: one, so a row's
  score tiles stay in cache - 1.7x faster forward + backward than the whole batch at once at
  8 x 1024 tokens; accelerators: as many as keep one query block's scores under
  ATTN_TILE_BYTES per device, see `_rows_under`; the backward holds P, dP and dS at once,
  about 3x that). Iteration j takes rows j, j + n, j + 2n, ... (n iterations), so when
  rows_per_iteration is a multiple of the devices a batch sharded over them stays sharded
  inside every iteration. Scores, softmax and the backward's elementwise work in float32;
  P and dS meet v, k, q in their dtype, as in `attend`.
  (Pure JAX and portable; accelerator kernels such as splash attention also skip empty
  blocks inside the key range.)"""
  b, t, h, d = q.shape
  kh = k.shape[2]
  qh = q.reshape(b, t, kh, h // kh, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
  kk, vv = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, D]
  cpu = jax.default_backend() == "cpu"
  rows = getattr(mask_fn, "rows_per_iteration", None) or (
      1 if cpu else _rows_under(b, h * min(mask_fn.block, t) * t * 4, ATTN_TILE_BYTES))
  if b % rows:
    raise ValueError(f"rows_per_iteration {rows} does not divide the batch {b}")
  save = getattr(mask_fn, "save_probs", None)
  save = cpu if save is None else save
  o = _blockwise(qh, kk, vv, tuple(mask_fn.arrays), mask_fn.block_mask, mask_fn.block, rows, save)
  return o.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


def _rows_under(b: int, row_bytes: int, budget: int) -> int:
  """Rows per iteration (a divisor of b) whose score tiles fit `budget` bytes per device.
  When the device count divides b (a batch that may be data-sharded) it is a multiple of the
  device count, each device holding rows / devices of them (at least one row each);
  otherwise the most rows that fit in one device's budget, at least 1."""
  nd = jax.device_count()
  if b % nd == 0:
    fits = [r for r in range(nd, b + 1, nd) if b % r == 0 and (r // nd) * row_bytes <= budget]
    return max(fits or [nd])
  return max([r for r in range(1, b + 1) if b % r == 0 and r * row_bytes <= budget] or [1])


def _query_blocks(t, bs):
  return [(q0, min(q0 + bs, t)) for q0 in range(0, t, bs)]


def _block_scores(q, k, arrays, block_mask, q0, q1):
  """(scaled, masked float32 scores [R, K, G, q1-q0, q1] of query block [q0, q1), which of
  its queries see any key [R, q1-q0])."""
  mask = block_mask(arrays, q0, q1, q1)
  bias = jnp.where(mask, 0.0, NEG_INF)[:, None, None]
  s = jnp.einsum("rkgtd,rksd->rkgts", q[:, :, :, q0:q1], k[:, :, :q1],
                 preferred_element_type=jnp.float32, _dot_general=dot_f32)
  return s * (1.0 / math.sqrt(q.shape[-1])) + bias, jnp.any(mask, -1)


def _blocks_fwd(q, k, v, arrays, block_mask, bs, save):
  """Rows of q [R, K, G, T, D], k, v [R, K, T, D] -> (o float32 [R, K, G, T, D], residual):
  (the probabilities of each query block (float32 [R, K, G, q1-q0, q1]) with `save`, else
  the softmax max and log-sum of every query (float32 [R, K, G, T] each); which queries see
  any key [R, T]). A query that sees none gets the uniform average of its block's values,
  as in `attend`, and no gradient (the mask's `where` in `attend` passes none)."""
  outs, probs, maxes, logs, live = [], [], [], [], []
  for q0, q1 in _query_blocks(q.shape[3], bs):
    s, lv = _block_scores(q, k, arrays, block_mask, q0, q1)
    live.append(lv)
    m = jnp.max(s, -1, keepdims=True)
    e = jnp.exp(s - m)
    den = jnp.sum(e, -1, keepdims=True)
    p = e / den
    outs.append(jnp.einsum("rkgts,rksd->rkgtd", p.astype(v.dtype), v[:, :, :q1],
                           preferred_element_type=jnp.float32, _dot_general=dot_f32))
    if save:
      probs.append(p)
    else:  # max and log-sum kept apart: m + log(den) would round to m for a row that sees no key
      maxes.append(m[..., 0])
      logs.append(jnp.log(den)[..., 0])
  live = jnp.concatenate(live, 1)
  if save:
    return jnp.concatenate(outs, 3), (tuple(probs), live)
  return jnp.concatenate(outs, 3), ((jnp.concatenate(maxes, 3), jnp.concatenate(logs, 3)), live)


def _blocks_bwd(q, k, v, arrays, o, res, do, block_mask, bs, save):
  """The gradients (dq, dk, dv) of `_blocks_fwd`'s o for rows of the same shapes."""
  sc = 1.0 / math.sqrt(q.shape[-1])
  delta = jnp.sum(do * o, -1)  # rowsum(dO * O) [R, K, G, T]
  dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  f32 = dict(preferred_element_type=jnp.float32, _dot_general=dot_f32)
  res, live = res
  for i, (q0, q1) in enumerate(_query_blocks(q.shape[3], bs)):
    if save:
      p = res[i]
    else:
      m, logden = (r[:, :, :, q0:q1, None] for r in res)
      p = jnp.exp(_block_scores(q, k, arrays, block_mask, q0, q1)[0] - m - logden)
    qb, dob = q[:, :, :, q0:q1], do[:, :, :, q0:q1]
    dp = jnp.einsum("rkgtd,rksd->rkgts", dob.astype(v.dtype), v[:, :, :q1], **f32)
    ds = jnp.where(live[:, None, None, q0:q1, None], p * (dp - delta[:, :, :, q0:q1, None]) * sc,
                   0.0).astype(q.dtype)
    dq.append(jnp.einsum("rkgts,rksd->rkgtd", ds, k[:, :, :q1], **f32))
    # dK^T = Q^T dS and dV^T = dO^T P: the big [t, s] operand is contracted over its major
    # dim (no transposed copy of it), the small results are transposed instead
    dk = dk.at[:, :, :q1].add(jnp.swapaxes(jnp.einsum("rkgtd,rkgts->rkds", qb, ds, **f32), 2, 3))
    dv = dv.at[:, :, :q1].add(jnp.swapaxes(
        jnp.einsum("rkgtd,rkgts->rkds", dob.astype(v.dtype), p.astype(v.dtype), **f32), 2, 3))
  return jnp.concatenate(dq, 3), dk, dv


def _by_rows(x, rows):
  """[B, ...] -> [B / rows, rows, ...]: iteration j holds rows j, j + n, ... (n = B / rows)."""
  return x.reshape(rows, x.shape[0] // rows, *x.shape[1:]).swapaxes(0, 1)


def _from_rows(x):
  return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _blockwise(q, k, v, arrays, block_mask, bs, rows, save):
  return _blockwise_fwd(q, k, v, arrays, block_mask, bs, rows, save)[0]


def _blockwise_fwd(q, k, v, arrays, block_mask, bs, rows, save):
  o, res = jax.lax.map(lambda a: _blocks_fwd(*a, block_mask, bs, save),
                       (_by_rows(q, rows), _by_rows(k, rows), _by_rows(v, rows),
                        tuple(_by_rows(a, rows) for a in arrays)))
  return _from_rows(o), (q, k, v, arrays, o, res)


def _blockwise_bwd(block_mask, bs, rows, save, res_all, do):
  q, k, v, arrays, o, res = res_all
  dq, dk, dv = jax.lax.map(
      lambda a: _blocks_bwd(*a, block_mask, bs, save),
      (_by_rows(q, rows), _by_rows(k, rows), _by_rows(v, rows),
       tuple(_by_rows(a, rows) for a in arrays), o, res, _by_rows(do.astype(jnp.float32), rows)))
  return (_from_rows(dq).astype(q.dtype), _from_rows(dk).astype(k.dtype),
          _from_rows(dv).astype(v.dtype), jax.tree.map(lambda _: None, arrays))


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
