"""Attention over key slots with an explicit mask: the plain reference (`attend`), the
decode form over a read-only cache plus the step's new keys (`attend_split`, the dense
reference of the tree engine), and the same over only the cache slots some query sees
(`attend_visible`, the tree engine's fast path).

Shapes: B batch, T queries, S key slots, H q heads, K kv heads, G = H/K, D head_dim.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from apr_jax.model.ops import NEG_INF, dot_f32


def attend(q, k, v, mask, keys_major=True):
  """Grouped-query attention, the plain reference.

  q [B, T, H, D]; k, v [B, K, S, D] (the cache layout: batched GEMMs over (B, K) need no
  per-step transpose of the cache) or, with keys_major=False, [B, S, K, D] (the projection's
  layout, training); mask [B, T, S] bool (True = may attend).
  Returns [B, T, H, D]. Scores and softmax in float32.
  """
  b, t, h, d = q.shape
  kh = k.shape[1] if keys_major else k.shape[2]
  qg = q.reshape(b, t, kh, h // kh, d)
  kl = "bksd" if keys_major else "bskd"
  s = jnp.einsum(f"btkgd,{kl}->bkgts", qg, k, preferred_element_type=jnp.float32,
                 _dot_general=dot_f32)
  s = s * (1.0 / math.sqrt(d))
  s = jnp.where(mask[:, None, None, :, :], s, NEG_INF)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum(f"bkgts,{kl}->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                 _dot_general=dot_f32)
  return o.reshape(b, t, h, d).astype(q.dtype)


def attend_split(q, k_old, v_old, mask_old, k_new, v_new, mask_new):
  """`attend` over the union of two key sets without concatenating them: the cache's keys
  (read only) and this step's new keys. q [B, T, H, D]; k_old, v_old [B, K, S, D] with
  mask_old [B, T, S]; k_new, v_new [B, K, T', D] with mask_new [B, T, T']. One softmax over
  both: the same values as `attend` on the concatenation (up to summation order)."""
  b, t, h, d = q.shape
  kh = k_old.shape[1]
  qg = q.reshape(b, t, kh, h // kh, d)
  sc = 1.0 / math.sqrt(d)

  def scores(k, mask):
    s = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32,
                   _dot_general=dot_f32) * sc
    return jnp.where(mask[:, None, None, :, :], s, NEG_INF)

  s_old, s_new = scores(k_old, mask_old), scores(k_new, mask_new)
  mx = jnp.maximum(jnp.max(s_old, -1, keepdims=True), jnp.max(s_new, -1, keepdims=True))
  e_old, e_new = jnp.exp(s_old - mx), jnp.exp(s_new - mx)
  den = jnp.sum(e_old, -1, keepdims=True) + jnp.sum(e_new, -1, keepdims=True)

  def pv(e, v):
    return jnp.einsum("bkgts,bksd->btkgd", (e / den).astype(v.dtype), v,
                      preferred_element_type=jnp.float32, _dot_general=dot_f32)

  return (pv(e_old, v_old) + pv(e_new, v_new)).reshape(b, t, h, d).astype(q.dtype)


def attend_visible(q, k_cache, v_cache, mask, idx, count, n_blocks, k_new, v_new, mask_new,
                   block: int):
  """`attend_split` reading only the cache slots that some query sees: the tree engine's
  attention (each visible KV slot read once per step for every query of its lane, nothing
  else read).

  q [B, T, H, D]; k_cache, v_cache [B, K, S, D]; mask [B, T, S]; idx [B, S] int32: each
  row's visible slots first (`count` [B] of them), in any order, every entry in [0, S)
  (those past `count` are ignored); n_blocks: a scalar,
  >= ceil(max(count) / block), the blocks to visit; k_new, v_new [B, K, T', D] with mask_new
  [B, T, T']. Visits blocks of `block` slots of idx with an online softmax (flash-decoding
  over a ragged list of KV chunks): the work and the KV bytes read grow with what the step's
  queries see, not with S. Float32 scores and statistics; equals `attend_split` up to
  summation order."""
  b, t, h, d = q.shape
  kh = k_cache.shape[1]
  g = h // kh
  qg = q.reshape(b, t, kh, g, d)
  sc = 1.0 / math.sqrt(d)
  s = k_cache.shape[2]
  pad = (-s) % block
  idx = jnp.pad(idx, ((0, 0), (0, pad)))  # n_blocks <= ceil(S / block): every block in range
  # the mask in list order, once (not per block; XLA merges the layers' identical copies);
  # False past the list: those entries never reach the output. The slot ids are in [0, S): gathers need no bounds checks.
  live = jnp.arange(s + pad)[None, :] < count[:, None]                      # [B, S + pad]
  mask = jnp.take_along_axis(mask, jnp.broadcast_to(idx[:, None, :], (b, t, s + pad)), axis=2,
                             mode="promise_in_bounds") & live[:, None, :]

  def rows(cache, sl):  # [B, K, S, D] at slots sl [B, blk] -> [B, K, blk, D]
    return jnp.take_along_axis(cache, sl[:, None, :, None], axis=2, mode="promise_in_bounds")

  def scores(k, m):
    x = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32,
                   _dot_general=dot_f32) * sc
    return jnp.where(m[:, None, None, :, :], x, NEG_INF)

  def pv(p, v):
    return jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v,
                      preferred_element_type=jnp.float32, _dot_general=dot_f32)

  # the new keys first: every query sees at least itself, so the running max is finite
  s_new = scores(k_new, mask_new)
  mx = jnp.max(s_new, -1)
  e = jnp.exp(s_new - mx[..., None])
  carry = (jnp.int32(0), mx, jnp.sum(e, -1), pv(e, v_new))

  def body(c):
    i, mx, den, acc = c
    sl = jax.lax.dynamic_slice_in_dim(idx, i * block, block, axis=1)          # [B, blk]
    lv = jax.lax.dynamic_slice_in_dim(live, i * block, block, axis=1)        # [B, blk]
    mb = jax.lax.dynamic_slice_in_dim(mask, i * block, block, axis=2)        # [B, T, blk]
    kb, vb = rows(k_cache, sl), rows(v_cache, sl)
    vb = jnp.where(lv[:, None, :, None], vb, 0)  # entries past the list: never in the output
    sb = scores(kb.astype(q.dtype), mb)
    new_mx = jnp.maximum(mx, jnp.max(sb, -1))
    alpha = jnp.exp(mx - new_mx)
    p = jnp.exp(sb - new_mx[..., None])
    return (i + 1, new_mx, den * alpha + jnp.sum(p, -1),
            acc * alpha[..., None] + pv(p, vb.astype(q.dtype)))

  _, _, den, acc = jax.lax.while_loop(lambda c: c[0] < n_blocks, body, carry)
  o = acc / den[..., None]                                                   # [B, K, G, T, D]
  return o.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)
