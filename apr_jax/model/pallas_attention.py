"""Tree attention as one Pallas TPU kernel in the ragged paged style: the cache is read in
pages of `block` consecutive slots, only the pages some query of the row sees, each page
fetched once per (row, kv head) for all the row's queries and q heads, with an online
softmax across pages. The page list of each row is a scalar-prefetched table that drives
the BlockSpec index maps (the DMA engine fetches the pages; a grid step past a row's list
keeps the last page's index, so nothing new is fetched, and skips its body).

`attend_pages` has `attend_split`'s signature and meaning (the dense reference,
`model/attention.py`): the cache part runs in the kernel, the step's new keys are merged
outside by log-sum-exp. Tested against the reference in interpret mode
(`interpret=True`, the default off TPU); on a TPU the mask tile needs `block` % 128 == 0
and the pool a whole number of pages. Not the engine's default: the pure-JAX
`attend_visible` is (`TreeSpec.attention`).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from apr_jax.model.ops import NEG_INF, dot_f32


def visible_pages(mask, block: int):
  """(pages [B, P] int32, n_pages [B] int32): per row, the pages of `block` slots holding a
  slot that some query sees (ascending, padded with the last one), P = S / block."""
  b, t, s = mask.shape
  hit = jnp.any(mask.reshape(b, t, s // block, block), axis=(1, 3))          # [B, P]
  n = jnp.sum(hit, axis=1).astype(jnp.int32)
  order = jnp.argsort(~hit, axis=1, stable=True).astype(jnp.int32)          # hit pages first
  last = jnp.take_along_axis(order, jnp.maximum(n - 1, 0)[:, None], axis=1)
  pos = jnp.arange(s // block)[None, :]
  return jnp.where(pos < n[:, None], order, last), n


def _kernel(pages_ref, n_ref, q_ref, k_ref, v_ref, m_ref, acc_ref, mx_ref, l_ref,
            acc_sc, mx_sc, l_sc, *, groups: int, scale: float, upcast: bool):
  b, i = pl.program_id(0), pl.program_id(2)

  @pl.when(i == 0)
  def _init():
    acc_sc[...] = jnp.zeros_like(acc_sc)
    mx_sc[...] = jnp.full_like(mx_sc, NEG_INF)
    l_sc[...] = jnp.zeros_like(l_sc)

  @pl.when(i < n_ref[b])
  def _page():
    q = q_ref[0, 0]                                   # [G*T, D], row r = g*T + t
    k, v = k_ref[0, 0].astype(q.dtype), v_ref[0, 0].astype(q.dtype)  # [blk, D]
    if upcast:  # XLA:CPU has no bf16 x bf16 -> f32 dot; the products are exact in f32 anyway
      q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
    prec = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    seen = jnp.tile(m_ref[0] != 0, (groups, 1))       # [G*T, blk]
    # a page's slots nobody sees may hold anything (stale KV): never let them in
    v = jnp.where(jnp.any(seen, axis=0)[:, None], v, jnp.zeros_like(v))
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=prec,
                            preferred_element_type=jnp.float32) * scale
    s = jnp.where(seen, s, NEG_INF)
    mx = mx_sc[...]                                   # [G*T, 1]
    new = jnp.maximum(mx, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(seen, jnp.exp(s - new), 0.0)
    alpha = jnp.exp(mx - new)
    l_sc[...] = l_sc[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
    acc_sc[...] = acc_sc[...] * alpha + jax.lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=prec,
        preferred_element_type=jnp.float32)
    mx_sc[...] = new

  @pl.when(i == pl.num_programs(2) - 1)
  def _out():
    acc_ref[0, 0] = acc_sc[...]
    mx_ref[0, 0] = mx_sc[...]
    l_ref[0, 0] = l_sc[...]


def _grouped(q, kh: int):
  """q [B, T, H, D] -> [B, K, G*T, D], query row g*T + t (the kernel's layout)."""
  b, t, h, d = q.shape
  return q.reshape(b, t, kh, h // kh, d).transpose(0, 2, 3, 1, 4).reshape(b, kh, h // kh * t, d)


def cache_part(qk, k_cache, v_cache, mask, block: int, pages, interpret: bool | None = None):
  """The kernel: over the cache's visible pages (`pages` = `visible_pages(mask, block)`),
  per (row, kv head, query row g*T+t) of qk [B, K, G*T, D] (`_grouped`), the unnormalised
  output acc [B, K, G*T, D] f32, the running max and the softmax denominator
  [B, K, G*T, 1] f32 (max NEG_INF and denominator 0 where a query sees no cache slot)."""
  b, kh, gt, d = qk.shape
  t, s = mask.shape[1], k_cache.shape[2]
  if s % block:
    raise ValueError(f"the pool ({s} slots) must be a whole number of {block}-slot pages")
  g = gt // t
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  pages, n = pages
  mask_i = mask.astype(jnp.int32)

  def kv_map(bi, ki, i, pages, n):
    return (bi, ki, pages[bi, i], 0)

  grid = (b, kh, s // block)
  out_shape = (jax.ShapeDtypeStruct((b, kh, g * t, d), jnp.float32),
               jax.ShapeDtypeStruct((b, kh, g * t, 1), jnp.float32),
               jax.ShapeDtypeStruct((b, kh, g * t, 1), jnp.float32))
  row = lambda bi, ki, i, pages, n: (bi, ki, 0, 0)
  spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=grid,
      in_specs=[pl.BlockSpec((1, 1, g * t, d), row),
                pl.BlockSpec((1, 1, block, d), kv_map),
                pl.BlockSpec((1, 1, block, d), kv_map),
                pl.BlockSpec((1, t, block), lambda bi, ki, i, pages, n: (bi, 0, pages[bi, i]))],
      out_specs=[pl.BlockSpec((1, 1, g * t, d), row), pl.BlockSpec((1, 1, g * t, 1), row),
                 pl.BlockSpec((1, 1, g * t, 1), row)],
      scratch_shapes=[pltpu.VMEM((g * t, d), jnp.float32), pltpu.VMEM((g * t, 1), jnp.float32),
                      pltpu.VMEM((g * t, 1), jnp.float32)])
  kern = functools.partial(_kernel, groups=g, scale=1.0 / math.sqrt(d),
                           upcast=interpret and jax.default_backend() == "cpu")
  return pl.pallas_call(kern, grid_spec=spec, out_shape=out_shape, interpret=interpret)(
      pages, n, qk, k_cache, v_cache, mask_i)


def attend_pages(q, k_cache, v_cache, mask, k_new, v_new, mask_new, block: int, pages=None,
                 interpret: bool | None = None):
  """`attend_split(q, k_cache, v_cache, mask, k_new, v_new, mask_new)` with the cache part in
  the kernel (`cache_part`). `pages`: `visible_pages(mask, block)` when the caller has it
  (the engine lists them once per step for every layer). Every query must see at least one
  new key (itself), as in the engine. Returns [B, T, H, D] in q's dtype."""
  b, t, h, d = q.shape
  kh = k_cache.shape[1]
  g = h // kh
  qk = _grouped(q, kh)
  acc, mx, den = cache_part(qk, k_cache, v_cache, mask, block,
                            visible_pages(mask, block) if pages is None else pages, interpret)
  # the new keys in the same [B, K, G*T, *] layout
  s = jnp.einsum("bkrd,bksd->bkrs", qk, k_new.astype(q.dtype), preferred_element_type=jnp.float32,
                 _dot_general=dot_f32)
  s = s / math.sqrt(d)
  m_new = jnp.tile(mask_new[:, None, :, :], (1, 1, g, 1)).reshape(b, 1, g * t, -1)
  s = jnp.where(m_new, s, NEG_INF)
  mx_n = jnp.max(s, -1, keepdims=True)
  e = jnp.where(m_new, jnp.exp(s - mx_n), 0.0)
  top = jnp.maximum(mx, mx_n)
  a_c, a_n = jnp.exp(mx - top), jnp.exp(mx_n - top)
  den = den * a_c + jnp.sum(e, -1, keepdims=True) * a_n
  acc = acc * a_c + jnp.einsum("bkrs,bksd->bkrd", e.astype(q.dtype), v_new.astype(q.dtype),
                               preferred_element_type=jnp.float32, _dot_general=dot_f32) * a_n
  o = (acc / den).reshape(b, kh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
  return o.astype(q.dtype)
