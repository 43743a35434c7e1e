"""One decoder-only transformer for the Llama / Qwen2 / Qwen3 family, in Flax NNX.

RMSNorm, RoPE (default / llama3 / linear scaling), SwiGLU, grouped-query attention, optional
q/k/v biases (Qwen2) and per-head q/k RMSNorm (Qwen3), tied or untied embeddings.

Positions are passed per token and attention takes an explicit boolean mask over the key
slots, because fork/join threads share positions and see only part of the cache.

Shapes: B batch, T new tokens, S key slots, E embed, H q heads, K kv heads, G = H/K,
D head_dim, F ffn, V vocab.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from apr_jax.cache import kv as kvlib
from apr_jax.model.config import ModelConfig

NEG_INF = -1e30  # finite, so fully-masked rows give a uniform softmax instead of NaN


def _precision(*xs):
  """float32 operands get true float32 matmuls: GPUs would otherwise use TF32 for them
  (measured on an H100: ~1.2e-3 x the logit range off transformers, vs 1e-5 here).
  Lower-precision operands keep the backend default."""
  return jax.lax.Precision.HIGHEST if all(x.dtype == jnp.float32 for x in xs) else None


def _param(rngs: nnx.Rngs, shape, axes, dtype, std=None, init="normal"):
  """A parameter tagged with logical `axes`; normal init defaults to std 1/sqrt(shape[-1])."""
  if init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    std = std if std is not None else 1.0 / math.sqrt(shape[-1])
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, axes=tuple(axes))


def dot_f32(a, b, dims, precision=None, preferred_element_type=None, **unused):
  """dot_general accumulating (and returning) float32 for any input dtype.

  XLA:CPU has no bf16 x bf16 -> f32 dot, so when the program is lowered for CPU the operands
  are upcast first; GPU/TPU keep bf16 operands with f32 accumulation. (The signature lets
  `jnp.einsum(..., _dot_general=dot_f32)` use it.)
  """
  dot = lambda x, y: jax.lax.dot_general(x, y, dims, precision=precision or _precision(a, b),
                                         preferred_element_type=jnp.float32)
  if a.dtype == jnp.float32 and b.dtype == jnp.float32:
    return dot(a, b)
  return jax.lax.platform_dependent(
      a, b, cpu=lambda x, y: dot(x.astype(jnp.float32), y.astype(jnp.float32)), default=dot)


ROWS_MAJOR_MIN = 1024  # from this many rows of x on, x @ W^T instead of W @ x^T


def _times_wt(x, w, dot):
  """x [..., in] times w [out, in] transposed -> [..., out], with `dot(a, b, dims)`.

  Few rows (decode): computed as W @ x^T, which on XLA:CPU streams the weights faster than
  x @ W^T (Eigen's small-M GEMM is the bottleneck there). Many rows (prefill, training): x is
  flattened to [rows, in] and multiplied by W^T, with no transpose of the output; at
  8192 x 192 -> 512 that is 2.3x faster than W @ x^T here. On accelerators both are GEMMs.
  """
  rows = math.prod(x.shape[:-1])
  if rows >= ROWS_MAJOR_MIN:
    y = dot(x.reshape(rows, x.shape[-1]), w, (((1,), (1,)), ((), ())))
    return y.reshape(*x.shape[:-1], w.shape[0])
  return jnp.moveaxis(dot(w, x, (((1,), (x.ndim - 1,)), ((), ()))), 0, -1)


def linear(x, w):
  """x [..., in] times a kernel stored [out, in] (the HF layout) -> [..., out] (`_times_wt`)."""
  dot = lambda a, b, dims: jax.lax.dot_general(a, b, dims, precision=_precision(w))
  return _times_wt(x.astype(w.dtype), w, dot).astype(x.dtype)


def rms_norm(x, w, eps):
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (xf * w.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  d = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [D/2]
  if cfg.rope_freq_factors is not None:  # llama.cpp's precomputed form of llama3 scaling
    return inv / jnp.asarray(cfg.rope_freq_factors, jnp.float32)
  sc = cfg.rope_scaling
  if sc is None:
    return inv
  if sc.kind == "linear":
    return inv / sc.factor
  # llama3: long wavelengths divided by `factor`, a smooth ramp between the two cut-offs.
  low_wl = sc.original_max_position / sc.low_freq_factor
  high_wl = sc.original_max_position / sc.high_freq_factor
  wl = 2 * math.pi / inv
  scaled = jnp.where(wl > low_wl, inv / sc.factor, inv)
  smooth = (sc.original_max_position / wl - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
  smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
  medium = (wl >= high_wl) & (wl <= low_wl)
  return jnp.where(medium, smoothed, scaled)


def rope_tables(cfg: ModelConfig, positions):
  """(cos, sin), each [B, T, 1, D/2] float32, computed once per forward for every layer."""
  ang = positions.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)  # [B, T, D/2]
  return jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]


def apply_rope(x, rope):
  """x [B, T, N, D]; rope = rope_tables(...). HF 'rotate_half' convention."""
  cos, sin = rope
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


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


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    e, h, k, d = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.cfg = cfg
    # 2-D [out, in] kernels (heads*head_dim fused), see `linear`; the head split is a free
    # reshape of the activations.
    self.q = _param(rngs, (h * d, e), ("q_heads", "embed"), dtype)
    self.k = _param(rngs, (k * d, e), ("kv_heads", "embed"), dtype)
    self.v = _param(rngs, (k * d, e), ("kv_heads", "embed"), dtype)
    self.o = _param(rngs, (e, h * d), ("embed", "q_heads"), dtype)
    if cfg.qkv_bias:
      self.q_bias = _param(rngs, (h, d), ("q_heads", "head_dim"), dtype, init="zeros")
      self.k_bias = _param(rngs, (k, d), ("kv_heads", "head_dim"), dtype, init="zeros")
      self.v_bias = _param(rngs, (k, d), ("kv_heads", "head_dim"), dtype, init="zeros")
    if cfg.o_bias:
      self.o_bias = _param(rngs, (e,), ("embed",), dtype, init="zeros")
    if cfg.qk_norm:
      self.q_norm = _param(rngs, (d,), ("head_dim",), dtype, init="ones")
      self.k_norm = _param(rngs, (d,), ("head_dim",), dtype, init="ones")

  def __call__(self, x, rope, mask, cache: kvlib.LayerKV | None, write_index):
    """write_index None with a cache: the cache is read only, mask = (mask over the cache
    [B, T, S], mask over the new tokens [B, T, T]) and the new tokens' LayerKV
    ([B, K, T, D]) is returned in place of the updated cache, for the caller to write."""
    cfg = self.cfg
    b, t, _ = x.shape
    with jax.named_scope("qkv"):
      q = linear(x, self.q[...]).reshape(b, t, cfg.n_heads, cfg.head_dim)
      k = linear(x, self.k[...]).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
      v = linear(x, self.v[...]).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
      if cfg.qkv_bias:
        q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
      if cfg.qk_norm:
        q = rms_norm(q, self.q_norm[...], cfg.norm_eps)
        k = rms_norm(k, self.k_norm[...], cfg.norm_eps)
      q = apply_rope(q, rope)
      k = apply_rope(k, rope)
    with jax.named_scope("attend"):
      if callable(mask):  # training: causal blocks; keys stay [B, T, K, D] (no transposes)
        o, cache = attend_blocks(q, k, v, mask), None
      else:
        k = k.transpose(0, 2, 1, 3)  # [B, K, T, D], the cache layout
        v = v.transpose(0, 2, 1, 3)
        if cache is None:
          o = attend(q, k, v, mask)
        elif write_index is None:  # deferred write: return what the cache will hold
          new = kvlib.LayerKV(k.astype(cache.k.dtype), v.astype(cache.v.dtype))
          o = attend_split(q, cache.k.astype(q.dtype), cache.v.astype(q.dtype), mask[0],
                           new.k.astype(q.dtype), new.v.astype(q.dtype), mask[1])
          cache = new
        else:
          cache = kvlib.write(cache, k, v, write_index)
          o = attend(q, cache.k.astype(q.dtype), cache.v.astype(q.dtype), mask)
    out = linear(o.reshape(b, t, cfg.n_heads * cfg.head_dim), self.o[...])
    if cfg.o_bias:
      out = out + self.o_bias[...]
    return out, cache


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.gate = _param(rngs, (cfg.ffn_dim, cfg.dim), ("mlp", "embed"), dtype)
    self.up = _param(rngs, (cfg.ffn_dim, cfg.dim), ("mlp", "embed"), dtype)
    self.down = _param(rngs, (cfg.dim, cfg.ffn_dim), ("embed", "mlp"), dtype)

  def __call__(self, x):
    g = linear(x, self.gate[...])
    u = linear(x, self.up[...])
    return linear(jax.nn.silu(g) * u, self.down[...])


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.cfg = cfg
    self.attn_norm = _param(rngs, (cfg.dim,), ("embed",), dtype, init="ones")
    self.attn = Attention(cfg, rngs=rngs, dtype=dtype)
    self.mlp_norm = _param(rngs, (cfg.dim,), ("embed",), dtype, init="ones")
    self.mlp = MLP(cfg, rngs=rngs, dtype=dtype)

  def __call__(self, x, rope, mask, cache, write_index):
    h, cache = self.attn(rms_norm(x, self.attn_norm[...], self.cfg.norm_eps), rope, mask,
                         cache, write_index)
    x = x + h
    x = x + self.mlp(rms_norm(x, self.mlp_norm[...], self.cfg.norm_eps))
    return x, cache


class Transformer(nnx.Module):
  """Decoder-only LM. `__call__` returns (logits float32, updated cache or None)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), dtype, std=0.02)
    self.layers = nnx.List([Block(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.n_layers)])
    self.final_norm = _param(rngs, (cfg.dim,), ("embed",), dtype, init="ones")
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), dtype)

  def hidden(self, tokens, positions, mask, cache=None, write_index=0, remat=False):
    """Final-normed hidden states [B, T, E] and the updated cache.

    tokens, positions: [B, T] int32. mask: [B, T, S] bool over key slots, where S is the
    cache size when a cache is given (the new tokens are written at slots
    [write_index, write_index+T) first), else T; or, without a cache, a block-mask function
    (`training.packing.TreeMask`) for causal blockwise attention. With a cache and
    write_index None the cache is only read (mask = (cache mask, new-token mask)) and the
    second result is each layer's new LayerKV, for the caller to write: a decode loop that
    picks a step variant with `lax.switch` must write the cache outside the switch, or XLA
    copies the whole cache every step. remat (no cache): each layer's activations are
    recomputed in the backward pass instead of kept (training memory).
    """
    cfg = self.cfg
    rope = rope_tables(cfg, positions)
    x = jnp.take(self.embed[...], tokens, axis=0)
    new_cache = []
    if remat and cache is not None:
      raise ValueError("remat is for training forwards, without a cache")
    run = (nnx.remat(lambda lyr, x: lyr(x, rope, mask, None, write_index)) if remat else
           lambda lyr, x: lyr(x, rope, mask, None, write_index))
    for i, layer in enumerate(self.layers):
      with jax.named_scope(f"layer{i}"):
        if cache is None:
          x, c = run(layer, x)
        else:
          x, c = layer(x, rope, mask, cache[i], write_index)
      new_cache.append(c)
    x = rms_norm(x, self.final_norm[...], cfg.norm_eps)
    return x, (tuple(new_cache) if cache is not None else None)

  def logits(self, x):
    """x [..., E] -> float32 logits [..., V] (tied: the embedding is the [V, E] kernel)."""
    w = self.embed[...] if self.cfg.tie_embeddings else self.lm_head[...]
    return _times_wt(x, w, dot_f32)

  def __call__(self, tokens, positions, mask, cache=None, write_index=0, remat=False):
    x, cache = self.hidden(tokens, positions, mask, cache, write_index, remat)
    return self.logits(x), cache


def causal_mask(t: int):
  """[1, T, T] causal mask for a plain full forward over T tokens."""
  i = jnp.arange(t)
  return (i[None, :] <= i[:, None])[None]


def abstract_model(cfg: ModelConfig, dtype=jnp.float32) -> Transformer:
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), dtype=dtype))

