"""One decoder-only transformer for the Llama / Qwen2 / Qwen3 family, in Flax NNX.

RMSNorm, RoPE (default / llama3 / linear scaling), SwiGLU, grouped-query attention, optional
q/k/v biases (Qwen2) and per-head q/k RMSNorm (Qwen3), tied or untied embeddings.

Positions are passed per token and attention takes an explicit mask over the key slots,
because fork/join threads share positions and see only part of the cache. One entry point
per use, each naming what attention reads:

- `hidden` / `__call__`: a full forward over the tokens alone, dense mask [B, T, T] (the
  plain reference every fast path is tested against);
- `decode`: writes the new tokens' K/V into a cache, then attends over the cache;
- `read_cache`: attends over a read-only cache plus the new tokens, and returns the new
  tokens' K/V for the caller to write (the fork/join loop, see `read_cache`);
- `train_logits`: training forward over packed thread trees with a block tree mask
  (`training.packing.TreeMask`, attention in `train_attention`).

Shapes: B batch, T new tokens, S key slots, E embed, H q heads, K kv heads, G = H/K,
D head_dim, F ffn, V vocab.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from apr_jax.cache import kv as kvlib
from apr_jax.model.attention import attend, attend_split, attend_visible
from apr_jax.model.config import ModelConfig
from apr_jax.model.ops import dot_f32, linear, rms_norm, times_wt
from apr_jax.model.train_attention import attend_blocks

# An attention strategy: (q [B, T, H, D], k, v [B, T, K, D]) -> (o [B, T, H, D], what the
# layer returns beside it: its updated cache, the new tokens' KV, or None).
AttendFn = Callable[[jax.Array, jax.Array, jax.Array], tuple]


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

  def __call__(self, x, rope, attn: AttendFn):
    """x [B, T, E] -> (out [B, T, E], attn's second result)."""
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
      o, aux = attn(q, k, v)
    out = linear(o.reshape(b, t, cfg.n_heads * cfg.head_dim), self.o[...])
    if cfg.o_bias:
      out = out + self.o_bias[...]
    return out, aux


def _cache_layout(x):
  """[B, T, K, D] (the projection's layout) -> [B, K, T, D] (the cache's)."""
  return x.transpose(0, 2, 1, 3)


def dense_attention(mask) -> AttendFn:
  """Keys are the new tokens themselves; mask [B, T, T]."""
  return lambda q, k, v: (attend(q, _cache_layout(k), _cache_layout(v), mask), None)


def write_then_attend(cache: kvlib.LayerKV, mask, write_index) -> AttendFn:
  """The new K/V written at slots [write_index, write_index + T) of `cache`, then attention
  over the whole cache with mask [B, T, S]; returns the updated cache."""
  def attn(q, k, v):
    c = kvlib.write(cache, _cache_layout(k), _cache_layout(v), write_index)
    return attend(q, c.k.astype(q.dtype), c.v.astype(q.dtype), mask), c
  return attn


def read_only_attention(cache: kvlib.LayerKV, cache_mask, new_mask, visible=None) -> AttendFn:
  """Attention over `cache` (read, not written; mask [B, T, S]) and the new tokens (mask
  [B, T, T]) in one softmax; returns the new tokens' LayerKV ([B, K, T, D], cache dtype).
  `visible` = (idx [B, S], count [B], n_blocks, block): read only the cache slots listed
  (`attend_visible`); ("pages", block, pages): only the pages of `block` slots some query
  sees (`pallas_attention.visible_pages`), in the Pallas kernel (`attend_pages`; interpret
  mode off TPU); None:
  every slot (`attend_split`, the reference)."""
  def attn(q, k, v):
    new = kvlib.LayerKV(_cache_layout(k).astype(cache.k.dtype), _cache_layout(v).astype(cache.v.dtype))
    nk, nv = new.k.astype(q.dtype), new.v.astype(q.dtype)
    if visible is None:
      o = attend_split(q, cache.k.astype(q.dtype), cache.v.astype(q.dtype), cache_mask, nk, nv,
                       new_mask)
    elif visible[0] == "pages":
      from apr_jax.model.pallas_attention import attend_pages
      o = attend_pages(q, cache.k, cache.v, cache_mask, nk, nv, new_mask, visible[1], visible[2])
    else:
      idx, count, n_blocks, block = visible
      o = attend_visible(q, cache.k, cache.v, cache_mask, idx, count, n_blocks, nk, nv, new_mask,
                         block)
    return o, new
  return attn


def tree_attention(tree_mask) -> AttendFn:
  """Training: causal query blocks over the tokens with a block tree mask (`attend_blocks`);
  keys stay in the projection layout (no transposes)."""
  return lambda q, k, v: (attend_blocks(q, k, v, tree_mask), None)


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

  def __call__(self, x, rope, attn: AttendFn):
    h, aux = self.attn(rms_norm(x, self.attn_norm[...], self.cfg.norm_eps), rope, attn)
    x = x + h
    x = x + self.mlp(rms_norm(x, self.mlp_norm[...], self.cfg.norm_eps))
    return x, aux


class Transformer(nnx.Module):
  """Decoder-only LM. tokens, positions: [B, T] int32; hidden states come out final-normed
  [B, T, E], logits float32 [B, T, V]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), dtype, std=0.02)
    self.layers = nnx.List([Block(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.n_layers)])
    self.final_norm = _param(rngs, (cfg.dim,), ("embed",), dtype, init="ones")
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), dtype)

  def _layers(self, tokens, positions, attn_of: Callable[[int], AttendFn], remat=False):
    """Runs every layer, layer i attending with `attn_of(i)`: (hidden, per-layer aux)."""
    cfg = self.cfg
    rope = rope_tables(cfg, positions)
    x = jnp.take(self.embed[...], tokens, axis=0)
    aux = []
    for i, layer in enumerate(self.layers):
      attn = attn_of(i)
      run = nnx.remat(lambda lyr, x: lyr(x, rope, attn)) if remat else (
          lambda lyr, x: lyr(x, rope, attn))
      with jax.named_scope(f"layer{i}"):
        x, a = run(layer, x)
      aux.append(a)
    return rms_norm(x, self.final_norm[...], cfg.norm_eps), tuple(aux)

  def hidden(self, tokens, positions, mask):
    """A full forward over the tokens alone: mask [B, T, T] bool (True = may attend)."""
    return self._layers(tokens, positions, lambda i: dense_attention(mask))[0]

  def decode(self, tokens, positions, mask, cache, write_index):
    """(hidden, updated cache): the new tokens are written at cache slots
    [write_index, write_index + T) of every layer, then attend over the cache with mask
    [B, T, S] (S = the cache's slots). Sequential prefill and decode."""
    return self._layers(tokens, positions,
                        lambda i: write_then_attend(cache[i], mask, write_index))

  def read_cache(self, tokens, positions, cache_mask, new_mask, cache, visible=None):
    """(hidden, new KV): attention over the read-only `cache` (mask [B, T, S]) and the new
    tokens (mask [B, T, T]); the second result is each layer's LayerKV of the new tokens
    ([B, K, T, D]) for the caller to write. `visible` (see `read_only_attention`): read only
    the listed slots. A loop that picks a step variant with `lax.switch` must write the
    cache outside the switch, or XLA copies the whole cache every step."""
    return self._layers(tokens, positions,
                        lambda i: read_only_attention(cache[i], cache_mask, new_mask, visible))

  def train_logits(self, tokens, positions, tree_mask, remat=False):
    """Training forward over packed rows: causal blockwise attention with a block tree mask
    (`training.packing.TreeMask`). remat: each layer's activations are recomputed in the
    backward pass instead of kept (training memory)."""
    h, _ = self._layers(tokens, positions, lambda i: tree_attention(tree_mask), remat=remat)
    return self.logits(h)

  def logits(self, x):
    """x [..., E] -> float32 logits [..., V] (tied: the embedding is the [V, E] kernel)."""
    w = self.embed[...] if self.cfg.tie_embeddings else self.lm_head[...]
    return times_wt(x, w, dot_f32)

  def __call__(self, tokens, positions, mask):
    """Logits of a full forward (`hidden`)."""
    return self.logits(self.hidden(tokens, positions, mask))


def causal_mask(t: int):
  """[1, T, T] causal mask for a plain full forward over T tokens."""
  i = jnp.arange(t)
  return (i[None, :] <= i[:, None])[None]


def abstract_model(cfg: ModelConfig, dtype=jnp.float32) -> Transformer:
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), dtype=dtype))

