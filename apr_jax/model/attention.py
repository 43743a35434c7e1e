"""Attention over key slots with an explicit mask: the plain reference (`attend`) and the
decode form over a read-only cache plus the step's new keys (`attend_split`).

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
