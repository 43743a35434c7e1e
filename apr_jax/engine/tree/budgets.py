"""Sampling and budgets: each drained row samples (or takes its script's token), the total,
per-thread and critical-path budgets are applied, the protocol's state machine reads the
sample (open a block, count children, fork, stop), and race and pruning cancel siblings."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from apr_jax.engine.sampling import sample
from apr_jax.engine.tree.ops import (any_per_request, before_in_request, compact, const, isin,
                                     per_request, targets)
from apr_jax.engine.tree.requests import live_threads, terminate
from apr_jax.engine.tree.state import Lane, Limit, Next, StopReason, ThreadState, TreeSpec
from apr_jax.protocols.outlines import IDLE, LEAD


def classify(lane: Lane, drained, step):
  """Ends requests that ran out of total budget last step; returns (lane, drained rows of
  live threads, the rows among them that fork or rewind)."""
  rq = lane.requests
  lane = terminate(lane, rq.ending, step, rq.ending > 0)
  t_w = jnp.clip(lane.rows.thread, 0)
  drained = drained & (lane.rows.thread >= 0) & live_threads(lane)[t_w]
  after = lane.threads.after[t_w]
  return lane, drained, drained & ((after == Next.FORK) | (after == Next.REWIND))


def _draw(lane: Lane, t_w, logits, samp_w, spec: TreeSpec):
  """The rows' tokens x [W] and their log-probs: sampled with the thread's key folded with
  its sample count (independent of the batch and of the schedule), or the script's token.
  Records the logits of scripted samples with `record_logits`."""
  th, sc = lane.threads, lane.scripts
  nsamp = th.n_sampled[t_w]
  keys = jax.vmap(lambda kd, n: jax.random.fold_in(jax.random.wrap_key_data(kd), n))(th.key[t_w], nsamp)
  x = sample(logits, keys, spec.sampling)
  if spec.script:
    srow = th.script[t_w]
    sr, qc = jnp.clip(srow, 0), jnp.clip(th.req[t_w], 0)
    scripted = (srow >= 0) & (nsamp < sc.length[qc, sr])
    x = jnp.where(scripted, sc.tokens[qc, sr, jnp.clip(nsamp, 0, spec.script - 1)], x)
    if spec.record_logits:
      rt = targets(samp_w & (nsamp < spec.script), t_w, spec.threads)
      lane = lane.replace(rec=lane.rec.at[rt, jnp.clip(nsamp, 0, spec.script - 1)].set(logits, mode="drop"))
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits), x[:, None], axis=1)[:, 0]
  return lane, x, logp


def _total_budget(lane: Lane, q_w, samp_w, spec: TreeSpec):
  """The total-token budget: samples beyond it (rows of one request in row order) are
  dropped and the request ends next step (`total_budget`). Returns (lane, allowed [W])."""
  rq, nr = lane.requests, spec.requests
  qc = jnp.clip(q_w, 0)
  rank = before_in_request(q_w, samp_w.astype(jnp.int32), nr)
  allowed = samp_w & (rq.total[qc] + rank < rq.limits[qc, Limit.TOTAL])
  n_ok = per_request(jnp.where(samp_w, q_w, -1), allowed.astype(jnp.int32), nr)
  total = rq.total + n_ok
  cut = any_per_request(q_w, samp_w & ~allowed, nr)
  over = cut | ((total >= rq.limits[:, Limit.TOTAL]) & (n_ok > 0))
  live_r = rq.active & ~rq.done
  ending = jnp.where(over & live_r, StopReason.TOTAL_BUDGET, rq.ending)
  return lane.replace(requests=rq.replace(total=total, ending=ending)), allowed


def _state_machine(lane: Lane, t_w, x, spec: TreeSpec):
  """The protocol read on each row's sample x [W]: (stop, budget, fork_next, count [W]).
  A fork needs a block opened since the thread started or last joined (its spawn lines, its
  outlines): the trigger alone does not fork."""
  pr, th = spec.protocol, lane.threads
  lim = lane.requests.limits[jnp.clip(th.req[t_w], 0)]                    # [W, LIMITS]
  is_child = th.parent[t_w] >= 0
  stop = jnp.where(is_child, isin(x, tuple(pr.child_stop) + tuple(spec.root_stop)),
                   isin(x, spec.root_stop))
  budget = ((th.n_sampled[t_w] - th.call_base[t_w] + 1 >= lim[:, Limit.THREAD_TOKENS]) |
            (th.cp[t_w] + 1 >= lim[:, Limit.CRITICAL]))
  count = th.count[t_w]
  if not pr.forks:
    return stop, budget, jnp.zeros_like(stop), count, {}
  if pr.text is not None:
    return _text_machine(lane, t_w, x, spec, stop, budget, lim)
  outline = {}
  if pr.outline is not None:
    count, outline = read_outlines(th, t_w, x, spec)
  count = jnp.where(x == pr.open, 0, count if pr.outline is not None else count + (x == pr.count))
  opened = th.mark_pending[t_w] | (th.mark_log[t_w] >= 0)
  depth = th.depth[t_w]
  fork_next = ((x == pr.fork) & opened & (depth < lim[:, Limit.DEPTH]) & (count >= 1) &
               (depth < pr.max_depth))
  return stop, budget, fork_next, count, outline


def _text_machine(lane: Lane, t_w, x, spec: TreeSpec, stop, budget, lim):
  """The original APR's text tags on each row's sample x [W] (`protocols.apr_text`): a call
  that ends (EOS, or its token budget) while its last line holds `<End Calling Sub
  Searches>` (one trailing newline allowed) forks instead; `Goal Reached` positions are kept
  for the join's summary path. An EOS has no text: it leaves the line state as it was."""
  from apr_jax.protocols.apr_text import GOAL, S_END, S_GOAL, S_STOP, STOP
  pr, th = spec.protocol, lane.threads
  at = pr.text
  st0 = th.t_state[t_w]
  st, hits = at.stream.advance(st0, x)
  flag = th.t_flag[t_w]
  newline = x == at.newline
  new_flag = jnp.where(hits[:, S_END], 1, jnp.where(flag == 1, jnp.where(newline, 2, 1), 0))
  new_flag = jnp.where(stop, flag, new_flag)
  depth = th.depth[t_w]
  fork_next = ((new_flag > 0) & (stop | budget) & (depth < lim[:, Limit.DEPTH]) &
               (depth < pr.max_depth))
  g = hits[:, S_GOAL][:, None]
  g_hit = jnp.where(g, jnp.stack([th.g_hit[t_w, 1], th.pos[t_w]], 1), th.g_hit[t_w])
  g_clean = jnp.where(g, jnp.stack([th.g_clean[t_w, 1], st[:, S_GOAL] == len(GOAL)], 1),
                      th.g_clean[t_w])
  # the stop string: the call's text is cut where it starts and `<Calling Sub Searches>`
  # written in its place (the row rewinds next step, once x is written)
  rewind = hits[:, S_STOP]
  off = jnp.asarray(at.stop_at)[jnp.clip(st0[:, S_STOP], 0, len(STOP)), x]
  need = len(STOP) + jnp.asarray(at.nbytes)[x] - off
  st = jnp.where(rewind[:, None], 0, st)
  fork_next &= ~rewind
  return (stop & ~fork_next, budget & ~fork_next & ~rewind, fork_next, th.count[t_w],
          dict(t_state=st, t_flag=new_flag, g_hit=g_hit, g_clean=g_clean, rw_need=need,
               rewind=rewind))


def read_outlines(th, t_w, x, spec: TreeSpec):
  """The outline reader (`protocols.outlines`) on each row's sample x [W]: (count [W]: the
  distinct numbers of the block so far, the rows' new o_* fields). A number longer than the
  label buffer is no label; numbers past `spec.n_outlines` are not kept."""
  rd, n_lab, m = spec.protocol.outline, spec.n_label, spec.n_outlines
  ids, nxt, emit, done = (jnp.asarray(a) for a in rd.arrays())
  k = jnp.clip(jnp.searchsorted(ids, x), 0, ids.shape[0] - 1)
  hit = ids[k] == x
  s = th.o_state[t_w]
  restart = x == rd.count
  new_state = jnp.where(restart, LEAD, jnp.where(hit, nxt[k, s], IDLE))
  em = jnp.where(hit[:, None], emit[k, s], -1)                              # [W, E]
  ok = em >= 0
  cur, clen = th.o_cur[t_w], th.o_cur_len[t_w]
  dest = clen[:, None] + jnp.cumsum(ok, axis=1) - 1
  onto = ok[:, :, None] & (dest[:, :, None] == jnp.arange(n_lab)[None, None, :])  # [W, E, L]
  cur = jnp.where(jnp.any(onto, 1), jnp.sum(jnp.where(onto, em[:, :, None], 0), 1), cur)
  clen = jnp.where(restart, 0, clen + jnp.sum(ok, axis=1))
  in_lab = jnp.arange(n_lab)[None, :] < clen[:, None]
  cur = jnp.where(in_lab, cur, 0)
  lab, llen, count = th.o_lab[t_w], th.o_len[t_w], th.count[t_w]
  held = jnp.arange(m)[None, :] < count[:, None]                            # [W, M]
  same = held & (llen == clen[:, None]) & jnp.all(lab == cur[:, None, :], axis=2)
  new = hit & done[k, s] & (clen <= n_lab) & ~jnp.any(same, 1) & (count < m)
  at = new[:, None] & (jnp.arange(m)[None, :] == count[:, None])            # [W, M]
  lab = jnp.where(at[:, :, None], cur[:, None, :], lab)
  llen = jnp.where(at, clen[:, None], llen)
  return count + new, dict(o_state=new_state, o_cur=cur, o_cur_len=clen, o_lab=lab, o_len=llen)


def _write_samples(lane: Lane, t_w, x, logp, allowed, spec: TreeSpec):
  """Queues each allowed sample (its thread writes it next step; a child stopped by its
  budget gets the protocol's close tokens after it) and runs the state machine."""
  pr, th, nt, w = spec.protocol, lane.threads, spec.threads, spec.rows
  stop, budget, fork_next, count, outline = _state_machine(lane, t_w, x, spec)
  rewind = outline.pop("rewind", jnp.zeros_like(stop))
  is_child = th.parent[t_w] >= 0
  finish = stop | budget
  close, nclose = const(pr.child_close)
  add_close = is_child & budget & ~stop & (nclose > 0)
  qtok = jnp.concatenate([x[:, None], jnp.broadcast_to(close[None, :], (w, close.shape[0]))], axis=1)
  qok = jnp.concatenate([jnp.ones((w, 1), bool),
                         add_close[:, None] & (jnp.arange(close.shape[0]) < nclose)[None, :]], axis=1)
  e = min(qtok.shape[1], spec.n_queue)
  newq, newlen = jax.vmap(lambda t, v: compact(t, v, e))(qtok, qok)
  tid = targets(allowed, t_w, nt)
  reason = jnp.where(stop, StopReason.STOP, jnp.where(is_child, StopReason.BUDGET, StopReason.LENGTH))
  # only the queue's first e entries are written: what lies past q_len is never read
  th = th.replace(queue=th.queue.at[tid[:, None], jnp.arange(e)[None, :]].set(newq, mode="drop"))
  th = th.set_at(
      tid, q_len=newlen, q_head=0, q_sampled=True, n_sampled=th.n_sampled[t_w] + 1,
      cp=th.cp[t_w] + 1, logp=th.logp[t_w] + logp, last_logp=logp, count=count,
      after=jnp.where(finish, Next.FINISH, jnp.where(fork_next, Next.FORK, jnp.where(
          rewind, Next.REWIND, Next.SAMPLE))),
      **outline)
  th = th.set_at(targets(allowed & finish, t_w, nt), reason=reason)
  if pr.forks:  # an opening tag: the block's mark waits for the tag's log entry
    th = th.set_at(targets(allowed & (x == pr.open), t_w, nt), mark_pending=True,
                   mark_pos=th.pos[t_w])
  return lane.replace(threads=th)


def sample_phase(lane: Lane, t_w, logits, drained, n_forked, step, spec: TreeSpec):
  """Samples for drained rows that neither fork nor finish and runs the state machine on the
  samples. Returns (lane, fin_t [NT]): threads that finish now (their queue drained with
  Next.FINISH, or cancelled)."""
  th = lane.threads
  after = th.after[t_w]
  fin_w = drained & (after == Next.FINISH)
  samp_w = drained & (n_forked == 0) & ((after == Next.SAMPLE) | (after == Next.FORK))
  lane, x, logp = _draw(lane, t_w, logits, samp_w, spec)
  lane, allowed = _total_budget(lane, th.req[t_w], samp_w, spec)
  lane = _write_samples(lane, t_w, x, logp, allowed, spec)
  is_child = th.parent[t_w] >= 0
  cancel, pruned, dropped = cancellations(lane, t_w, x, allowed, is_child, spec)
  th = lane.threads.where(
      cancel, reason=jnp.where(pruned, StopReason.PRUNED, StopReason.CANCELLED))
  # a cancelled subtree is left out of its parent's join: its KV is dropped now
  ow = lane.slots.owner
  slots = lane.slots.replace(owner=jnp.where((ow >= 0) & dropped[jnp.clip(ow, 0)], -1, ow))
  fin_t = jnp.zeros((spec.threads,), bool).at[jnp.where(fin_w, t_w, spec.threads)].set(
      True, mode="drop") | cancel
  return lane.replace(threads=th, slots=slots), fin_t


def cancellations(lane: Lane, t_w, x, allowed, is_child, spec: TreeSpec):
  """(cancel [NT], pruned [NT], dropped [NT]): threads that stop now because a sibling reached
  the goal (race) or because their mean log-prob trails their best sibling's (pruning), with
  their whole subtrees (a sibling waiting on its own children is cancelled with them). A
  thread whose stop is already pending (it wrote its stop token or hit its budget) is not.
  `dropped`: the cancelled subtrees, finished descendants included (their KV is freed)."""
  pr, nt, th = spec.protocol, spec.threads, lane.threads
  st, par = th.state, th.parent
  pc = jnp.clip(par, 0)
  finishing = th.after == Next.FINISH
  active = ((st == ThreadState.READY) | (st == ThreadState.RUN) | (st == ThreadState.WAIT)) & ~(
      (st != ThreadState.WAIT) & finishing)
  cancel = jnp.zeros((nt,), bool)
  if spec.race and pr.goal:
    won = allowed & is_child & isin(x, pr.goal)
    par_won = jnp.zeros((nt,), bool).at[jnp.where(won, par[t_w], nt)].set(True, mode="drop")
    winner = jnp.zeros((nt,), bool).at[jnp.where(won, t_w, nt)].set(True, mode="drop")
    cancel = (par >= 0) & par_won[pc] & ~winner & active
  pruned = jnp.zeros((nt,), bool)
  if spec.prune_margin > 0:
    running = ((st == ThreadState.RUN) & (par >= 0) & (th.n_sampled >= spec.prune_min_tokens)
               & ~finishing)
    mean = th.logp / jnp.maximum(th.n_sampled, 1)
    best = jnp.full((nt,), -jnp.inf).at[jnp.where(running, par, nt)].max(mean, mode="drop")
    pruned = running & (mean < best[pc] - spec.prune_margin) & ~cancel
    cancel = cancel | pruned
  subtree = cancel
  for _ in range(max(pr.max_depth, 1)):  # descendants, one generation at a time
    subtree = subtree | ((par >= 0) & subtree[pc] & (st != ThreadState.FREE))
  return subtree & (st != ThreadState.FREE) & (st != ThreadState.DONE), pruned, subtree
