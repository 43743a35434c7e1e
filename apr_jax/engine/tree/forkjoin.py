"""Fork and join: children created in free thread-table entries (their forced prefix, label
and, for fresh contexts, their prompt copied from the parent's spawn line); threads that
finish release their rows; a parent whose children are all done joins them (stitch: relabel
their KV; flat: re-prefill their tokens; results: a results block) and resumes."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from apr_jax.engine.tree.ops import (any_per_request, before_in_request, bucket_sorted, compact,
                                     const, isin, per_request, targets)
from apr_jax.engine.tree.requests import child_key, script_row, terminate
from apr_jax.engine.tree.state import (Lane, Limit, Next, StopReason, ThreadState, Threads,
                                       TreeSpec)


# ----------------------------------------------------------------------------- fork
def _labels(th: Threads, spec: TreeSpec, parent, rank):
  """Label tokens [NT, LBL] and lengths of children number rank + 1 of `parent` [NT]:
  the parent's label, the separator, then the number's digits; or, for protocols that read
  outline numbers, the rank + 1-th distinct number of the parent's block."""
  pr = spec.protocol
  if pr.outline is not None:  # the number the parent's outline wrote (`protocols.outlines`)
    m = jnp.clip(rank, 0, spec.n_outlines - 1)
    lab, n = th.o_lab[parent, m], th.o_len[parent, m]
    pad = spec.label - lab.shape[1]
    return jnp.pad(lab, ((0, 0), (0, pad))) if pad > 0 else lab[:, :spec.label], n
  plab, plen = th.label[parent], th.label_len[parent]
  if not pr.digits:
    return jnp.zeros_like(plab), jnp.zeros_like(plen)
  num = rank + 1
  d_hi, d_lo = num // 10, num % 10
  digits = jnp.asarray(pr.digits, jnp.int32)
  sep, nsep = const(pr.label_sep)
  n = plab.shape[0]
  lab_tok = jnp.concatenate([plab, jnp.broadcast_to(sep, (n, sep.shape[0])),
                             digits[d_hi][:, None], digits[d_lo][:, None]], axis=1)
  lab_ok = jnp.concatenate([
      jnp.arange(spec.label)[None, :] < plen[:, None],
      jnp.broadcast_to((jnp.arange(sep.shape[0]) < nsep)[None, :], (n, sep.shape[0]))
      & (plen > 0)[:, None],
      (d_hi > 0)[:, None], jnp.ones_like(d_lo, bool)[:, None]], axis=1)
  return jax.vmap(lambda t, v: compact(t, v, spec.label))(lab_tok, lab_ok)


def _spawn_line(lane: Lane, spec: TreeSpec, p, r):
  """A fresh child's prompt: child_pre + the text of spawn line r + 1 of p's open block
  (the tokens after its r + 1-th count tag). Returns (queue [Q], length asked for: it may
  exceed Q)."""
  pr, log = spec.protocol, lane.log
  pre, npre = const(pr.child_pre)
  e = jnp.arange(spec.n_log)
  mine = (log.thread == p) & (e > lane.threads.mark_log[p]) & (e < log.n)
  seg = jnp.cumsum(mine & (log.tok == pr.count))
  ok = mine & (seg == r + 1) & (log.tok != pr.count) & (log.tok != pr.fork)
  toks = jnp.concatenate([pre, log.tok])
  oks = jnp.concatenate([jnp.arange(pre.shape[0]) < npre, ok])
  out, _ = compact(toks, oks, spec.n_queue)
  return out, jnp.sum(oks).astype(jnp.int32)


def _live(lane: Lane, spec: TreeSpec):
  """[G] bool: log entries in a thread's context now (no later entry of the same thread
  rewrote their position: a results join or a stop-string rewind went back past them)."""
  log, nt = lane.log, spec.threads
  e = jnp.arange(spec.n_log)
  used = (log.thread >= 0) & (e < log.n)
  cc = jnp.clip(log.thread, 0)
  big = jnp.iinfo(jnp.int32).max
  own = (cc[None, :] == jnp.arange(nt)[:, None]) & used[None, :]               # [NT, G]
  later = jax.lax.cummin(jnp.where(own, log.pos[None, :], big), axis=1, reverse=True)
  later = jnp.concatenate([later[:, 1:], jnp.full((nt, 1), big, later.dtype)], axis=1)
  return used & (log.pos < later[cc, e])


def _apr_plans(lane: Lane, spec: TreeSpec, fork_w):
  """The original APR's spawn of each row in `fork_w` [W] (`protocols.apr_text.plan`, read
  on the parent's live tokens: its log entries that no later entry of it rewrote). Returns
  seq [W, G] (those tokens), spans [W, K, 4, 2], count [W], mark_pos [W] (the position the
  block starts at) and bad [W]; one row at a time (a fork is rare, usually one a step)."""
  from apr_jax.protocols import apr_text
  at, log, w = spec.protocol.text, lane.log, spec.rows
  # a thread's live tokens have distinct positions below the context: read that many
  g = min(spec.context, spec.n_log) if spec.context else spec.n_log
  k_max = spec.n_spawn
  t_w = jnp.clip(lane.rows.thread, 0)
  todo = jnp.nonzero(fork_w, size=w, fill_value=0)[0]
  alive = _live(lane, spec)

  def one(c):
    k, seqs, spans, count, mark, sp, bad = c
    r = todo[k]
    p = t_w[r]
    live = alive & (log.thread == p)
    idx = jnp.nonzero(live, size=g, fill_value=0)[0]
    seq = jnp.where(jnp.arange(g) < jnp.sum(live), log.tok[idx], 0)
    pl = apr_text.plan(at, seq, jnp.sum(live), k_max)
    return (k + 1, seqs.at[r].set(seq), spans.at[r].set(pl["spans"]), count.at[r].set(pl["count"]),
            mark.at[r].set(log.pos[idx[pl["mark"]]]), sp.at[r].set(pl["mark_sp"]),
            bad.at[r].set(pl["bad"]))

  z = jnp.zeros((w,), jnp.int32)
  f = jnp.zeros((w,), bool)
  init = (0, jnp.zeros((w, g), jnp.int32), jnp.zeros((w, k_max, 4, 2), jnp.int32), z, z, f, f)
  _, seqs, spans, count, mark, sp, bad = jax.lax.while_loop(lambda c: c[0] < jnp.sum(fork_w), one,
                                                            init)
  return dict(seq=seqs, spans=spans, count=count, mark=mark, mark_sp=sp, bad=bad & fork_w)


def _apr_child(spec: TreeSpec, plans, row, rank):
  """A child's prompt (queue [Q], length) and label (its node id [LBL], length) from its
  parent row's plan."""
  from apr_jax.protocols import apr_text
  seq, sp = plans["seq"][row], plans["spans"][row, jnp.clip(rank, 0, spec.n_spawn - 1)]
  queue, qlen = apr_text.child_prompt(spec.protocol.text, seq, sp, spec.n_queue)
  k = jnp.arange(spec.label)
  n = jnp.minimum(sp[0, 1] - sp[0, 0], spec.label)
  label = jnp.where(k < n, seq[jnp.clip(sp[0, 0] + k, 0, seq.shape[0] - 1)], 0)
  return queue, qlen, label, n


def _child_queues(lane: Lane, spec: TreeSpec, parent, rank, valid_child, row=None, plans=None):
  """Forced queue [NT, Q], its length (unclipped) and label for each new child (vectorised
  over the thread table). rank: the child's number within its fork (0-based): its label is
  rank + 1 and, for fresh contexts, it reads spawn line rank + 1. With the original APR's
  `plans` (`_apr_plans`), row: each child's parent row; the label is its node id."""
  pr = spec.protocol
  if plans is not None:
    queue, qlen, label, lablen = jax.vmap(lambda w, r: _apr_child(spec, plans, w, r))(row, rank)
    return queue, jnp.where(valid_child, qlen, 0), label, lablen
  label, lablen = _labels(lane.threads, spec, parent, rank)
  if pr.context == "shared":  # child_pre + label + child_post
    pre, npre = const(pr.child_pre)
    post, npost = const(pr.child_post)
    n = label.shape[0]
    toks = jnp.concatenate([jnp.broadcast_to(pre, (n, pre.shape[0])), label,
                            jnp.broadcast_to(post, (n, post.shape[0]))], axis=1)
    ok = jnp.concatenate([
        jnp.broadcast_to(jnp.arange(pre.shape[0]) < npre, (n, pre.shape[0])),
        jnp.arange(spec.label)[None, :] < lablen[:, None],
        jnp.broadcast_to(jnp.arange(post.shape[0]) < npost, (n, post.shape[0]))], axis=1)
    queue, qlen = jax.vmap(lambda t, v: compact(t, v, spec.n_queue))(toks, ok)
  else:
    queue, qlen = jax.vmap(lambda p, r: _spawn_line(lane, spec, p, r))(parent, rank)
  return queue, jnp.where(valid_child, qlen, 0), label, lablen


def _fork_sizes(lane: Lane, spec: TreeSpec, fork_w):
  """Children each row in `fork_w` [W] gets, n_w [W]: what it announced, within its
  request's thread limit (rows of one request take it in row order) and the free entries of
  the thread table."""
  th, rq = lane.threads, lane.requests
  t_w = jnp.clip(lane.rows.thread, 0)
  q_w = th.req[t_w]
  want = jnp.where(fork_w, th.count[t_w], 0)
  avail = jnp.maximum(rq.limits[:, Limit.THREADS] - rq.created, 0)
  before = before_in_request(q_w, want, spec.requests)
  n_w = jnp.clip(avail[jnp.clip(q_w, 0)] - before, 0, want)
  free_t = th.req < 0
  return jnp.clip(jnp.sum(free_t) - (jnp.cumsum(n_w) - n_w), 0, n_w)


def _new_children(lane: Lane, spec: TreeSpec, n_w, step, plans=None):
  """Fills the thread table's lowest free entries with the children of each row (n_w [W]).
  Returns (lane, is_new [NT], child prompt length asked for [NT])."""
  pr, th, nt, w = spec.protocol, lane.threads, spec.threads, spec.rows
  t_w = jnp.clip(lane.rows.thread, 0)
  cum_n = jnp.cumsum(n_w)
  free_t = th.req < 0
  k = jnp.cumsum(free_t) - 1                                           # rank among free entries
  is_new = free_t & (k < cum_n[-1])
  row = jnp.clip(jnp.searchsorted(cum_n, k, side="right"), 0, w - 1)
  parent = t_w[row]
  idx = jnp.where(is_new, k - (cum_n[row] - n_w[row]), 0)              # number within its fork
  rank = th.kid_base[parent] + idx                                     # unique among siblings
  queue, qlen, label, lablen = _child_queues(lane, spec, parent, idx, is_new, row, plans)
  shared = pr.context == "shared"
  own = jax.nn.one_hot(jnp.arange(nt), nt, dtype=bool)
  th = th.where(
      is_new, req=th.req[parent], state=ThreadState.READY, parent=parent, depth=th.depth[parent] + 1,
      rank=rank, pos=th.pos[parent] if shared else 0, cp=th.cp[parent], start=step,
      born_log=lane.log.n, key=jax.vmap(child_key)(th.key[parent], rank),
      script=jax.vmap(lambda q, p, r: script_row(lane.scripts, q, p, r))(
          th.req[parent], th.script[parent], rank),
      queue=queue, q_len=jnp.minimum(qlen, spec.n_queue), q_head=0, q_sampled=False, label=label,
      label_len=lablen, vis=(th.vis[parent] | own) if shared else own,
      src=th.src[parent] if shared else -1, upto=th.upto[parent] if shared else 0)
  return lane.replace(threads=th), is_new, qlen


def fork(lane: Lane, spec: TreeSpec, fork_w, step):
  """Creates the children of every row in `fork_w` [W] that gets >= 1; its thread waits for
  them and leaves its row. Returns (lane, n_w [W]: children per row, or 1 for a row the
  original APR handled without children; join_now [NT]: parents to join at once).

  The original APR (`Protocol.text`): the spawn is read from the parent's text; a malformed
  one ends the request (`malformed`), as the original's search ends; a block without spawn
  lines, or one that gets no thread of the request's max_threads, joins at once (an empty
  results block)."""
  nt, nr = spec.threads, spec.requests
  t_w = jnp.clip(lane.rows.thread, 0)
  plans, bad_w, empty_w = None, jnp.zeros_like(fork_w), jnp.zeros_like(fork_w)
  rw_w = fork_w & (lane.threads.after[t_w] == Next.REWIND)
  if spec.protocol.text is not None:
    lane = rewind(lane, spec, rw_w, step)
    fork_w = fork_w & ~rw_w
    plans = _apr_plans(lane, spec, fork_w)
    bad_w = plans["bad"]
    th = lane.threads.set_at(targets(fork_w, t_w, nt), count=plans["count"], mark_pos=plans["mark"],
                             mark_sp=plans["mark_sp"])
    lane = lane.replace(threads=th)
    fork_w = fork_w & ~bad_w
  n_w = _fork_sizes(lane, spec, fork_w)
  if spec.protocol.text is not None:
    empty_w = fork_w & (n_w == 0)
  q_w = lane.threads.req[t_w]
  lane, is_new, qlen = _new_children(lane, spec, n_w, step, plans)
  forked = (n_w > 0) | empty_w
  th = lane.threads.set_at(targets(forked, t_w, nt), state=ThreadState.WAIT, n_children=n_w,
                           pending=n_w, row=-1)
  th = th.add_at(targets(forked, t_w, nt), kid_base=n_w)
  qf = jnp.where(forked, q_w, -1)
  rq = lane.requests
  rq = rq.replace(forks=rq.forks + per_request(qf, jnp.ones_like(n_w), nr),
                  created=rq.created + per_request(qf, n_w, nr))
  rows = lane.rows.replace(thread=jnp.where(forked, -1, lane.rows.thread))
  lane = lane.replace(threads=th, requests=rq, rows=rows)
  # a child prompt longer than a thread's queue: the request is out of memory
  over = any_per_request(th.req, is_new & (qlen > spec.n_queue), nr)
  lane = terminate(lane, StopReason.OUT_OF_MEMORY, step, over)
  join_now = jnp.zeros((nt,), bool).at[targets(empty_w, t_w, nt)].set(True, mode="drop")
  if spec.protocol.text is not None:
    lane = terminate(lane, StopReason.MALFORMED, step, any_per_request(q_w, bad_w, nr))
  return lane, jnp.where(bad_w | empty_w | rw_w, 1, n_w), join_now


def rewind(lane: Lane, spec: TreeSpec, rw_w, step):
  """Rows in `rw_w` [W] wrote the original APR's stop string `<Sub Searches>` (its last
  token is written): as the original cuts the call's text where the string starts and writes
  `<Calling Sub Searches>` in its place, the thread goes back to the position of the token
  holding the string's first byte (its KV there and after freed) and is forced the
  replacement; the call's token budget starts afresh. The token's text before the string is
  kept when it is a space (the replacement is then spelled after a space); other text there
  is lost (docs/protocols.md)."""
  at, log, th, nt = spec.protocol.text, lane.log, lane.threads, spec.threads
  kb = 48  # tokens walked back: the string is 14 bytes, and a token holds at least one
  t_w = jnp.clip(lane.rows.thread, 0)
  pos = th.pos[t_w]                                                     # [W]
  e = jnp.arange(spec.n_log)
  want = pos[:, None] - 1 - jnp.arange(kb)[None, :]                     # [W, KB]
  hit = ((log.thread[None, None, :] == t_w[:, None, None]) & (e < log.n)[None, None, :] &
         (log.pos[None, None, :] == want[:, :, None]))
  idx = jnp.max(jnp.where(hit, e[None, None, :], -1), axis=2)           # the live entry there
  tok = jnp.where(idx >= 0, log.tok[jnp.clip(idx, 0)], 0)
  nb = jnp.where(idx >= 0, jnp.asarray(at.nbytes)[tok], 0)
  cum = jnp.cumsum(nb, axis=1)
  need = th.rw_need[t_w]
  k = jnp.clip(jnp.sum(cum < need[:, None], axis=1), 0, kb - 1)       # 0-based: token k back
  p0 = pos - 1 - k
  prefix = cum[jnp.arange(k.shape[0]), k] - need
  first = tok[jnp.arange(k.shape[0]), k]
  spaced = (prefix == 1) & jnp.asarray(at.lead_space)[first]
  a, b = at.glue["calling"], at.glue["sp_calling"]
  r = max(len(a), len(b))
  rep = jnp.where(spaced[:, None], jnp.asarray(b + (0,) * (r - len(b)), jnp.int32)[None, :],
                  jnp.asarray(a + (0,) * (r - len(a)), jnp.int32)[None, :])
  tid = targets(rw_w, t_w, nt)
  th = th.replace(queue=th.queue.at[tid[:, None], jnp.arange(r)[None, :]].set(rep, mode="drop"))
  th = th.set_at(tid, q_len=jnp.where(spaced, len(b), len(a)), q_head=0, q_sampled=False, pos=p0,
                 after=Next.SAMPLE, call_base=th.n_sampled[t_w])
  ow = lane.slots.owner
  oc = jnp.clip(ow, 0)
  back = jnp.full((nt,), jnp.iinfo(jnp.int32).max, jnp.int32).at[tid].set(p0, mode="drop")
  slots = lane.slots.replace(owner=jnp.where((ow >= 0) & (lane.slots.pos >= back[oc]), -1, ow))
  return lane.replace(threads=th, slots=slots)


# ----------------------------------------------------------------------------- finish
def finish(lane: Lane, spec: TreeSpec, fin_t, step):
  """Threads in `fin_t` [NT] are done: release rows, count down their parents. Returns
  (lane, join_p [NT], root_done [R], root_reason [R]): the parents whose children are now all
  done; the requests whose root finished and why (the caller closes them)."""
  nt, th = spec.threads, lane.threads
  was_waiting = th.state == ThreadState.WAIT
  th = th.where(fin_t, state=ThreadState.DONE, end=step, row=-1)
  rt = lane.rows.thread
  rows = lane.rows.replace(thread=jnp.where((rt >= 0) & fin_t[jnp.clip(rt, 0)], -1, rt))
  par = th.parent
  th = th.add_at(jnp.where(fin_t & (par >= 0), par, nt), pending=-1)
  join_p = was_waiting & (th.state == ThreadState.WAIT) & (th.pending <= 0)
  root = fin_t & (par < 0) & (th.req >= 0)
  q = jnp.where(root, th.req, -1)
  root_done = any_per_request(th.req, root, spec.requests)
  root_reason = per_request(q, th.reason, spec.requests)
  return lane.replace(threads=th, rows=rows), join_p, root_done, root_reason


# ----------------------------------------------------------------------------- join
def dropped(th: Threads):
  """[NT] bool: threads cancelled by race or pruning (left out of their parent's join)."""
  return (th.reason == StopReason.CANCELLED) | (th.reason == StopReason.PRUNED)


def current_children(th: Threads, p):
  """[NT] bool: the children of p's latest fork (ranks are unique among all of p's children,
  so the latest fork holds the last `n_children` of them)."""
  return (th.parent == p) & (th.req >= 0) & (th.rank >= th.kid_base[p] - th.n_children[p])


def _results_queue(lane: Lane, spec: TreeSpec, kids, is_child, local):
  """A results join's queue: results_open, per child (in fork order) its span from its last
  result tag (stop tokens left out) or no_result, results_close, after_join."""
  pr, log, nt = spec.protocol, lane.log, spec.threads
  e = jnp.arange(spec.n_log)
  cc = jnp.clip(log.thread, 0)
  tag = is_child & isin(log.tok, pr.result_tags)
  last_tag = jnp.full((nt,), -1, jnp.int32).at[jnp.where(tag, cc, nt)].max(
      jnp.where(tag, e, -1), mode="drop")
  span = is_child & (last_tag[cc] >= 0) & (e >= last_tag[cc]) & ~isin(log.tok, tuple(pr.child_stop))
  ro, nro = const(pr.results_open)
  no, nno = const(pr.no_result)
  rc, nrc = const(pr.results_close)
  aj, naj = const(pr.after_join)
  kid_ok = kids & (last_tag < 0)  # a child without a result tag: no_result (never with a span)
  v_tok = jnp.broadcast_to(no[None, :], (nt, no.shape[0])).reshape(-1)
  v_bucket = jnp.broadcast_to(1 + local[:, None], (nt, no.shape[0])).reshape(-1)
  v_ok = (kid_ok[:, None] & (jnp.arange(no.shape[0]) < nno)[None, :]).reshape(-1)
  # buckets: 0 results_open | 1 + child index: its span or no_result | nt + 1 close, after
  toks = jnp.concatenate([ro, v_tok, log.tok, rc, aj])
  bucket = jnp.concatenate([jnp.zeros(ro.shape, jnp.int32), v_bucket, 1 + local[cc],
                            jnp.full(rc.shape[0] + aj.shape[0], nt + 1)])
  valid = jnp.concatenate([jnp.arange(ro.shape[0]) < nro, v_ok, span, jnp.arange(rc.shape[0]) < nrc,
                           jnp.arange(aj.shape[0]) < naj])
  return bucket_sorted(toks, bucket, valid, nt + 2, spec.n_queue)


def _apr_results_queue(lane: Lane, spec: TreeSpec, p, kids, is_child, local):
  """The original APR's results block (`protocols.apr_text`): `<Sub Searches>\n`, per child
  in fork order `<Goal Reached in Sub Search {i} at level 1 at Node #{id}>\n` + its summary
  path + `\n` (the text after its second-to-last `Goal Reached` and one character, without
  the blank tokens at its end), or `<No Solution in Sub Search {i} ...>\n` for a child with
  fewer than two; then `<End Sub Searches>\n`. Parent p's block started after a space
  (`Threads.mark_sp`): the block's first tag is spelled after it."""
  from apr_jax.protocols.apr_text import number_tokens
  at, log, th, nt = spec.protocol.text, lane.log, lane.threads, spec.threads
  gl = at.glue
  cc = jnp.clip(log.thread, 0)
  blank = jnp.asarray(at.blank)[jnp.clip(log.tok, 0, at.blank.shape[0] - 1)]
  is_child = is_child & _live(lane, spec)  # not what a stop-string rewind replaced
  last = jnp.full((nt,), -1, jnp.int32).at[jnp.where(is_child & ~blank, cc, nt)].max(
      log.pos, mode="drop")
  has = kids & (th.g_hit[:, 0] >= 0)
  start = th.g_hit[:, 0] + 1 + th.g_clean[:, 0]
  span = is_child & has[cc] & (log.pos >= start[cc]) & (log.pos <= last[cc])
  # per child: the tag's head, its number, " at level 1 at Node #", its node id, ">\n"
  pre = max(len(gl["goal"]), len(gl["none"]))
  goal = jnp.asarray(gl["goal"] + (0,) * (pre - len(gl["goal"])), jnp.int32)
  none = jnp.asarray(gl["none"] + (0,) * (pre - len(gl["none"])), jnp.int32)
  head = jnp.where(has[:, None], goal[None, :], none[None, :])
  head_ok = jnp.arange(pre)[None, :] < jnp.where(has, len(gl["goal"]), len(gl["none"]))[:, None]
  num, nnum = jax.vmap(lambda i: number_tokens(at, i))(local)
  mid, close = jnp.asarray(gl["mid"], jnp.int32), jnp.asarray(gl["close"], jnp.int32)
  per = jnp.concatenate([head, num, jnp.broadcast_to(mid, (nt, mid.shape[0])), th.label,
                         jnp.broadcast_to(close, (nt, close.shape[0]))], axis=1)
  per_ok = jnp.concatenate([head_ok, jnp.arange(3)[None, :] < nnum[:, None],
                            jnp.ones((nt, mid.shape[0]), bool),
                            jnp.arange(spec.label)[None, :] < th.label_len[:, None],
                            jnp.ones((nt, close.shape[0]), bool)], axis=1) & kids[:, None]
  c = per.shape[1]
  n_ro = max(len(gl["open"]), len(gl["sp_open"]))
  pad = lambda ids: jnp.asarray(ids + (0,) * (n_ro - len(ids)), jnp.int32)
  sp = th.mark_sp[p]
  ro = jnp.where(sp, pad(gl["sp_open"]), pad(gl["open"]))
  ro_ok = jnp.arange(n_ro) < jnp.where(sp, len(gl["sp_open"]), len(gl["open"]))
  rc = jnp.asarray(gl["end"], jnp.int32)
  nl = jnp.asarray(gl["nl"], jnp.int32)
  toks = jnp.concatenate([ro, per.reshape(-1), log.tok, jnp.broadcast_to(nl, (nt, nl.shape[0])).reshape(-1), rc])
  bucket = jnp.concatenate([
      jnp.zeros(ro.shape, jnp.int32), jnp.repeat(1 + local, c), 1 + local[cc],
      jnp.repeat(1 + local, nl.shape[0]), jnp.full(rc.shape, nt + 1, jnp.int32)])
  valid = jnp.concatenate([ro_ok, per_ok.reshape(-1), span,
                           jnp.repeat(has, nl.shape[0]), jnp.ones(rc.shape, bool)])
  return bucket_sorted(toks, bucket, valid, nt + 2, spec.n_queue)


def _child_ends(lane: Lane, spec: TreeSpec):
  """Per thread [NT]: the log index of its first and of its last entry, and whether the
  last is a stop id of the tokenizer (an EOS)."""
  log, nt = lane.log, spec.threads
  e = jnp.arange(spec.n_log)
  cc = jnp.where((log.thread >= 0) & (e < log.n), log.thread, nt)
  first = jnp.full((nt,), spec.n_log, jnp.int32).at[cc].min(e, mode="drop")
  last = jnp.full((nt,), -1, jnp.int32).at[cc].max(e, mode="drop")
  eos_end = (last >= 0) & isin(log.tok[jnp.clip(last, 0)], tuple(spec.root_stop))
  return first, last, eos_end


def _malformed(lane: Lane, spec: TreeSpec, ends):
  """Per parent [NT]: (a child of its latest fork, not cancelled, ended without its stop tag:
  at an EOS or a budget; one was cut by its budget). All False unless the protocol has
  `malformed_close`."""
  th, nt = lane.threads, spec.threads
  if not spec.protocol.malformed_close:
    return jnp.zeros((nt,), bool), jnp.zeros((nt,), bool)
  cut = ~dropped(th) & (th.reason == StopReason.BUDGET)
  bad = cut | (~dropped(th) & ends[2])

  def per_parent(p):
    kids = current_children(th, p)
    return jnp.any(kids & bad), jnp.any(kids & cut)
  return jax.vmap(per_parent)(jnp.arange(nt))


def _flat_queue(lane: Lane, spec: TreeSpec, kids, is_child, local, bad, ends):
  """A flat join's queue: each child's tokens in fork order (children after the first
  joined one without their first forced token where the protocol says so; an EOS that ended a child
  replaced by child_close where the protocol has `malformed_close`), then after_join, or
  malformed_close when `bad` (a child ended without its stop tag). ends: `_child_ends`, or
  None when the protocol uses neither."""
  pr, log, nt = spec.protocol, lane.log, spec.threads
  e = jnp.arange(spec.n_log)
  cc = jnp.clip(log.thread, 0)
  valid = is_child
  if pr.join_skip_first:  # every joined child but the first kept one
    lead = jnp.min(jnp.where(kids, local, nt))
    valid = valid & ~((local[cc] > lead) & (e == ends[0][cc]))
  cl, ncl = const(pr.child_close if pr.malformed_close else ())
  eos_kid = kids & (ends[2] if pr.malformed_close else False)
  if pr.malformed_close:
    valid = valid & ~((e == ends[1][cc]) & eos_kid[cc])
  aj, naj = const(pr.after_join)
  mc, nmc = const(pr.malformed_close)
  c_tok = jnp.broadcast_to(cl[None, :], (nt, cl.shape[0])).reshape(-1)
  c_bucket = jnp.broadcast_to(local[:, None], (nt, cl.shape[0])).reshape(-1)
  c_ok = (eos_kid[:, None] & (jnp.arange(cl.shape[0]) < ncl)[None, :]).reshape(-1)
  toks = jnp.concatenate([log.tok, c_tok, aj, mc])   # a child's close after its tokens
  bucket = jnp.concatenate([local[cc], c_bucket, jnp.full(aj.shape[0] + mc.shape[0], nt)])
  valid = jnp.concatenate([valid, c_ok, (jnp.arange(aj.shape[0]) < naj) & ~bad,
                           (jnp.arange(mc.shape[0]) < nmc) & bad])
  return bucket_sorted(toks, bucket, valid, nt + 1, spec.n_queue)


def _join_queue(lane: Lane, spec: TreeSpec, p, bad, ends):
  """The forced queue of parent p after its children's join (flat / results modes) and its
  length (unclipped). bad: p's join is malformed (`_malformed`); ends: `_child_ends`."""
  pr, th, log, nt = spec.protocol, lane.threads, lane.log, spec.threads
  e = jnp.arange(spec.n_log)
  cc = jnp.clip(log.thread, 0)
  kids = current_children(th, p) & ~dropped(th)                          # [NT]
  is_child = (log.thread >= 0) & kids[cc] & (e < log.n)
  first = th.kid_base[p] - th.n_children[p]
  local = jnp.clip(th.rank - first, 0, nt - 1)    # [NT] index within the fork
  if pr.text is not None:
    return _apr_results_queue(lane, spec, p, kids, is_child, local)
  if pr.join == "results":
    return _results_queue(lane, spec, kids, is_child, local)
  return _flat_queue(lane, spec, kids, is_child, local, bad, ends)


def _join_queues(lane: Lane, spec: TreeSpec, join_p, bad_p, ends):
  """Forced queues [NT, Q] and their (unclipped) lengths [NT] of the joining parents (flat
  and results joins): one queue per joining parent, usually one a step, not one per entry."""
  nt = spec.threads
  todo = jnp.nonzero(join_p, size=nt, fill_value=0)[0]

  def one(c):
    k, queue, qlen = c
    qp, lp = _join_queue(lane, spec, todo[k], bad_p[todo[k]], ends)
    return k + 1, queue.at[todo[k]].set(qp), qlen.at[todo[k]].set(lp)

  _, queue, qlen = jax.lax.while_loop(lambda c: c[0] < jnp.sum(join_p), one,
                                      (0, lane.threads.queue, lane.threads.q_len))
  return queue, qlen


def append_close(queue, qlen, where_t, spec: TreeSpec):
  """Appends the protocol's child close tokens to the queues of threads `where_t` [NT]."""
  close, nclose = const(spec.protocol.child_close)
  if not nclose:
    return queue, qlen
  q = spec.n_queue
  toks = jnp.concatenate([queue, jnp.broadcast_to(close[None, :], (queue.shape[0], close.shape[0]))], 1)
  ok = jnp.concatenate([jnp.arange(q)[None, :] < qlen[:, None],
                        jnp.broadcast_to(where_t[:, None], (queue.shape[0], close.shape[0]))], 1)
  newq, _ = jax.vmap(lambda t, v: compact(t, v, q))(toks, ok)
  return (jnp.where(where_t[:, None], newq, queue),
          jnp.where(where_t, jnp.minimum(qlen, q) + nclose, qlen))


def _merge_kv(lane: Lane, spec: TreeSpec, join_p, bad_p, ends):
  """The joining children's KV: relabelled to the parent (stitch) or freed (flat, results;
  a results join also frees the parent's spawn block). Returns (lane, the parents' new
  positions [NT], their forced queues [NT, Q] and lengths [NT] (unclipped))."""
  pr, th, nt = spec.protocol, lane.threads, spec.threads
  owner = lane.slots.owner
  oc = jnp.clip(owner, 0)
  par = th.parent[oc]
  pc = jnp.clip(par, 0)
  of_joining = (owner >= 0) & (par >= 0) & join_p[pc] & (
      th.rank[oc] >= th.kid_base[pc] - th.n_children[pc])
  kept = ~dropped(th)
  kid_pos = jax.vmap(lambda p: jnp.max(jnp.where(current_children(th, p) & kept, th.pos, 0)))(
      jnp.arange(nt))
  if pr.join == "stitch":
    aj, naj = const(pr.after_join)
    queue = jnp.zeros((nt, spec.n_queue), jnp.int32).at[:, :aj.shape[0]].set(aj[None, :])
    slots = lane.slots.replace(owner=jnp.where(of_joining, par, owner))
    return lane.replace(slots=slots), jnp.maximum(kid_pos, th.pos), queue, jnp.full((nt,), naj, jnp.int32)
  drop, new_pos = of_joining, th.pos
  if pr.join == "results":
    drop = drop | ((owner >= 0) & join_p[oc] & (lane.slots.pos >= th.mark_pos[oc]))
    new_pos = th.mark_pos
  lane = lane.replace(slots=lane.slots.replace(owner=jnp.where(drop, -1, owner)))
  queue, qlen = _join_queues(lane, spec, join_p, bad_p, ends)
  return lane, new_pos, queue, qlen


def join(lane: Lane, spec: TreeSpec, join_p, step):
  """Joins every parent in `join_p` [NT] (all its children are done). Cancelled children are
  left out (their KV is already dropped); a join queue that does not fit a thread's queue
  ends its request `out_of_memory`; a parent whose critical path the children used up stops
  after its forced join tokens (a child parent writes its close tokens first), and so does
  a parent whose flat join is malformed (`Protocol.malformed_close`)."""
  th = lane.threads
  kid_cp = jax.vmap(lambda p: jnp.max(jnp.where(current_children(th, p), th.cp, 0)))(
      jnp.arange(spec.threads))
  kid_cp = jnp.maximum(kid_cp, th.cp)  # a join without children (an empty APR spawn)
  pr = spec.protocol
  ends = _child_ends(lane, spec) if pr.join_skip_first or pr.malformed_close else None
  bad_p, cut_p = _malformed(lane, spec, ends)
  bad_p = bad_p & join_p
  lane, new_pos, queue, qlen = _merge_kv(lane, spec, join_p, bad_p, ends)
  th = lane.threads
  spent = join_p & (kid_cp >= lane.requests.limits[jnp.clip(th.req, 0), Limit.CRITICAL])
  is_child = th.parent >= 0
  queue, qlen = append_close(queue, qlen, spent & is_child, spec)
  th = th.where(
      join_p, pos=new_pos, cp=kid_cp, queue=queue, q_len=jnp.minimum(qlen, spec.n_queue), q_head=0,
      q_sampled=False, count=0, mark_log=-1, mark_pending=False,  # a new fork needs a new block
      o_state=0, o_cur_len=0,
      after=jnp.where(spent | bad_p, Next.FINISH, Next.SAMPLE), state=ThreadState.READY)
  if pr.text is not None:  # a new call: its text tags and its token budget start afresh
    th = th.where(join_p, t_state=0, t_flag=0, call_base=th.n_sampled)
  # the thread ends after its queue: at a budget when the critical path is spent or a child
  # was cut; after a child's EOS (a malformed join closed the block) with `stop`
  budget = jnp.where(is_child, StopReason.BUDGET, StopReason.LENGTH)
  th = th.where(join_p & (spent | bad_p), reason=jnp.where(spent | cut_p, budget, StopReason.STOP))
  oom = any_per_request(th.req, join_p & (qlen > spec.n_queue), spec.requests)
  return terminate(lane.replace(threads=th), StopReason.OUT_OF_MEMORY, step, oom)
