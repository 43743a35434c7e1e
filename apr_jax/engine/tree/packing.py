"""Scheduling and packing: ready threads take free rows; each step packs up to M tokens of
a lane's running threads (a last sample, or a chunk of a forced queue), books their KV slots
and log entries and builds their attention masks over the lane's pool."""
from __future__ import annotations

import jax.numpy as jnp

from apr_jax.engine.tree.ops import any_per_request, per_request, targets
from apr_jax.engine.tree.requests import live_threads, terminate
from apr_jax.engine.tree.state import Lane, LogKind, StopReason, ThreadState, TreeSpec


def _ready(lane: Lane):
  """[NT] bool: threads that may take a row (a root that shares another's prompt prefix
  once that root has stored it)."""
  th = lane.threads
  stored = (th.src < 0) | (th.pos[jnp.clip(th.src, 0)] >= th.upto)
  return (th.state == ThreadState.READY) & live_threads(lane) & stored


def rows_to_assign(lane: Lane):
  """Whether `assign_rows` changes anything: a ready thread and a free row."""
  return jnp.any(_ready(lane)) & jnp.any(lane.rows.thread < 0)


def assign_rows(lane: Lane, spec: TreeSpec) -> Lane:
  """Ready threads (lowest id first) take free rows; a root that shares another's prompt
  prefix once that root has stored it."""
  th = lane.threads
  ready = _ready(lane)
  free_row = lane.rows.thread < 0
  ready_ids = jnp.nonzero(ready, size=spec.rows, fill_value=-1)[0]
  rank = jnp.cumsum(free_row) - 1
  cand = jnp.where(free_row & (rank < jnp.sum(ready)), ready_ids[jnp.clip(rank, 0, spec.rows - 1)], -1)
  r_thread = jnp.where(free_row, cand, lane.rows.thread)
  tid = targets(cand >= 0, cand, spec.threads)
  th = th.set_at(tid, state=ThreadState.RUN, row=jnp.arange(spec.rows))
  return lane.replace(rows=lane.rows.replace(thread=r_thread), threads=th)


def _row_tokens(lane: Lane, spec: TreeSpec, m: int):
  """Tokens each row writes this step, g [W]: one for each row with work, then the rest of
  the forced queues, in row order, up to `m` and the free memory (KV slots and log entries).
  Returns (g, has [W], oom_r [R], ctx_r [R]): rows past the memory end their requests
  `out_of_memory`, a thread about to write past the model's context ends its request
  (`context`); nothing of either is written. Rows past `m` wait for a later step."""
  th, nr = lane.threads, spec.requests
  tw = jnp.clip(lane.rows.thread, 0)
  has = (lane.rows.thread >= 0) & live_threads(lane)[tw]
  q_w = jnp.where(has, th.req[tw], -1)
  qlen = jnp.where(has, th.q_len[tw], 0)
  base = (qlen > 0).astype(jnp.int32)
  mem = jnp.minimum(jnp.sum(lane.slots.owner < 0), spec.n_log - lane.log.n)
  oom_r = per_request(jnp.where(jnp.cumsum(base) > mem, q_w, -1), base, nr, "max") > 0
  base = jnp.where(oom_r[jnp.clip(q_w, 0)], 0, base)
  # rows past this step's token budget wait (a variant smaller than the lane's work, chosen
  # for the other lanes' sake)
  base = jnp.where(jnp.cumsum(base) > m, 0, base)
  extra_need = jnp.where(base > 0, jnp.maximum(qlen - 1, 0), 0)
  room = jnp.maximum(jnp.minimum(m, mem) - jnp.sum(base), 0)
  extra = jnp.clip(room - (jnp.cumsum(extra_need) - extra_need), 0, extra_need)
  g = base + extra
  ctx_r = jnp.zeros((nr,), bool)
  if spec.context:
    past = has & (g > 0) & (th.pos[tw] + g > spec.context)
    ctx_r = any_per_request(q_w, past, nr)
    g = jnp.where(ctx_r[jnp.clip(q_w, 0)], 0, g)
  return g, has, qlen, oom_r, ctx_r


def _book(lane: Lane, g, step, spec: TreeSpec, m: int):
  """Writes the packed tokens' slots and log entries and advances their threads. Returns
  (lane, packed token fields: tok, pos, slot, valid, thread t_m [M], and cum [W])."""
  th, nt, w, s, lg = lane.threads, spec.threads, spec.rows, spec.slots, spec.n_log
  tw = jnp.clip(lane.rows.thread, 0)
  cum = jnp.cumsum(g)
  start, total = cum - g, cum[-1]
  mi = jnp.arange(m)
  row_m = jnp.clip(jnp.searchsorted(cum, mi, side="right"), 0, w - 1)
  valid = mi < total
  off = mi - start[row_m]
  t_m = tw[row_m]
  qi = jnp.clip(th.q_head[t_m] + off, 0, spec.n_queue - 1)
  tok = jnp.where(valid, th.queue[t_m, qi], 0)
  pos = jnp.where(valid, th.pos[t_m] + off, 0)
  kind = jnp.where((qi == 0) & th.q_sampled[t_m], LogKind.SAMPLED, LogKind.FORCED)
  free_slots = jnp.nonzero(lane.slots.owner < 0, size=m, fill_value=s)[0]
  slot = jnp.where(valid, free_slots, s + mi)
  slots = lane.slots.replace(
      owner=lane.slots.owner.at[slot].set(t_m, mode="drop", unique_indices=True),
      pos=lane.slots.pos.at[slot].set(pos, mode="drop", unique_indices=True))
  li = jnp.where(valid, lane.log.n + mi, lg + mi)
  entries = dict(at=li, tok=tok, thread=t_m, pos=pos, kind=kind,
                 step=jnp.full((m,), step, jnp.int32),
                 logp=jnp.where(kind == LogKind.SAMPLED, th.last_logp[t_m], 0.0))
  log = lane.log.replace(n=lane.log.n + total)
  # a pending mark (an opening tag) gets the log index of its token
  hit = valid & th.mark_pending[t_m] & (pos == th.mark_pos[t_m])
  th = th.set_at(targets(hit, t_m, nt), mark_log=li, mark_pending=False)
  th = th.add_at(targets(g > 0, tw, nt), pos=g, q_head=g, q_len=-g, n_written=g)  # g > 0: a live row
  ow = slots.owner
  held = per_request(jnp.where(ow >= 0, th.req[jnp.clip(ow, 0)], -1), jnp.ones_like(ow),
                     spec.requests)
  rq = lane.requests.replace(high=jnp.maximum(lane.requests.high, held))
  lane = lane.replace(threads=th, slots=slots, log=log, requests=rq)
  return lane, dict(tok=tok, pos=pos, slot=slot, valid=valid, t_m=t_m, log=entries), cum


def write_log(lane: Lane, entries: dict) -> Lane:
  """Writes the log entries `_book` booked (entries["at"]: their indices, >= n_log dropped).
  Kept apart from the booking so that a loop choosing a step variant with `lax.switch` can
  write the log outside the switch: a table written inside a branch is copied whole."""
  at = entries["at"]
  return lane.replace(log=lane.log.replace(**{
      k: getattr(lane.log, k).at[at].set(v, mode="drop", unique_indices=True)
      for k, v in entries.items() if k != "at"}))


def _masks(lane: Lane, pk: dict, spec: TreeSpec, m: int):
  """mask [M, S]: what each packed token sees among the slots held before this step (its
  own request's visible threads and its shared prompt prefix, at positions <= its own); mask_new [M, M]: among this
  step's tokens (a read-only cache sees them through the new keys)."""
  s, owner = spec.slots, lane.slots.owner
  th, t_m = lane.threads, pk["t_m"]
  vis = th.vis[t_m]                                                        # [M, NT]
  mask = jnp.take_along_axis(vis, jnp.broadcast_to(jnp.clip(owner, 0)[None, :], (m, s)), axis=1)
  # a shared prompt prefix: the first `upto` positions of another root's slots
  mask = mask | ((owner[None, :] == th.src[t_m][:, None]) &
                 (lane.slots.pos[None, :] < th.upto[t_m][:, None]))
  mask = (mask & (owner >= 0)[None, :] & (lane.slots.pos[None, :] <= pk["pos"][:, None])
          & pk["valid"][:, None])
  slot = pk["slot"]
  wrote = jnp.zeros((s,), bool).at[slot].set(True, mode="drop")
  mask_new = jnp.take(mask, jnp.clip(slot, 0, s - 1), axis=1) & (slot < s)[None, :]
  return mask & ~wrote[None, :], mask_new


def visible_slots(mask):
  """The slots some packed token sees (mask [M, S]): (idx [S], those slots first, count)."""
  seen = jnp.any(mask, axis=0)
  return (jnp.nonzero(seen, size=seen.shape[0], fill_value=0)[0].astype(jnp.int32),
          jnp.sum(seen).astype(jnp.int32))


def pack(lane: Lane, step, spec: TreeSpec, m: int):
  """Chooses this step's tokens for one lane and books their slots and log entries (the
  entries are returned as packed["log"], for `write_log`).

  Returns (lane, packed) with packed = tok/pos/slot [M], mask [M, S] over the slots held
  before this step, mask_new [M, M] over this step's tokens, last [W] (index of each row's
  last token), drained [W] (the row's queue emptied: sample or act); vis_count: how many
  slots some token sees (with tree attention vis_idx [S]: those slots, listed first).
  """
  g, has, qlen, oom_r, ctx_r = _row_tokens(lane, spec, m)
  lane, pk, cum = _book(lane, g, step, spec, m)
  mask, mask_new = _masks(lane, pk, spec, m)
  drained = has & (g > 0) & (g == qlen)
  lane = terminate(lane, StopReason.OUT_OF_MEMORY, step, oom_r)
  lane = terminate(lane, StopReason.CONTEXT, step, ctx_r)
  packed = dict(tok=pk["tok"], pos=pk["pos"], slot=pk["slot"], mask=mask, mask_new=mask_new,
                last=jnp.clip(cum - 1, 0, m - 1), drained=drained, log=pk["log"])
  if spec.attention == "tree":
    packed["vis_idx"], packed["vis_count"] = visible_slots(mask)
  else:  # the counters only: what the step's tokens see
    packed["vis_count"] = jnp.sum(jnp.any(mask, axis=0)).astype(jnp.int32)
  return lane, packed
