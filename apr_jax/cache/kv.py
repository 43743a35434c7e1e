"""The KV cache for sequential decoding: one [batch, kv_heads, slots, head_dim] buffer per
layer for keys and one for values, written in place (the decode loop donates it).

Slot indices are cache addresses, not token positions: positions are passed per token, so
left-padded rows (and, later, threads that share positions) need no special casing here.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from apr_jax.model.config import ModelConfig
from apr_jax.model.sharding import ShardingRules

CACHE_AXES = ("batch", "kv_heads", "sequence", "head_dim")


class LayerKV(NamedTuple):
  k: jax.Array  # [batch, kv_heads, slots, head_dim]
  v: jax.Array  # [batch, kv_heads, slots, head_dim]


KVCache = tuple  # tuple[LayerKV, ...], one per layer


def cache_shape(cfg: ModelConfig, batch: int, slots: int) -> tuple[int, int, int, int]:
  return (batch, cfg.n_kv_heads, slots, cfg.head_dim)


def cache_sharding(cfg: ModelConfig, batch: int, slots: int, mesh: Mesh,
                   rules: ShardingRules | None = None) -> NamedSharding:
  return (rules or ShardingRules()).sharding(mesh, CACHE_AXES, cache_shape(cfg, batch, slots))


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype=jnp.float32,
               sharding: NamedSharding | None = None) -> KVCache:
  """Zeros for every layer. Called inside the jitted prefill, so XLA allocates the buffers
  where `sharding` says and no host-side allocation or extra program is needed."""
  def zeros():
    z = jnp.zeros(cache_shape(cfg, batch, slots), dtype)
    return z if sharding is None else jax.lax.with_sharding_constraint(z, sharding)
  return tuple(LayerKV(zeros(), zeros()) for _ in range(cfg.n_layers))


def write_slots(layer: LayerKV, k: jax.Array, v: jax.Array, index) -> LayerKV:
  """Writes k/v [batch, T, kv_heads, head_dim] (the projection's layout) at slot addresses
  `index` [batch, T], one per new token (the tree cache, where each token goes to any free
  slot), in place. Addresses >= slots (padding tokens) are dropped."""
  b = jnp.arange(k.shape[0])[:, None]
  def put(buf, new):
    return buf.at[b, :, index].set(new.astype(buf.dtype), mode="drop", unique_indices=True)
  return LayerKV(put(layer.k, k), put(layer.v, v))


def write(layer: LayerKV, k: jax.Array, v: jax.Array, index) -> LayerKV:
  """Writes k/v [batch, kv_heads, T, head_dim] into the cache, in place.

  `index` is either a scalar (every row writes slots [index, index+T): sequential decoding)
  or an int array [batch, T] of slot addresses (`write_slots`).
  """
  if jnp.ndim(index) == 2:
    return write_slots(layer, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), index)
  z = jnp.zeros((), jnp.int32)
  idx = (z, z, jnp.asarray(index, jnp.int32), z)
  return LayerKV(jax.lax.dynamic_update_slice(layer.k, k.astype(layer.k.dtype), idx),
                 jax.lax.dynamic_update_slice(layer.v, v.astype(layer.v.dtype), idx))
