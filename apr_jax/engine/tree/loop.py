"""The loop: one engine step (pack, model, sample, fork, finish, join) over every lane, the
step variants, the `while_loop` segment, and the whole-state entry points the host calls
between segments (admit, cancel, release)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from apr_jax.cache import kv as kvlib
from apr_jax.engine.tree import budgets, forkjoin, requests
from apr_jax.engine.tree.packing import assign_rows, pack, rows_to_assign, write_log
from apr_jax.engine.tree.state import EngineState, Lane, Scripts, TreeSpec, empty_lane
from apr_jax.model.transformer import Transformer


def update(lanes: Lane, logits, drained, step, spec: TreeSpec) -> Lane:
  """Acts on every drained row of every lane: fork, finish, or sample and run the protocol
  state machine; then joins. The rare, heavier phases (fork, join, a request's end) sit
  behind `lax.cond`s taken over all lanes at once (inside a vmap they would run every step)."""
  vm = jax.vmap
  lanes, drained, fork_w = vm(lambda l, d: budgets.classify(l, d, step))(lanes, drained)
  t_w = jnp.clip(lanes.rows.thread, 0)  # before forks release rows
  zeros = jnp.zeros(fork_w.shape, jnp.int32)
  no_join = jnp.zeros(lanes.threads.req.shape, bool)
  lanes, n_forked, join_now = jax.lax.cond(
      jnp.any(fork_w), lambda l: vm(lambda a, f: forkjoin.fork(a, spec, f, step))(l, fork_w),
      lambda l: (l, zeros, no_join), lanes)
  lanes, fin_t = vm(lambda l, t, lo, d, n: budgets.sample_phase(l, t, lo, d, n, step, spec))(
      lanes, t_w, logits, drained, n_forked)
  lanes, join_p, root_done, root_reason = vm(lambda l, f: forkjoin.finish(l, spec, f, step))(lanes, fin_t)
  join_p = join_p | (join_now & vm(requests.live_threads)(lanes))  # an empty APR spawn
  lanes = jax.lax.cond(
      jnp.any(root_done),
      lambda l: vm(lambda a, d, r: requests.close(a, d, r, step))(l, root_done, root_reason),
      lambda l: l, lanes)
  return jax.lax.cond(jnp.any(join_p), lambda l: vm(lambda a, j: forkjoin.join(a, spec, j, step))(l, join_p),
                      lambda l: l, lanes)


def _last_logits(model: Transformer, h, pk, spec: TreeSpec, m: int):
  """Logits [lanes, W, V] of each row that drained (at most min(rows, m) of them per lane)."""
  r = min(spec.rows, m)
  sel = jax.vmap(lambda d: jnp.nonzero(d, size=r, fill_value=spec.rows)[0])(pk["drained"])  # [L, R]
  last = jnp.take_along_axis(pk["last"], jnp.clip(sel, 0, spec.rows - 1), axis=1)
  hl = jnp.take_along_axis(h, last[..., None], axis=1)                    # [L, R, E]
  lo = model.logits(hl)                                                   # [L, R, V]
  b = jnp.arange(lo.shape[0])[:, None]
  return jnp.zeros((lo.shape[0], spec.rows, lo.shape[-1]), lo.dtype).at[b, sel].set(lo, mode="drop")


def visible_kv(pk, spec: TreeSpec):
  """What the packed tokens `pk` read of the cache, for `Transformer.read_cache`: (visible,
  the KV slots seen and the KV slots read, float32 scalars). visible is None for dense
  attention (every slot read)."""
  visible = None
  seen = jnp.sum(pk["vis_count"]).astype(jnp.float32)
  read = jnp.float32(spec.lanes * spec.slots)
  if spec.attention == "tree":  # blocks to visit: the lane that sees the most decides
    n_blocks = (jnp.max(pk["vis_count"]) + spec.block - 1) // spec.block
    visible = (pk["vis_idx"], pk["vis_count"], n_blocks, spec.block)
    read = (n_blocks * spec.block * spec.lanes).astype(jnp.float32)
  elif spec.attention == "pallas":  # the pages holding a slot some packed token sees
    from apr_jax.model.pallas_attention import visible_pages
    pages = visible_pages(pk["mask"], spec.block)  # once per step, for every layer
    visible = ("pages", spec.block, pages)
    read = (jnp.sum(pages[1]) * spec.block).astype(jnp.float32)
  return visible, seen, read


def forward_step(model: Transformer, st: EngineState, spec: TreeSpec, m: int, pad_to: int = 0):
  """Packing and the model of one engine step of at most `m` tokens per lane. Returns
  (lanes, out): out holds what the rest of the step writes, padded to `pad_to` tokens so
  that every variant has the same shapes: "log" (`packing.write_log`'s entries), "kv" (a
  LayerKV per layer with k, v [lanes, pad_to, K, D]) and "slot" [lanes, pad_to] (where
  they go, pad slots dropped), "logits" [lanes, W, V] and "drained" [lanes, W] (for
  `update`), "reads" (the KV slots seen and read [2]). Nothing big is written here: inside a
  `lax.switch` branch the cache, the log and the tables `update` writes would be copied
  whole every step, so `finish_step` writes them after the switch."""
  step = st.step
  lanes, pk = jax.vmap(lambda l: pack(l, step, spec, m))(st.lanes)
  visible, seen, read = visible_kv(pk, spec)
  h, new_kv = model.read_cache(pk["tok"], pk["pos"], pk["mask"], pk["mask_new"], st.cache,
                               visible)
  # token-major ([lanes, T, K, D], what `kvlib.write_slots` scatters) at m tokens, not pad_to
  new_kv = jax.tree.map(lambda x: x.transpose(0, 2, 1, 3), new_kv)
  slot, log = pk["slot"], pk["log"]
  if pad_to > m:
    n = slot.shape[0]
    new_kv = jax.tree.map(lambda x: jnp.pad(x, ((0, 0), (0, pad_to - m), (0, 0), (0, 0))), new_kv)
    pad = jnp.broadcast_to(spec.slots + jnp.arange(m, pad_to), (n, pad_to - m))
    slot = jnp.concatenate([slot, pad.astype(slot.dtype)], axis=1)
    drop = jnp.broadcast_to(spec.n_log + jnp.arange(m, pad_to), (n, pad_to - m))
    log = {k: jnp.concatenate([v, drop.astype(v.dtype) if k == "at" else
                               jnp.zeros((n, pad_to - m), v.dtype)], axis=1)
           for k, v in log.items()}
  out = dict(log=log, kv=new_kv, slot=slot, logits=_last_logits(model, h, pk, spec, m),
             drained=pk["drained"], reads=jnp.stack([seen, read]))
  return lanes, out


def finish_lanes(lanes: Lane, out: dict, step, spec: TreeSpec) -> Lane:
  """The lanes' part of a step after `forward_step`: the log entries written, then `update`
  (sampling, the protocol, fork, finish, join)."""
  lanes = jax.vmap(write_log)(lanes, out["log"])
  return update(lanes, out["logits"], out["drained"], step, spec)


def finish_step(st: EngineState, lanes: Lane, out: dict, spec: TreeSpec) -> EngineState:
  """The rest of a step after `forward_step`, in place: the new KV written, `finish_lanes`."""
  cache = tuple(kvlib.write_slots(c, kv.k, kv.v, out["slot"]) for c, kv in zip(st.cache, out["kv"]))
  return st.replace(lanes=finish_lanes(lanes, out, st.step, spec), cache=cache,
                    step=st.step + 1, reads=st.reads + out["reads"])


def step_sizes(spec: TreeSpec) -> tuple:
  """Token budgets of the step variants: 1 (one thread decoding), rows (every row decoding),
  2 x rows (a few forced tokens: closing tags, a join's forced tokens) and chunk (prompts,
  re-prefills). More variants cost compile time, not run time."""
  return tuple(sorted({1, spec.rows, min(max(2 * spec.rows, 8), spec.chunk), spec.chunk}))


def _variant(st: EngineState, cost, spec: TreeSpec):
  """Which step variant to run: the smallest that covers the busiest lane, or (every cost
  > 0) the one that writes the most tokens per unit of cost."""
  sizes = step_sizes(spec)
  lanes = st.lanes
  tw = jnp.clip(lanes.rows.thread, 0)
  qlen = jnp.take_along_axis(lanes.threads.q_len, tw, axis=1)
  busy = lanes.rows.thread >= 0  # rows of ended requests are freed the step they end
  per_lane = jnp.sum(jnp.where(busy, jnp.minimum(qlen, spec.chunk), 0), axis=1)   # [L]
  which = jnp.minimum(jnp.sum(jnp.asarray(sizes) < jnp.max(per_lane)), len(sizes) - 1)
  covered = jnp.stack([jnp.sum(jnp.minimum(per_lane, m)) for m in sizes]).astype(jnp.float32)
  best = jnp.argmax(covered / jnp.maximum(cost, 1e-9)).astype(which.dtype)
  return jnp.where(jnp.all(cost > 0), best, which)


def segment(graphdef, params, st: EngineState, until_step, cost, spec: TreeSpec) -> EngineState:
  """Runs engine steps while step < until_step and some lane has work.

  Each step runs one variant of `step_sizes(spec)` (tokens per lane). `cost` [n variants]
  float32 is their relative cost per step: with every entry > 0 the step runs the variant
  that writes the most tokens per unit of cost (a busy lane whose work exceeds it waits:
  its forced chunk, or its rows past the budget; e.g. one lane's 30-token prompt does not
  make every lane run a 32-token step on a machine where that costs 6x a 1-token step);
  otherwise (all zeros, the default) the smallest variant that covers the busiest lane.
  The schedule changes when tokens are written, not which: sampled tokens and logits are
  the same; only what depends on siblings' relative progress can differ (which thread a
  total-token budget cuts, race cancellation, pruning). `st.vsteps` counts the steps run
  of each variant (the runner fits `cost` from them)."""
  model: Transformer = nnx.merge(graphdef, params)
  sizes = step_sizes(spec)

  def cond(st):
    rq = st.lanes.requests
    return (st.step < until_step) & jnp.any(rq.active & ~rq.done)

  def body(st):
    # rows change hands only after a fork, a join, a finish or an admission: most steps
    # skip the assignment (one predicate instead of its ops)
    assign = jnp.any(jax.vmap(rows_to_assign)(st.lanes))
    st = st.replace(lanes=jax.lax.cond(
        assign, lambda l: jax.vmap(lambda a: assign_rows(a, spec))(l), lambda l: l, st.lanes))
    which = _variant(st, cost, spec)
    if len(sizes) == 1:
      lanes, out = forward_step(model, st, spec, sizes[0])
    else:
      lanes, out = jax.lax.switch(
          which, [functools.partial(forward_step, model, spec=spec, m=m, pad_to=sizes[-1]) for m in sizes],
          st)
    st = finish_step(st, lanes, out, spec)
    return st.replace(vsteps=st.vsteps.at[which].add(1))

  return jax.lax.while_loop(cond, body, st)


# ----------------------------------------------------------------------------- host entry points
def _on_lane(st: EngineState, lane_idx, fn) -> EngineState:
  old = jax.tree.map(lambda a: a[lane_idx], st.lanes)
  return st.replace(lanes=jax.tree.map(lambda a, b: a.at[lane_idx].set(b), st.lanes, fn(old)))


def admit(st: EngineState, lane_idx, req_idx, prompt, plen, limits, key, script: Scripts, count0,
          mark0, fork0, outline0, src_slot, upto, spec: TreeSpec) -> EngineState:
  """Request slot `req_idx` of lane `lane_idx` takes a request (`requests.admit`); `script`:
  its rows of the Scripts table (no request axis); src_slot >= 0: its first `upto` prompt
  tokens are stored by the request in that slot."""
  rows = (script.tokens, script.length, script.parent, script.rank)
  return _on_lane(st, lane_idx, lambda l: requests.admit(
      l, req_idx, prompt, plen, limits, key, rows, st.step, count0, mark0, fork0, outline0,
      src_slot, upto, spec))


def cancel(st: EngineState, lane_idx, req_idx, reason, spec: TreeSpec) -> EngineState:
  """Ends a running request with `reason` (a StopReason; the deadline)."""
  cond = jnp.arange(spec.requests) == req_idx
  return _on_lane(st, lane_idx, lambda l: requests.terminate(l, reason, st.step, cond))


def release(st: EngineState, lane_idx, req_idx, spec: TreeSpec) -> EngineState:
  """Frees a finished request's slot once its result has been read (`requests.release`)."""
  return _on_lane(st, lane_idx, lambda l: requests.release(l, req_idx, spec))


def init(spec: TreeSpec, cfg, cache_dtype, cache_sharding=None) -> EngineState:
  """An engine state with no request: every lane empty, a zero KV cache."""
  lane = empty_lane(spec, cfg.vocab_size)
  lanes = jax.tree.map(lambda a: jnp.broadcast_to(a, (spec.lanes,) + a.shape), lane)
  cache = kvlib.init_cache(cfg, spec.lanes, spec.slots, cache_dtype, cache_sharding)
  return EngineState(lanes=lanes, cache=cache, step=jnp.zeros((), jnp.int32),
                     vsteps=jnp.zeros((len(step_sizes(spec)),), jnp.int32),
                     reads=jnp.zeros((2,), jnp.float32))
