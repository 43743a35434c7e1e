"""A request's life in a lane: admitted into a free request slot, closed (every unfinished
thread stopped with a reason, its rows and KV freed), released once the host has read it."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from apr_jax.engine.tree.ops import any_per_request, per_request
from apr_jax.engine.tree.state import (Lane, Next, Requests, Scripts, ThreadState, Threads,
                                       TreeSpec)


def live_threads(lane: Lane):
  """[NT] bool: the entry holds a thread of a request that is still running."""
  th, rq = lane.threads, lane.requests
  q = jnp.clip(th.req, 0)
  return (th.req >= 0) & rq.active[q] & ~rq.done[q]


def child_key(key_data, rank):
  """A child's PRNG key from its parent's: streams never collide, at any depth."""
  return jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(key_data), rank + 1))


def script_row(scripts: Scripts, req, parent_row, rank):
  """The script row of the thread that is child `rank` of the thread with script row
  `parent_row` (the root: parent_row -1, rank -1), or -1 (not scripted)."""
  rq = jnp.clip(req, 0)
  hit = (scripts.parent[rq] == parent_row) & (scripts.rank[rq] == rank)
  ok = jnp.any(hit) & (req >= 0) & ((parent_row >= 0) | (rank < 0))
  return jnp.where(ok, jnp.argmax(hit), -1).astype(jnp.int32)


def _reset_request(lane: Lane, r, spec: TreeSpec) -> Lane:
  fresh_r, fresh_s = Requests.empty(spec), Scripts.empty(spec)
  at = lambda tab, fresh: tab.replace(**{k: getattr(tab, k).at[r].set(getattr(fresh, k)[0])
                                         for k in fresh.__dataclass_fields__})
  return lane.replace(requests=at(lane.requests, fresh_r), scripts=at(lane.scripts, fresh_s))


def root_of(th: Threads, r):
  """The thread-table entry of request slot r's root (-1: r holds no request)."""
  hit = (th.req == r) & (th.parent < 0) & (r >= 0)
  return jnp.where(jnp.any(hit), jnp.argmax(hit), -1).astype(jnp.int32)


def admit(lane: Lane, r, prompt, plen, limits, key, script, step, count0, mark0, fork0, outline0,
          src_slot, upto, spec: TreeSpec) -> Lane:
  """Request slot `r` (free) takes a request whose root thread, in the lowest free entry of
  the thread table, will read `prompt` [Q]. `script`: its Scripts rows (tokens [NS, J],
  length, parent, rank [NS]); count0 / mark0 / fork0: what the prompt already opened
  (children announced, the opening tag's position or -1, whether it ends with the trigger);
  outline0: the root's o_* fields after the prompt (a dict; `Threads`).

  src_slot >= 0: the prompt's first `upto` tokens are the prompt of the request in that
  slot, whose root stores them: `prompt` holds the rest (it starts at position `upto`), and
  the root waits for a row until they are stored (`packing.assign_rows`)."""
  lane = _reset_request(lane, r, spec)
  rq = lane.requests.set_at(r, active=True, limits=limits, key=key, created=1, start=step)
  sc = lane.scripts.set_at(r, tokens=script[0], length=script[1], parent=script[2], rank=script[3])
  lane = lane.replace(requests=rq, scripts=sc)
  th = lane.threads
  t = jnp.argmax(th.req < 0)
  src = root_of(th, src_slot)
  th = th.set_at(
      t, req=r, state=ThreadState.READY, queue=prompt, q_len=plen, start=step, count=count0,
      src=src, upto=jnp.where(src >= 0, upto, 0), pos=jnp.where(src >= 0, upto, 0),
      mark_pending=mark0 >= 0, mark_pos=mark0, after=jnp.where(fork0, Next.FORK, Next.SAMPLE),
      script=script_row(sc, r, -1, -1), born_log=lane.log.n, key=child_key(key, -1), **outline0)
  th = th.replace(vis=th.vis.at[t, t].set(True))
  return lane.replace(threads=th)


def _free_rows_and_slots(lane: Lane, mine) -> Lane:
  """Rows and KV slots of threads `mine` [NT] are freed."""
  rt, ow = lane.rows.thread, lane.slots.owner
  rows = lane.rows.replace(thread=jnp.where((rt >= 0) & mine[jnp.clip(rt, 0)], -1, rt))
  slots = lane.slots.replace(owner=jnp.where((ow >= 0) & mine[jnp.clip(ow, 0)], -1, ow))
  return lane.replace(rows=rows, slots=slots)


def _with_dependents(lane: Lane, cond_r, reason_r):
  """The requests that end with `cond_r` [R], and the running requests whose shared prompt
  prefix an ending request's root has not stored yet (they end with its reason)."""
  th, nr = lane.threads, cond_r.shape[0]
  s = jnp.clip(th.src, 0)
  src_r = jnp.where(th.src >= 0, th.req[s], -1)
  lost = (live_threads(lane) & ~cond_r[jnp.clip(th.req, 0)] & (src_r >= 0) &
          cond_r[jnp.clip(src_r, 0)] & (th.pos[s] < th.upto))                  # [NT]
  lost_r = any_per_request(th.req, lost, nr)
  why = per_request(jnp.where(lost, th.req, -1), reason_r[jnp.clip(src_r, 0)], nr, "max")
  return cond_r | lost_r, jnp.where(lost_r, why, reason_r)


def _hand_over(lane: Lane, mine) -> Lane:
  """Before the entries `mine` [NT] release their KV: the prompt prefix that other running
  requests share from one of them passes to one of those requests' roots (the one that
  shares the longest prefix: its own tokens start past what the others see), and every
  thread that read it from the old owner reads it from the new one."""
  th, sl, nt = lane.threads, lane.slots, mine.shape[0]
  s = jnp.clip(th.src, 0)
  dep = ~mine & (th.src >= 0) & mine[s]
  cand = dep & live_threads(lane) & (th.parent < 0) & (th.pos[s] >= th.upto)
  e = jnp.arange(nt)
  score = jnp.where(cand, th.upto * nt + (nt - 1 - e), -1)
  best = jnp.full((nt,), -1, jnp.int32).at[jnp.where(cand, th.src, nt)].max(score, mode="drop")
  heir = jnp.where(best >= 0, nt - 1 - best % nt, -1)
  heir_upto = jnp.where(best >= 0, best // nt, 0)
  ow = sl.owner
  u = jnp.clip(ow, 0)
  move = (ow >= 0) & mine[u] & (heir[u] >= 0) & (sl.pos < heir_upto[u])
  return lane.replace(slots=sl.replace(owner=jnp.where(move, heir[u], ow)),
                      threads=th.replace(src=jnp.where(dep, heir[s], th.src)))


def close(lane: Lane, cond_r, reason_r, step) -> Lane:
  """Ends the requests in `cond_r` [R] (running ones only): their unfinished threads stop
  with `reason_r` [R], their rows and KV slots are freed (a prompt prefix other requests
  share passes to one of them, `_hand_over`; a request whose shared prefix is not stored yet
  ends with them). The thread table and the token log
  keep their entries until the host has read them (`release`)."""
  cond_r = cond_r & lane.requests.active & ~lane.requests.done
  cond_r, reason_r = _with_dependents(lane, cond_r, reason_r)
  th = lane.threads
  q = jnp.clip(th.req, 0)
  mine = (th.req >= 0) & cond_r[q]                                          # [NT]
  lane = _hand_over(lane, mine)
  rq, th = lane.requests, lane.threads
  alive = mine & (th.state != ThreadState.DONE) & (th.state != ThreadState.FREE)
  th = th.where(alive, reason=reason_r[q], end=step, state=ThreadState.DONE).where(mine, row=-1)
  rq = rq.where(cond_r, reason=reason_r, end=step, done=True)
  return _free_rows_and_slots(lane.replace(threads=th, requests=rq), mine)


def terminate(lane: Lane, reason, step, cond_r) -> Lane:
  """Where `cond_r` [R]: ends the request with `reason` (scalar or [R])."""
  return close(lane, cond_r, jnp.broadcast_to(jnp.asarray(reason, jnp.int32), cond_r.shape), step)


def _compact_log(lane: Lane, mine, spec: TreeSpec) -> Lane:
  """Drops the log entries of threads `mine` [NT]; the others keep their order and the
  threads' log indices (block marks, birth) are remapped."""
  lg, log, th = spec.n_log, lane.log, lane.threads
  e = jnp.arange(lg)
  gt = log.thread
  keep = (e < log.n) & ~((gt >= 0) & mine[jnp.clip(gt, 0)])
  new_idx = jnp.cumsum(keep) - 1
  dest = jnp.where(keep, new_idx, lg + e)
  moved = {k: jnp.full((lg,), -1 if k == "thread" else 0, getattr(log, k).dtype).at[dest].set(
      getattr(log, k), mode="drop", unique_indices=True)
      for k in ("tok", "thread", "pos", "kind", "step", "logp")}
  kept = jnp.sum(keep).astype(jnp.int32)
  ci = lambda i: jnp.clip(i, 0, lg - 1)
  remap = lambda i: jnp.where(i >= 0, new_idx[ci(i)] + (~keep[ci(i)]), i)
  th = th.replace(mark_log=remap(th.mark_log),
                  born_log=jnp.where(th.born_log < log.n, remap(th.born_log),
                                     th.born_log - (log.n - kept)))
  return lane.replace(log=log.replace(n=kept, **moved), threads=th)


def release(lane: Lane, r, spec: TreeSpec) -> Lane:
  """Frees request slot `r` after the host has read its result: its thread-table entries,
  KV slots, script rows and recorded logits; its token-log entries are compacted away (the
  other requests' log indices are remapped)."""
  mine = lane.threads.req == r
  lane = _free_rows_and_slots(lane, mine)
  lane = _compact_log(lane, mine, spec)
  fresh = Threads.empty(spec)
  th = lane.threads.where(mine, **{k: getattr(fresh, k) for k in fresh.__dataclass_fields__})
  th = th.replace(vis=th.vis & ~mine[None, :])
  rec = jnp.where(mine[:, None, None], 0.0, lane.rec) if spec.record_logits else lane.rec
  return _reset_request(lane.replace(threads=th, rec=rec), r, spec)
