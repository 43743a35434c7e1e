"""Prefill apart from decode: one compiled program that writes a large chunk of one
thread's forced queue (a prompt, a flat join's re-prefill, a fresh child's prompt) straight
into its lane's KV pool, called by the host between decode segments.

Per data shard of the mesh it picks one lane (the one whose running thread has the longest
forced queue) and runs the model over that lane only: [shards, C] tokens, not [lanes, C],
so lanes without a prompt cost nothing and the decoding lanes wait for one call, not for
hundreds of chunk-sized steps of the whole pool. The tokens are booked, masked and written
by the decode loop's own code (`packing._book`, `packing._masks`), so the KV and the log
are what the loop would write; the last queued token is always left to the loop, which
takes its logits and samples (or forks, or finishes) as usual.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from apr_jax.cache import kv as kvlib
from apr_jax.engine.tree.packing import _book, _masks, assign_rows, visible_slots, write_log
from apr_jax.engine.tree.requests import live_threads
from apr_jax.engine.tree.state import EngineState, Lane, TreeSpec
from apr_jax.model.transformer import Transformer


def plan(lane: Lane, spec: TreeSpec, c: int, min_tokens: int):
  """Tokens the lane's prefill would write, g [W] (at most one row: the running thread with
  the longest forced queue, all of it but its last token, at most c, within the free KV
  slots, log entries and the model's context; 0 below `min_tokens`)."""
  th = lane.threads
  tw = jnp.clip(lane.rows.thread, 0)
  live = (lane.rows.thread >= 0) & live_threads(lane)[tw]
  want = jnp.where(live, th.q_len[tw] - 1, 0)
  room = jnp.minimum(jnp.sum(lane.slots.owner < 0), spec.n_log - lane.log.n)
  if spec.context:
    want = jnp.minimum(want, spec.context - th.pos[tw])
  want = jnp.clip(jnp.minimum(want, jnp.minimum(c, room)), 0)
  w = jnp.argmax(want)
  g = jnp.where(jnp.arange(spec.rows) == w, want, 0)
  return jnp.where(g >= min_tokens, g, 0).astype(jnp.int32)


def work(st: EngineState, spec: TreeSpec, c: int, min_tokens: int, shards: int = 1):
  """(tokens a prefill call would write in each lane [lanes], whether some running thread
  would wait for it: a live row the call does not serve, decoding or with a queue the loop
  takes chunk by chunk). The host asks before calling."""
  def one(lane):
    lane = assign_rows(lane, spec)
    tw = jnp.clip(lane.rows.thread, 0)
    live = (lane.rows.thread >= 0) & live_threads(lane)[tw]
    return jnp.sum(plan(lane, spec, c, min_tokens)), jnp.sum(live)
  todo, live = jax.vmap(one)(st.lanes)
  served = jnp.sum(jnp.any(todo.reshape(shards, -1) > 0, axis=1))  # one row per data shard
  return todo, jnp.sum(live) > served


def _pick(x, shards, idx):
  """x [lanes, ...] -> x[lane idx[d] of shard d] for each shard: [shards, ...] (a gather
  within each shard's lanes: no lane crosses devices)."""
  y = x.reshape((shards, x.shape[0] // shards) + x.shape[1:])
  return jax.vmap(lambda a, i: a[i])(y, idx)


def _unpick(full_shape, x, shards, idx):
  """The inverse of `_pick` into zeros of `full_shape`: x [shards, ...] at the picked lanes."""
  per = full_shape[0] // shards
  out = jnp.zeros((shards, per) + tuple(full_shape[1:]), x.dtype)
  out = jax.vmap(lambda o, a, i: o.at[i].set(a))(out, x, idx)
  return out.reshape(full_shape)


def _visible(mask, spec: TreeSpec):
  """What attention reads of the picked lanes' pools (mask [shards, C, S]), as in the loop:
  the blocks holding a visible slot (tree), the visible pages (pallas) or everything."""
  if spec.attention == "tree":
    idx, count = jax.vmap(visible_slots)(mask)
    return idx, count, (jnp.max(count) + spec.block - 1) // spec.block, spec.block
  if spec.attention == "pallas":
    from apr_jax.model.pallas_attention import visible_pages
    return "pages", spec.block, visible_pages(mask, spec.block)
  return None


def prefill(graphdef, params, st: EngineState, spec: TreeSpec, c: int, min_tokens: int,
            shards: int) -> EngineState:
  """One prefill call: in each data shard, the lane with the most prefill work writes up to
  c tokens of one thread's forced queue (`plan`); nothing else changes. The step counter
  does not advance (the tokens are logged at the current step)."""
  model: Transformer = nnx.merge(graphdef, params)
  lanes = jax.vmap(lambda l: assign_rows(l, spec))(st.lanes)
  g = jax.vmap(lambda l: plan(l, spec, c, min_tokens))(lanes)              # [L, W]
  per_lane = jnp.sum(g, axis=1).reshape(shards, -1)
  idx = jnp.argmax(per_lane, axis=1)                                       # a lane per shard
  chosen = jnp.zeros_like(per_lane, bool).at[jnp.arange(shards), idx].set(True).reshape(-1)
  g = jnp.where(chosen[:, None], g, 0)
  lanes, pk, _ = jax.vmap(lambda l, gg: _book(l, gg, st.step, spec, c))(lanes, g)
  lanes = jax.vmap(write_log)(lanes, pk["log"])
  mask, mask_new = jax.vmap(lambda l, p: _masks(l, p, spec, c))(lanes, pk)
  cache = tuple(kvlib.LayerKV(_pick(x.k, shards, idx), _pick(x.v, shards, idx)) for x in st.cache)
  mask = _pick(mask, shards, idx)
  _, new_kv = model.read_cache(_pick(pk["tok"], shards, idx), _pick(pk["pos"], shards, idx),
                               mask, _pick(mask_new, shards, idx), cache, _visible(mask, spec))
  new = []
  for c_full, kv in zip(st.cache, new_kv):  # the picked lanes' new KV; the others write nothing
    shape = (spec.lanes,) + kv.k.shape[1:]
    new.append(kvlib.write(c_full, _unpick(shape, kv.k, shards, idx),
                           _unpick(shape, kv.v, shards, idx), pk["slot"]))
  return st.replace(lanes=lanes, cache=tuple(new))
