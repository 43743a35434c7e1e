"""The fork/join engine: a tree KV cache and one compiled decode loop for every thread of
every request.

Layout. The device batch is `lanes` lanes x `rows` thread rows. A lane holds up to
`requests` requests that share its rows (the threads of every request in the lane are
scheduled onto one pool of rows), its thread table, its token log and its pool of `slots` KV
slots (per layer [lanes, kv_heads, slots, head_dim]). A token's KV is written once, into any
free slot, with its owner thread and its position. A thread sees slot s iff
`vis[thread, owner[s]]` (itself and, for shared contexts, its ancestors: never another
request's threads) and `pos[s] <= its position`. So

- the prompt and every ancestor token are stored once; a child never copies its prefix;
- fork = new entries in the thread table (taken from its free entries) and `vis` rows; no KV
  moves;
- stitch join (Multiverse) = relabel the children's slots to the parent: O(slots) integer
  work, no recompute, the paths keep their positions;
- flat join (ThreadWeaver) = free the children's slots and queue their tokens (gathered from
  the lane's token log on device) for re-prefill into the parent at sequential positions;
- results join (APR) = free the spawn block and the children's slots, queue the results
  block (children's result spans gathered on device).

Memory is `slots` per lane, shared by all the threads of all its requests: it grows with the
tokens stored, not with threads x max length (freed slots are reused; a request's slots are
freed the step it ends). `lanes=1` is one pool of rows, threads and KV for every request;
more lanes bound the attention work (a token scans only its own lane's slots) and shard
over the mesh's data axis.

Every step packs up to M tokens of the lane's running threads (its last sample, or a chunk
of its forced queue: prompt, forced prefix, re-prefill, results block), runs the model once
over [lanes, M] with a per-token mask over the lane's slots, samples for the threads whose
queue drained, and runs the protocol state machine. M is one of a few variants (1, rows,
..., `chunk`; `step_sizes`), picked per step by `lax.switch` in the same compiled program:
by default the smallest that covers the busiest lane; optionally the one that writes the
most tokens per unit of cost, with the costs measured on the running machine
(`runner.StepCosts`), work beyond M waiting for a later step. The model only reads the KV
pool inside the switch; the new tokens' KV is written after it, in place (a buffer
returned by a `lax.cond` is copied whole each step).

The host runs the loop in segments (continuous batching: requests enter free request slots
of a lane and leave between segments; deadlines are checked there). Everything else - forks, joins, scheduling
of waiting threads onto free rows, budgets - happens on the device.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from apr_jax.cache import kv as kvlib
from apr_jax.engine.sampling import SamplingConfig, sample
from apr_jax.errors import UserError
from apr_jax.model.transformer import Transformer
from apr_jax.protocols import Protocol

# thread states
FREE, READY, RUN, WAIT, DONE = 0, 1, 2, 3, 4
STATE_NAMES = ("free", "ready", "running", "waiting", "done")
# what a thread does when its queue drains
NEXT_SAMPLE, NEXT_FORK, NEXT_FINISH = 0, 1, 2
# why a thread / request stopped
REASONS = ("", "stop", "budget", "cancelled", "total_budget", "out_of_memory", "deadline",
           "pruned", "length", "context")
R_STOP, R_BUDGET, R_CANCEL, R_TOTAL, R_OOM, R_DEADLINE, R_PRUNE, R_LENGTH, R_CONTEXT = range(1, 10)
# log entry kinds
K_FORCED, K_SAMPLED = 1, 2
# per-request limits, in this order
LIMITS = ("max_threads", "max_depth", "max_total_tokens", "max_critical_path", "max_thread_tokens")
L_THREADS, L_DEPTH, L_TOTAL, L_CRITICAL, L_THREAD_TOKENS = range(len(LIMITS))
LABEL_DIGITS = 2  # a child's number within its fork is spelled with at most two digits (<= 99)


@dataclasses.dataclass(frozen=True)
class TreeSpec:
  """Everything static about one compiled engine program."""
  protocol: Protocol = Protocol()
  sampling: SamplingConfig = SamplingConfig()
  root_stop: tuple = ()        # ids that end the root thread (the tokenizer's stop ids)
  lanes: int = 1               # lanes (each with its own rows, thread table, log and KV pool)
  requests: int = 1            # requests in flight per lane (they share the lane's pools)
  rows: int = 8                # thread rows per lane (threads beyond wait for a row)
  threads: int = 16            # thread-table entries per lane, shared by its requests
  slots: int = 1024            # KV slots per lane
  log: int = 0                 # token-log entries per lane (0: 4 x slots; see log_bound)
  queue: int = 0               # forced-queue capacity per thread (0: slots)
  chunk: int = 32              # tokens per step when forced tokens are queued
  context: int = 0             # positions per thread (the model's context; 0: unlimited)
  label: int = 16              # label tokens per thread (depth 5 with numbers up to 99)
  script: int = 0              # teacher-forcing: tokens per scripted thread (0: off)
  script_rows: int = 0         # teacher-forcing: scripted threads per lane
  record_logits: bool = False  # keep the logits of every scripted sample (tests)
  race: bool = False           # a child reaching the protocol's goal cancels its siblings
  prune_margin: float = 0.0    # >0: cancel a child whose mean log-prob trails its best sibling's by this
  prune_min_tokens: int = 8    # ... once both have sampled at least this many tokens

  def __post_init__(self):
    for f in ("lanes", "requests", "rows", "threads", "slots", "chunk"):
      if getattr(self, f) < 1:
        raise UserError(f"{f} must be >= 1, got {getattr(self, f)}")
    if self.chunk < self.rows:
      raise UserError(f"chunk ({self.chunk}) must be >= rows ({self.rows})")
    if self.threads < self.requests:
      raise UserError(f"threads ({self.threads}) must be >= requests per lane ({self.requests})")

  @property
  def n_log(self):
    return self.log or 4 * self.slots

  @property
  def n_queue(self):
    return self.queue or self.slots

  @property
  def request_threads(self):
    """Default (and largest) max_threads of one request: its share of the thread table."""
    return self.threads // self.requests


def label_tokens(pr: Protocol, depth: int) -> int:
  """Label tokens of a thread at `depth` in the worst case (numbers up to 99)."""
  if not pr.digits or depth < 1:
    return 0
  return depth * LABEL_DIGITS + (depth - 1) * len(pr.label_sep)


def log_bound(pr: Protocol, prompt_len: int, threads: int, depth: int, total: int) -> int:
  """The most token-log entries a request can need (the log keeps every token its threads
  write until it ends): its prompt, every sample, each thread's forced prefix, label and
  close, each join's forced tokens, and the copies that joins and fresh contexts make (a
  flat join re-prefills its children's tokens, a results join copies their results, a fresh
  child's prompt copies its spawn line), once per nesting level."""
  per_thread = (len(pr.child_pre) + label_tokens(pr, depth) + len(pr.child_post) +
                len(pr.child_close))
  per_join = (len(pr.after_join) + len(pr.results_open) + len(pr.results_close) +
              threads * len(pr.no_result))
  copies = (depth if pr.join != "stitch" else 0) + (1 if pr.context == "fresh" else 0)
  return prompt_len + (1 + copies) * (total + threads * per_thread) + threads * per_join


# ----------------------------------------------------------------------------- helpers
def compact(tokens, valid, size):
  """The valid entries of `tokens`, in order, packed into [size] (rest 0), and their count."""
  idx = jnp.cumsum(valid) - 1
  idx = jnp.where(valid, idx, size + jnp.arange(tokens.shape[0]))
  out = jnp.zeros((size,), jnp.int32).at[idx].set(tokens.astype(jnp.int32), mode="drop")
  return out, jnp.minimum(jnp.sum(valid), size).astype(jnp.int32)


def _const(x):
  return jnp.asarray(x if len(x) else [-1], jnp.int32), len(x)


def _isin(x, ids):
  return jnp.isin(x, jnp.asarray(ids, jnp.int32)) if len(ids) else jnp.zeros_like(x, bool)


def _bucket_sorted(tokens, bucket, valid, n_buckets, size):
  """The valid tokens ordered by bucket in [0, n_buckets), in array order within a bucket
  (a stable counting sort: O(n x n_buckets), no comparison sort), packed into [size], and
  their count (which can exceed `size`: the caller decides what overflow means)."""
  n = tokens.shape[0]
  b = jnp.where(valid, bucket, n_buckets)
  onehot = (b[:, None] == jnp.arange(n_buckets)[None, :]).astype(jnp.int32)   # [n, B]
  within = jnp.cumsum(onehot, axis=0) - 1
  counts = jnp.sum(onehot, axis=0)
  offs = jnp.cumsum(counts) - counts
  bc = jnp.clip(b, 0, n_buckets - 1)
  dest = jnp.take_along_axis(within, bc[:, None], axis=1)[:, 0] + offs[bc]
  dest = jnp.where(valid, dest, max(n, size) + jnp.arange(n))  # dropped, never colliding
  out = jnp.zeros((size,), jnp.int32).at[dest].set(tokens.astype(jnp.int32), mode="drop",
                                                    unique_indices=True)
  return out, jnp.sum(counts).astype(jnp.int32)


# ----------------------------------------------------------------------------- state
def _req_fields(spec: TreeSpec) -> dict:
  """Per-request fields of a lane, indexed by the request's slot in the lane."""
  r = spec.requests
  i32 = lambda *shape: jnp.zeros(shape, jnp.int32)
  ns, j = max(spec.script_rows, 1), max(spec.script, 1)
  return dict(
      req_active=jnp.zeros((r,), bool), req_done=jnp.zeros((r,), bool), req_reason=i32(r),
      req_created=i32(r), req_total=i32(r), req_forks=i32(r), req_ending=i32(r), req_start=i32(r),
      req_end=i32(r), req_high=i32(r), req_limits=i32(r, len(LIMITS)),
      req_key=jnp.zeros((r,) + jax.random.key_data(jax.random.key(0)).shape, jnp.uint32),
      sc_tok=i32(r, ns, j), sc_len=i32(r, ns), sc_parent=jnp.full((r, ns), -2, jnp.int32),
      sc_rank=jnp.full((r, ns), -2, jnp.int32))


def _thread_fields(spec: TreeSpec) -> dict:
  """The thread table of a lane: every entry free."""
  nt, q = spec.threads, spec.n_queue
  i32 = lambda *shape, v=0: jnp.full(shape, v, jnp.int32)
  return dict(
      t_req=i32(nt, v=-1), t_state=i32(nt), t_parent=i32(nt, v=-1), t_depth=i32(nt), t_rank=i32(nt),
      t_nchild=i32(nt), t_kidbase=i32(nt), t_pending=i32(nt), t_pos=i32(nt), t_qhead=i32(nt), t_qlen=i32(nt),
      t_qsamp=jnp.zeros((nt,), bool), t_after=i32(nt), t_count=i32(nt),
      t_markpend=jnp.zeros((nt,), bool), t_marklog=i32(nt, v=-1), t_markpos=i32(nt),
      t_nsamp=i32(nt), t_nwritten=i32(nt), t_cp=i32(nt), t_start=i32(nt), t_end=i32(nt),
      t_reason=i32(nt), t_row=i32(nt, v=-1), t_script=i32(nt, v=-1),
      t_key=jnp.zeros((nt,) + jax.random.key_data(jax.random.key(0)).shape, jnp.uint32),
      t_logp=jnp.zeros((nt,), jnp.float32), t_bornlog=i32(nt),
      t_q=i32(nt, q), t_label=i32(nt, spec.label), t_lablen=i32(nt),
      t_vis=jnp.zeros((nt, nt), bool))


def empty_lane(spec: TreeSpec, vocab: int) -> dict:
  """One lane with no request (no leading lane axis)."""
  nt, w, s, lg = spec.threads, spec.rows, spec.slots, spec.n_log
  i32 = lambda *shape, v=0: jnp.full(shape, v, jnp.int32)
  j = max(spec.script, 1)
  rec_shape = (nt, j, vocab) if spec.record_logits else (1, 1, 1)
  return dict(
      **_req_fields(spec), **_thread_fields(spec),
      r_thread=i32(w, v=-1),
      s_owner=i32(s, v=-1), s_pos=i32(s),
      g_tok=i32(lg), g_thread=i32(lg, v=-1), g_pos=i32(lg), g_kind=i32(lg), g_step=i32(lg), g_n=i32(),
      rec=jnp.zeros(rec_shape, jnp.float32),
  )


def _live_threads(lane):
  """[NT] bool: the entry holds a thread of a request that is still running."""
  q = jnp.clip(lane["t_req"], 0)
  return (lane["t_req"] >= 0) & lane["req_active"][q] & ~lane["req_done"][q]


def _per_request(idx, vals, n_req, op="add"):
  """Scatter `vals` onto requests `idx` (entries with idx < 0 dropped)."""
  idx = jnp.where(idx >= 0, idx, n_req)
  z = jnp.zeros((n_req,), vals.dtype)
  return getattr(z.at[idx], op)(vals, mode="drop")


def _script_row(lane, req, parent_row, rank):
  """The script row of the thread that is child `rank` of the thread with script row
  `parent_row` (the root: parent_row -1, rank -1), or -1 (not scripted)."""
  rq = jnp.clip(req, 0)
  hit = (lane["sc_parent"][rq] == parent_row) & (lane["sc_rank"][rq] == rank)
  ok = jnp.any(hit) & (req >= 0) & ((parent_row >= 0) | (rank < 0))
  return jnp.where(ok, jnp.argmax(hit), -1).astype(jnp.int32)


def _child_key(key_data, rank):
  """A child's PRNG key from its parent's: streams never collide, at any depth."""
  return jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(key_data), rank + 1))


def admit_lane(lane, r, prompt, plen, limits, key, sc_tok, sc_len, sc_parent, sc_rank, step, count0,
               mark0, fork0, spec: TreeSpec):
  """Request slot `r` (free) takes a request whose root thread, in the lowest free entry of
  the thread table, will read `prompt` [Q]."""
  lane = dict(lane)
  fresh = _req_fields(spec)
  for k, v in fresh.items():
    lane[k] = lane[k].at[r].set(v[0])
  lane.update({k: lane[k].at[r].set(v) for k, v in dict(
      req_active=True, req_limits=limits, req_key=key, req_created=1, req_start=step,
      sc_tok=sc_tok, sc_len=sc_len, sc_parent=sc_parent, sc_rank=sc_rank).items()})
  t = jnp.argmax(lane["t_req"] < 0)
  sets = dict(t_req=r, t_state=READY, t_q=prompt, t_qlen=plen, t_start=step, t_count=count0,
              t_markpend=mark0 >= 0, t_markpos=mark0,
              t_after=jnp.where(fork0, NEXT_FORK, NEXT_SAMPLE), t_script=_script_row(lane, r, -1, -1),
              t_bornlog=lane["g_n"], t_key=_child_key(key, -1))
  for k, v in sets.items():
    lane[k] = lane[k].at[t].set(v)
  lane["t_vis"] = lane["t_vis"].at[t, t].set(True)
  return lane


def _close(lane, cond_r, reason_r, step, spec: TreeSpec):
  """Ends the requests in `cond_r` [R] (running ones only): their unfinished threads stop
  with `reason_r` [R], their rows and KV slots are freed. The thread table and the token log
  keep their entries until the host has read them (`release`)."""
  cond_r = cond_r & lane["req_active"] & ~lane["req_done"]
  q = jnp.clip(lane["t_req"], 0)
  mine = (lane["t_req"] >= 0) & cond_r[q]                                  # [NT]
  alive = mine & (lane["t_state"] != DONE) & (lane["t_state"] != FREE)
  lane = dict(lane)
  lane["t_reason"] = jnp.where(alive, reason_r[q], lane["t_reason"])
  lane["t_end"] = jnp.where(alive, step, lane["t_end"])
  lane["t_state"] = jnp.where(alive, DONE, lane["t_state"])
  lane["t_row"] = jnp.where(mine, -1, lane["t_row"])
  rt = lane["r_thread"]
  lane["r_thread"] = jnp.where((rt >= 0) & mine[jnp.clip(rt, 0)], -1, rt)
  ow = lane["s_owner"]
  lane["s_owner"] = jnp.where((ow >= 0) & mine[jnp.clip(ow, 0)], -1, ow)
  lane["req_reason"] = jnp.where(cond_r, reason_r, lane["req_reason"])
  lane["req_end"] = jnp.where(cond_r, step, lane["req_end"])
  lane["req_done"] = lane["req_done"] | cond_r
  return lane


def _terminate(lane, reason, step, cond_r, spec: TreeSpec):
  """Where `cond_r` [R]: ends the request with `reason` (scalar or [R])."""
  return _close(lane, cond_r, jnp.broadcast_to(jnp.asarray(reason, jnp.int32), cond_r.shape), step,
                spec)


def release(lane, r, spec: TreeSpec):
  """Frees request slot `r` after the host has read its result: its thread-table entries,
  KV slots, script rows and recorded logits; its token-log entries are compacted away (the
  other requests' log indices are remapped)."""
  lane = dict(lane)
  mine = lane["t_req"] == r
  ow = lane["s_owner"]
  lane["s_owner"] = jnp.where((ow >= 0) & mine[jnp.clip(ow, 0)], -1, ow)
  rt = lane["r_thread"]
  lane["r_thread"] = jnp.where((rt >= 0) & mine[jnp.clip(rt, 0)], -1, rt)
  # compact the log
  lg = spec.n_log
  e = jnp.arange(lg)
  gt = lane["g_thread"]
  keep = (e < lane["g_n"]) & ~((gt >= 0) & mine[jnp.clip(gt, 0)])
  new_idx = jnp.cumsum(keep) - 1
  dest = jnp.where(keep, new_idx, lg + e)
  for k in ("g_tok", "g_thread", "g_pos", "g_kind", "g_step"):
    fill = -1 if k == "g_thread" else 0
    lane[k] = jnp.full((lg,), fill, jnp.int32).at[dest].set(lane[k], mode="drop", unique_indices=True)
  remap = lambda i: jnp.where(i >= 0, new_idx[jnp.clip(i, 0, lg - 1)] + (~keep[jnp.clip(i, 0, lg - 1)]), i)
  lane["t_marklog"] = remap(lane["t_marklog"])
  lane["t_bornlog"] = jnp.where(lane["t_bornlog"] < lane["g_n"], remap(lane["t_bornlog"]),
                                lane["t_bornlog"] - (lane["g_n"] - jnp.sum(keep)))
  lane["g_n"] = jnp.sum(keep).astype(jnp.int32)
  # the thread table
  fresh = _thread_fields(spec)
  for k, v in fresh.items():
    m = mine.reshape((-1,) + (1,) * (v.ndim - 1))
    lane[k] = jnp.where(m, v, lane[k])
  lane["t_vis"] = lane["t_vis"] & ~mine[None, :]
  if spec.record_logits:
    lane["rec"] = jnp.where(mine[:, None, None], 0.0, lane["rec"])
  for k, v in _req_fields(spec).items():
    lane[k] = lane[k].at[r].set(v[0])
  return lane


# ----------------------------------------------------------------------------- scheduling
def assign_rows(lane, spec: TreeSpec):
  """Ready threads (lowest id first) take free rows."""
  ready = (lane["t_state"] == READY) & _live_threads(lane)
  free_row = lane["r_thread"] < 0
  ready_ids = jnp.nonzero(ready, size=spec.rows, fill_value=-1)[0]
  rank = jnp.cumsum(free_row) - 1
  cand = jnp.where(free_row & (rank < jnp.sum(ready)), ready_ids[jnp.clip(rank, 0, spec.rows - 1)], -1)
  r_thread = jnp.where(free_row, cand, lane["r_thread"])
  got = cand >= 0
  tid = jnp.where(got, cand, spec.threads + jnp.arange(spec.rows))
  lane = dict(lane, r_thread=r_thread)
  lane["t_state"] = lane["t_state"].at[tid].set(RUN, mode="drop")
  lane["t_row"] = lane["t_row"].at[tid].set(jnp.arange(spec.rows), mode="drop")
  return lane


# ----------------------------------------------------------------------------- packing
def pack(lane, step, spec: TreeSpec, m: int):
  """Chooses this step's tokens for one lane and books their slots and log entries.

  Returns (lane, packed) with packed = tok/pos/slot [M], mask [M, S] over the slots held
  before this step, mask_new [M, M] over this step's tokens, last [W] (index of each row's
  last token), drained [W] (the row's queue emptied: sample or act).
  """
  nt, w, s, lg, nr = spec.threads, spec.rows, spec.slots, spec.n_log, spec.requests
  t_w = lane["r_thread"]
  tw = jnp.clip(t_w, 0)
  has = (t_w >= 0) & _live_threads(lane)[tw]
  q_w = jnp.where(has, lane["t_req"][tw], -1)
  qlen = jnp.where(has, lane["t_qlen"][tw], 0)
  base = (qlen > 0).astype(jnp.int32)
  n_free = jnp.sum(lane["s_owner"] < 0)
  mem = jnp.minimum(n_free, lg - lane["g_n"])
  # out of memory (KV slots or log): the requests of the rows past the capacity end
  oom_r = _per_request(jnp.where(jnp.cumsum(base) > mem, q_w, -1), base, nr, "max") > 0
  base = jnp.where(oom_r[jnp.clip(q_w, 0)], 0, base)
  # rows past this step's token budget wait for a later step (a variant smaller than the
  # lane's work, chosen for the other lanes' sake)
  base = jnp.where(jnp.cumsum(base) > m, 0, base)
  cap = jnp.minimum(m, mem)
  extra_need = jnp.where(base > 0, jnp.maximum(qlen - 1, 0), 0)
  room = jnp.maximum(cap - jnp.sum(base), 0)
  extra = jnp.clip(room - (jnp.cumsum(extra_need) - extra_need), 0, extra_need)
  g = base + extra
  # a thread about to write past the model's context: its request ends ("context")
  ctx_r = jnp.zeros((nr,), bool)
  if spec.context:
    past = has & (g > 0) & (lane["t_pos"][tw] + g > spec.context)
    ctx_r = _per_request(jnp.where(past, q_w, -1), jnp.ones((w,), jnp.int32), nr) > 0
    g = jnp.where(ctx_r[jnp.clip(q_w, 0)], 0, g)  # nothing of it is written
  cum = jnp.cumsum(g)
  start = cum - g
  total = cum[-1]
  mi = jnp.arange(m)
  row_m = jnp.clip(jnp.searchsorted(cum, mi, side="right"), 0, w - 1)
  valid = mi < total
  off = mi - start[row_m]
  t_m = tw[row_m]
  qi = jnp.clip(lane["t_qhead"][t_m] + off, 0, spec.n_queue - 1)
  tok = jnp.where(valid, lane["t_q"][t_m, qi], 0)
  pos = jnp.where(valid, lane["t_pos"][t_m] + off, 0)
  kind = jnp.where((qi == 0) & lane["t_qsamp"][t_m], K_SAMPLED, K_FORCED)
  free_slots = jnp.nonzero(lane["s_owner"] < 0, size=m, fill_value=s)[0]
  slot = jnp.where(valid, free_slots, s + mi)
  lane = dict(lane)
  lane["s_owner"] = lane["s_owner"].at[slot].set(t_m, mode="drop", unique_indices=True)
  lane["s_pos"] = lane["s_pos"].at[slot].set(pos, mode="drop", unique_indices=True)
  li = jnp.where(valid, lane["g_n"] + mi, lg + mi)
  for name, val in (("g_tok", tok), ("g_thread", t_m), ("g_pos", pos), ("g_kind", kind),
                    ("g_step", jnp.full((m,), step, jnp.int32))):
    lane[name] = lane[name].at[li].set(val, mode="drop", unique_indices=True)
  # per-thread bookkeeping; a pending mark (an opening tag) gets the log index of its token
  tid = jnp.where(has & (g > 0), tw, nt + jnp.arange(w))
  hit = valid & lane["t_markpend"][t_m] & (pos == lane["t_markpos"][t_m])
  hid = jnp.where(hit, t_m, nt + mi)
  lane["t_marklog"] = lane["t_marklog"].at[hid].set(li, mode="drop")
  lane["t_markpend"] = lane["t_markpend"].at[hid].set(False, mode="drop")
  lane["g_n"] = lane["g_n"] + total
  lane["t_pos"] = lane["t_pos"].at[tid].add(g, mode="drop")
  lane["t_qhead"] = lane["t_qhead"].at[tid].add(g, mode="drop")
  lane["t_qlen"] = lane["t_qlen"].at[tid].add(-g, mode="drop")
  lane["t_nwritten"] = lane["t_nwritten"].at[tid].add(g, mode="drop")
  ow = lane["s_owner"]
  held = _per_request(jnp.where(ow >= 0, lane["t_req"][jnp.clip(ow, 0)], -1),
                      jnp.ones_like(ow), nr)
  lane["req_high"] = jnp.maximum(lane["req_high"], held)
  drained = has & (g > 0) & (g == qlen)
  last = jnp.clip(cum - 1, 0, m - 1)
  # visibility of every slot for every packed token
  owner = lane["s_owner"]
  vis = lane["t_vis"][t_m]                                              # [M, NT]
  mask = jnp.take_along_axis(vis, jnp.broadcast_to(jnp.clip(owner, 0)[None, :], (m, s)), axis=1)
  mask = mask & (owner >= 0)[None, :] & (lane["s_pos"][None, :] <= pos[:, None]) & valid[:, None]
  # split for a read-only cache: its slots written this step are seen through the new keys
  wrote = jnp.zeros((s,), bool).at[slot].set(True, mode="drop")
  mask_new = jnp.take(mask, jnp.clip(slot, 0, s - 1), axis=1) & (slot < s)[None, :]  # [M, M]
  lane = _terminate(lane, R_OOM, step, oom_r, spec)
  lane = _terminate(lane, R_CONTEXT, step, ctx_r, spec)
  drained = drained & (g > 0)
  packed = dict(tok=tok, pos=pos, slot=slot, mask=mask & ~wrote[None, :], mask_new=mask_new,
                last=last, drained=drained)
  return lane, packed


# ----------------------------------------------------------------------------- protocol
def _child_queues(lane, spec: TreeSpec, parent, rank, valid_child):
  """rank: the child's number within its fork (0-based): its label is rank + 1 and, for
  fresh contexts, it reads spawn line rank + 1."""
  """Forced queue [Q], its length (unclipped) and label for each new child (vectorised over
  the thread table)."""
  pr = spec.protocol
  pre, npre = _const(pr.child_pre)
  post, npost = _const(pr.child_post)
  q = spec.n_queue
  # label: parent label + sep + digits of (rank + 1)
  plab = lane["t_label"][parent]                                          # [NT, LBL]
  plen = lane["t_lablen"][parent]
  num = rank + 1
  d_hi, d_lo = num // 10, num % 10
  if pr.digits:
    digits = jnp.asarray(pr.digits, jnp.int32)
    sep, nsep = _const(pr.label_sep)
    lab_tok = jnp.concatenate([plab, jnp.broadcast_to(sep, (plab.shape[0], sep.shape[0])),
                               digits[d_hi][:, None], digits[d_lo][:, None]], axis=1)
    lab_ok = jnp.concatenate([
        jnp.arange(spec.label)[None, :] < plen[:, None],
        jnp.broadcast_to((jnp.arange(sep.shape[0]) < nsep)[None, :], (plab.shape[0], sep.shape[0]))
        & (plen > 0)[:, None],
        (d_hi > 0)[:, None], jnp.ones_like(d_lo, bool)[:, None]], axis=1)
    label, lablen = jax.vmap(lambda t, v: compact(t, v, spec.label))(lab_tok, lab_ok)
  else:
    label = jnp.zeros_like(plab)
    lablen = jnp.zeros_like(plen)
  if pr.context == "shared":
    toks = jnp.concatenate([jnp.broadcast_to(pre, (label.shape[0], pre.shape[0])), label,
                            jnp.broadcast_to(post, (label.shape[0], post.shape[0]))], axis=1)
    ok = jnp.concatenate([
        jnp.broadcast_to(jnp.arange(pre.shape[0]) < npre, (label.shape[0], pre.shape[0])),
        jnp.arange(spec.label)[None, :] < lablen[:, None],
        jnp.broadcast_to(jnp.arange(post.shape[0]) < npost, (label.shape[0], post.shape[0]))], axis=1)
    queue, qlen = jax.vmap(lambda t, v: compact(t, v, q))(toks, ok)
  else:
    # fresh context: child_pre + the text of spawn line `rank` of the parent's block
    e = jnp.arange(spec.n_log)

    def span(p, r):
      mine = (lane["g_thread"] == p) & (e > lane["t_marklog"][p]) & (e < lane["g_n"])
      seg = jnp.cumsum(mine & (lane["g_tok"] == pr.count))
      ok = mine & (seg == r + 1) & (lane["g_tok"] != pr.count) & (lane["g_tok"] != pr.fork)
      toks = jnp.concatenate([pre, lane["g_tok"]])
      oks = jnp.concatenate([jnp.arange(pre.shape[0]) < npre, ok])
      out, _ = compact(toks, oks, q)
      return out, jnp.sum(oks).astype(jnp.int32)  # the length asked for (may exceed q)
    queue, qlen = jax.vmap(span)(parent, rank)
  qlen = jnp.where(valid_child, qlen, 0)
  return queue, qlen, label, lablen


def _fork(lane, spec: TreeSpec, fork_w, step):
  """Creates the children of every row in `fork_w` that gets >= 1; returns (lane, n_w)."""
  pr = spec.protocol
  nt, w, nr = spec.threads, spec.rows, spec.requests
  t_w = jnp.clip(lane["r_thread"], 0)
  q_w = lane["t_req"][t_w]
  want = jnp.where(fork_w, lane["t_count"][t_w], 0)
  # the request's thread limit (rows of one request take it in row order) ...
  avail = jnp.maximum(lane["req_limits"][:, L_THREADS] - lane["req_created"], 0)
  oh = jnp.where((q_w[:, None] == jnp.arange(nr)[None, :]) & fork_w[:, None], want[:, None], 0)
  before = (jnp.cumsum(oh, axis=0) - oh)[jnp.arange(w), jnp.clip(q_w, 0)]
  n_w = jnp.clip(avail[jnp.clip(q_w, 0)] - before, 0, want)
  # ... and the free entries of the thread table
  free_t = lane["t_req"] < 0
  n_w = jnp.clip(jnp.sum(free_t) - (jnp.cumsum(n_w) - n_w), 0, n_w)
  cum_n = jnp.cumsum(n_w)
  total_new = cum_n[-1]

  def do(lane):
    lane = dict(lane)
    j = jnp.arange(nt)
    k = jnp.cumsum(free_t) - 1                                          # rank among free entries
    is_new = free_t & (k < total_new)
    row = jnp.clip(jnp.searchsorted(cum_n, k, side="right"), 0, w - 1)
    parent = t_w[row]
    idx = jnp.where(is_new, k - (cum_n[row] - n_w[row]), 0)         # number within its fork
    rank = lane["t_kidbase"][parent] + idx                              # unique among siblings
    queue, qlen, label, lablen = _child_queues(lane, spec, parent, idx, is_new)
    sel = lambda new, old: jnp.where(is_new.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
    shared = pr.context == "shared"
    lane["t_req"] = sel(lane["t_req"][parent], lane["t_req"])
    lane["t_state"] = sel(READY, lane["t_state"])
    lane["t_parent"] = sel(parent, lane["t_parent"])
    lane["t_depth"] = sel(lane["t_depth"][parent] + 1, lane["t_depth"])
    lane["t_rank"] = sel(rank, lane["t_rank"])
    lane["t_pos"] = sel(lane["t_pos"][parent] if shared else 0, lane["t_pos"])
    lane["t_cp"] = sel(lane["t_cp"][parent], lane["t_cp"])
    lane["t_start"] = sel(step, lane["t_start"])
    lane["t_bornlog"] = sel(lane["g_n"], lane["t_bornlog"])
    lane["t_key"] = sel(jax.vmap(_child_key)(lane["t_key"][parent], rank), lane["t_key"])
    lane["t_script"] = sel(jax.vmap(lambda q, pr_, k: _script_row(lane, q, pr_, k))(
        lane["t_req"][parent], lane["t_script"][parent], rank), lane["t_script"])
    lane["t_q"] = sel(queue, lane["t_q"])
    lane["t_qlen"] = sel(jnp.minimum(qlen, spec.n_queue), lane["t_qlen"])
    lane["t_qhead"] = sel(0, lane["t_qhead"])
    lane["t_qsamp"] = sel(False, lane["t_qsamp"])
    lane["t_label"] = sel(label, lane["t_label"])
    lane["t_lablen"] = sel(lablen, lane["t_lablen"])
    own = jax.nn.one_hot(j, nt, dtype=bool)
    vis = (lane["t_vis"][parent] | own) if shared else own
    lane["t_vis"] = sel(vis, lane["t_vis"])
    # parents wait for their children
    forked = n_w > 0
    pid = jnp.where(forked, t_w, nt + jnp.arange(w))
    lane["t_state"] = lane["t_state"].at[pid].set(WAIT, mode="drop")
    lane["t_nchild"] = lane["t_nchild"].at[pid].set(n_w, mode="drop")
    lane["t_kidbase"] = lane["t_kidbase"].at[pid].add(n_w, mode="drop")
    lane["t_pending"] = lane["t_pending"].at[pid].set(n_w, mode="drop")
    lane["t_row"] = lane["t_row"].at[pid].set(-1, mode="drop")
    lane["r_thread"] = jnp.where(forked, -1, lane["r_thread"])
    qf = jnp.where(forked, q_w, -1)
    lane["req_forks"] = lane["req_forks"] + _per_request(qf, jnp.ones_like(n_w), nr)
    lane["req_created"] = lane["req_created"] + _per_request(qf, n_w, nr)
    # a child prompt longer than a thread's queue: the request is out of memory
    over = _per_request(jnp.where(is_new & (qlen > spec.n_queue), lane["t_req"], -1),
                        jnp.ones((nt,), jnp.int32), nr) > 0
    return _terminate(lane, R_OOM, step, over, spec)

  return do(lane), n_w


def _dropped(lane):
  """[NT] bool: threads cancelled by race or pruning (left out of their parent's join)."""
  return (lane["t_reason"] == R_CANCEL) | (lane["t_reason"] == R_PRUNE)


def _current_children(lane, p):
  """[NT] bool: the children of p's latest fork (ranks are unique among all of p's children,
  so the latest fork holds the last `t_nchild` of them)."""
  return (lane["t_parent"] == p) & (lane["t_req"] >= 0) & (
      lane["t_rank"] >= lane["t_kidbase"][p] - lane["t_nchild"][p])


def _join_queue(lane, spec: TreeSpec, p):
  """The forced queue of parent p after its children's join (flat / results modes)."""
  pr = spec.protocol
  lg, q = spec.n_log, spec.n_queue
  e = jnp.arange(lg)
  c = lane["g_thread"]
  cc = jnp.clip(c, 0)
  kids = _current_children(lane, p) & ~_dropped(lane)                     # [NT]
  is_child = (c >= 0) & kids[cc] & (e < lane["g_n"])
  first = lane["t_kidbase"][p] - lane["t_nchild"][p]
  local = jnp.clip(lane["t_rank"] - first, 0, spec.threads - 1)   # [NT] index within the fork
  rank = local[cc]
  nt = spec.threads
  aj, naj = _const(pr.after_join)
  if pr.join == "flat":  # child 0's tokens, child 1's, ..., after_join
    toks = jnp.concatenate([lane["g_tok"], aj])
    bucket = jnp.concatenate([rank, jnp.full(aj.shape, nt)])
    valid = jnp.concatenate([is_child, jnp.arange(aj.shape[0]) < naj])
    return _bucket_sorted(toks, bucket, valid, nt + 1, q)
  # results: open + per child (its span from the last result tag, or no_result) + close + after
  tag = is_child & _isin(lane["g_tok"], pr.result_tags)
  last_tag = jnp.full((spec.threads,), -1, jnp.int32).at[jnp.where(tag, cc, spec.threads)].max(
      jnp.where(tag, e, -1), mode="drop")
  stops = tuple(pr.child_stop)
  span = is_child & (last_tag[cc] >= 0) & (e >= last_tag[cc]) & ~_isin(lane["g_tok"], stops)
  ro, nro = _const(pr.results_open)
  nr, nnr = _const(pr.no_result)
  rc, nrc = _const(pr.results_close)
  kid_ok = kids & (last_tag < 0)  # a child without a result tag: no_result (never with a span)
  v_tok = jnp.broadcast_to(nr[None, :], (nt, nr.shape[0])).reshape(-1)
  v_bucket = jnp.broadcast_to(1 + local[:, None], (nt, nr.shape[0])).reshape(-1)
  v_ok = (kid_ok[:, None] & (jnp.arange(nr.shape[0]) < nnr)[None, :]).reshape(-1)
  # buckets: 0 results_open | 1 + child index: its span or no_result | nt + 1 close, after
  toks = jnp.concatenate([ro, v_tok, lane["g_tok"], rc, aj])
  bucket = jnp.concatenate([jnp.zeros(ro.shape, jnp.int32), v_bucket, 1 + rank,
                            jnp.full(rc.shape[0] + aj.shape[0], nt + 1)])
  valid = jnp.concatenate([jnp.arange(ro.shape[0]) < nro, v_ok, span, jnp.arange(rc.shape[0]) < nrc,
                           jnp.arange(aj.shape[0]) < naj])
  return _bucket_sorted(toks, bucket, valid, nt + 2, q)


def _join(lane, spec: TreeSpec, join_p, step):
  """Joins every parent in `join_p` [NT] (all its children are done). Cancelled children are
  left out (their KV is already dropped); a join queue that does not fit a thread's queue
  ends its request `out_of_memory`; a parent whose critical path the children used up stops
  after its forced join tokens (a child parent writes its close tokens first)."""
  pr = spec.protocol
  nt = spec.threads

  def do(lane):
    lane = dict(lane)
    owner = lane["s_owner"]
    oc = jnp.clip(owner, 0)
    par = lane["t_parent"][oc]
    pc = jnp.clip(par, 0)
    of_joining = (owner >= 0) & (par >= 0) & join_p[pc] & (
        lane["t_rank"][oc] >= lane["t_kidbase"][pc] - lane["t_nchild"][pc])
    j = jnp.arange(nt)
    kept = ~_dropped(lane)
    kids = lambda p: _current_children(lane, p)
    kid_pos = jax.vmap(lambda p: jnp.max(jnp.where(kids(p) & kept, lane["t_pos"], 0)))(j)
    kid_cp = jax.vmap(lambda p: jnp.max(jnp.where(kids(p), lane["t_cp"], 0)))(j)
    if pr.join == "stitch":
      lane["s_owner"] = jnp.where(of_joining, par, owner)
      new_pos = jnp.maximum(kid_pos, lane["t_pos"])
      aj, naj = _const(pr.after_join)
      queue = jnp.zeros((nt, spec.n_queue), jnp.int32).at[:, :aj.shape[0]].set(aj[None, :])
      qlen = jnp.full((nt,), naj, jnp.int32)
    else:
      drop = of_joining
      new_pos = lane["t_pos"]
      if pr.join == "results":
        block = (owner >= 0) & join_p[oc] & (lane["s_pos"] >= lane["t_markpos"][oc])
        drop = drop | block
        new_pos = lane["t_markpos"]
      lane["s_owner"] = jnp.where(drop, -1, owner)
      queue, qlen = _join_queues(lane, spec, join_p)
    # the children used up the critical path: the parent stops after its join tokens
    limit = lane["req_limits"][jnp.clip(lane["t_req"], 0), L_CRITICAL]
    spent = join_p & (kid_cp >= limit)
    is_child = lane["t_parent"] >= 0
    queue, qlen = _append_close(queue, qlen, spent & is_child, spec)
    overflow = join_p & (qlen > spec.n_queue)
    sel = lambda new, old: jnp.where(join_p.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
    lane["t_pos"] = sel(new_pos, lane["t_pos"])
    lane["t_cp"] = sel(kid_cp, lane["t_cp"])
    lane["t_q"] = sel(queue, lane["t_q"])
    lane["t_qlen"] = sel(jnp.minimum(qlen, spec.n_queue), lane["t_qlen"])
    lane["t_qhead"] = sel(0, lane["t_qhead"])
    lane["t_qsamp"] = sel(False, lane["t_qsamp"])
    lane["t_count"] = sel(0, lane["t_count"])
    lane["t_marklog"] = sel(-1, lane["t_marklog"])   # the block is over: a new fork needs a new one
    lane["t_markpend"] = sel(False, lane["t_markpend"])
    lane["t_after"] = sel(jnp.where(spent, NEXT_FINISH, NEXT_SAMPLE), lane["t_after"])
    lane["t_reason"] = jnp.where(join_p & spent, jnp.where(is_child, R_BUDGET, R_LENGTH),
                                 lane["t_reason"])
    lane["t_state"] = sel(READY, lane["t_state"])
    oom = _per_request(jnp.where(overflow, lane["t_req"], -1), jnp.ones((nt,), jnp.int32),
                       spec.requests) > 0
    return _terminate(lane, R_OOM, step, oom, spec)

  return do(lane)


def _join_queues(lane, spec: TreeSpec, join_p):
  """Forced queues [NT, Q] and their (unclipped) lengths [NT] of the joining parents (flat
  and results joins): one queue per joining parent, usually one a step, not one per entry."""
  nt = spec.threads
  todo = jnp.nonzero(join_p, size=nt, fill_value=0)[0]

  def one(c):
    k, queue, qlen = c
    qp, lp = _join_queue(lane, spec, todo[k])
    return k + 1, queue.at[todo[k]].set(qp), qlen.at[todo[k]].set(lp)

  _, queue, qlen = jax.lax.while_loop(lambda c: c[0] < jnp.sum(join_p), one,
                                      (0, lane["t_q"], lane["t_qlen"]))
  return queue, qlen


def _append_close(queue, qlen, where_t, spec: TreeSpec):
  """Appends the protocol's child close tokens to the queues of threads `where_t` [NT]."""
  close, nclose = _const(spec.protocol.child_close)
  if not nclose:
    return queue, qlen
  q = spec.n_queue
  toks = jnp.concatenate([queue, jnp.broadcast_to(close[None, :], (queue.shape[0], close.shape[0]))], 1)
  ok = jnp.concatenate([jnp.arange(q)[None, :] < qlen[:, None],
                        jnp.broadcast_to(where_t[:, None], (queue.shape[0], close.shape[0]))], 1)
  newq, _ = jax.vmap(lambda t, v: compact(t, v, q))(toks, ok)
  return (jnp.where(where_t[:, None], newq, queue),
          jnp.where(where_t, jnp.minimum(qlen, q) + nclose, qlen))


def _finish(lane, spec: TreeSpec, fin_t, step):
  """Threads in `fin_t` [NT] are done: release rows, count down their parents. Returns
  (lane, join_p, root_done [R], root_reason [R]): the parents whose children are now all done;
  the requests whose root finished and why."""
  nt = spec.threads
  lane = dict(lane)
  was_waiting = lane["t_state"] == WAIT
  lane["t_state"] = jnp.where(fin_t, DONE, lane["t_state"])
  lane["t_end"] = jnp.where(fin_t, step, lane["t_end"])
  lane["r_thread"] = jnp.where((lane["r_thread"] >= 0) & fin_t[jnp.clip(lane["r_thread"], 0)], -1,
                               lane["r_thread"])
  lane["t_row"] = jnp.where(fin_t, -1, lane["t_row"])
  par = lane["t_parent"]
  lane["t_pending"] = lane["t_pending"].at[jnp.where(fin_t & (par >= 0), par, nt)].add(-1, mode="drop")
  join_p = was_waiting & (lane["t_state"] == WAIT) & (lane["t_pending"] <= 0)
  # a request ends with its root thread (the caller closes it: rare, behind a lax.cond)
  root = fin_t & (par < 0) & (lane["t_req"] >= 0)
  q = jnp.where(root, lane["t_req"], -1)
  root_done = _per_request(q, jnp.ones((nt,), jnp.int32), spec.requests) > 0
  return lane, join_p, root_done, _per_request(q, lane["t_reason"], spec.requests)


def _pre(lane, drained, step, spec: TreeSpec):
  """Ends requests that ran out of total budget last step; classifies the drained rows."""
  lane = _terminate(lane, lane["req_ending"], step, lane["req_ending"] > 0, spec)
  t_w = jnp.clip(lane["r_thread"], 0)
  drained = drained & (lane["r_thread"] >= 0) & _live_threads(lane)[t_w]
  after = lane["t_after"][t_w]
  return lane, drained, drained & (after == NEXT_FORK)


def _sample_phase(lane, t_w, logits, drained, n_forked, step, spec: TreeSpec):
  """Samples for drained rows that neither fork nor finish and runs the state machine on the
  samples. Returns (lane, fin_t): threads that finish now."""
  pr = spec.protocol
  nt, w, nr = spec.threads, spec.rows, spec.requests
  lane = dict(lane)
  q_w = lane["t_req"][t_w]
  live_r = lane["req_active"] & ~lane["req_done"]
  after = lane["t_after"][t_w]
  fin_w = drained & (after == NEXT_FINISH)
  samp_w = drained & ((after == NEXT_SAMPLE) | ((after == NEXT_FORK) & (n_forked == 0)))
  # ---- sampling
  nsamp = lane["t_nsamp"][t_w]
  # keys: the thread's key (from the request's seed down its path), its sample count:
  # independent of the batch and of the schedule
  keys = jax.vmap(lambda kd, n: jax.random.fold_in(jax.random.wrap_key_data(kd), n))(
      lane["t_key"][t_w], nsamp)
  x = sample(logits, keys, spec.sampling)
  if spec.script:
    srow = lane["t_script"][t_w]
    sr, qc = jnp.clip(srow, 0), jnp.clip(q_w, 0)
    scripted = (srow >= 0) & (nsamp < lane["sc_len"][qc, sr])
    x = jnp.where(scripted, lane["sc_tok"][qc, sr, jnp.clip(nsamp, 0, spec.script - 1)], x)
    if spec.record_logits:
      rt = jnp.where(samp_w & (nsamp < spec.script), t_w, nt + jnp.arange(w))
      lane["rec"] = lane["rec"].at[rt, jnp.clip(nsamp, 0, spec.script - 1)].set(logits, mode="drop")
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits), x[:, None], axis=1)[:, 0]
  # total-token budget: samples beyond it are dropped and the request ends after this step
  qc = jnp.clip(q_w, 0)
  lim = lane["req_limits"][qc].T                                          # [LIMITS, W]
  oh = ((q_w[:, None] == jnp.arange(nr)[None, :]) & samp_w[:, None]).astype(jnp.int32)
  rank = (jnp.cumsum(oh, axis=0) - oh)[jnp.arange(w), qc]                 # earlier rows, same request
  allowed = samp_w & (lane["req_total"][qc] + rank < lim[L_TOTAL])
  n_ok = _per_request(jnp.where(samp_w, q_w, -1), allowed.astype(jnp.int32), nr)
  lane["req_total"] = lane["req_total"] + n_ok
  cut = _per_request(jnp.where(samp_w & ~allowed, q_w, -1), jnp.ones((w,), jnp.int32), nr) > 0
  over = cut | ((lane["req_total"] >= lane["req_limits"][:, L_TOTAL]) & (n_ok > 0))
  lane["req_ending"] = jnp.where(over & live_r, R_TOTAL, lane["req_ending"])
  is_child = lane["t_parent"][t_w] >= 0
  stop = jnp.where(is_child, _isin(x, tuple(pr.child_stop) + tuple(spec.root_stop)),
                   _isin(x, spec.root_stop))
  nsamp1 = nsamp + 1
  cp1 = lane["t_cp"][t_w] + 1
  budget = (nsamp1 >= lim[L_THREAD_TOKENS]) | (cp1 >= lim[L_CRITICAL])
  depth_ok = lane["t_depth"][t_w] < lim[L_DEPTH]
  if pr.forks:
    count = lane["t_count"][t_w]
    count = jnp.where(x == pr.open, 0, count + (x == pr.count))
    # a fork needs a block opened since the thread started or last joined (its spawn lines,
    # its outlines): the trigger alone does not fork
    opened = lane["t_markpend"][t_w] | (lane["t_marklog"][t_w] >= 0)
    fork_next = (x == pr.fork) & opened & depth_ok & (count >= 1) & (
        lane["t_depth"][t_w] < pr.max_depth)
  else:
    count = lane["t_count"][t_w]
    fork_next = jnp.zeros_like(stop)
  finish = stop | budget
  close, nclose = _const(pr.child_close)
  add_close = is_child & budget & ~stop & (nclose > 0)
  qtok = jnp.concatenate([x[:, None], jnp.broadcast_to(close[None, :], (w, close.shape[0]))], axis=1)
  qok = jnp.concatenate([jnp.ones((w, 1), bool),
                         add_close[:, None] & (jnp.arange(close.shape[0]) < nclose)[None, :]], axis=1)
  newq, newlen = jax.vmap(lambda t, v: compact(t, v, spec.n_queue))(qtok, qok)
  tid = jnp.where(allowed, t_w, nt + jnp.arange(w))
  put = lambda name, val: lane[name].at[tid].set(val, mode="drop")
  lane["t_q"] = put("t_q", newq)
  lane["t_qlen"] = put("t_qlen", newlen)
  lane["t_qhead"] = put("t_qhead", jnp.zeros_like(newlen))
  lane["t_qsamp"] = put("t_qsamp", jnp.ones_like(allowed))
  lane["t_nsamp"] = put("t_nsamp", nsamp1)
  lane["t_cp"] = put("t_cp", cp1)
  lane["t_logp"] = put("t_logp", lane["t_logp"][t_w] + logp)
  lane["t_count"] = put("t_count", count)
  if pr.forks:
    opened = allowed & (x == pr.open)
    oid = jnp.where(opened, t_w, nt + jnp.arange(w))
    lane["t_markpend"] = lane["t_markpend"].at[oid].set(True, mode="drop")
    lane["t_markpos"] = lane["t_markpos"].at[oid].set(lane["t_pos"][t_w], mode="drop")
  lane["t_after"] = put("t_after", jnp.where(finish, NEXT_FINISH, jnp.where(fork_next, NEXT_FORK, NEXT_SAMPLE)))
  reason = jnp.where(stop, R_STOP, jnp.where(is_child, R_BUDGET, R_LENGTH))
  lane["t_reason"] = jnp.where(
      jnp.zeros((nt,), bool).at[tid].set(finish, mode="drop"),
      jnp.zeros((nt,), jnp.int32).at[tid].set(reason, mode="drop"), lane["t_reason"])
  cancel, pruned, dropped = _cancellations(lane, t_w, x, allowed, is_child, spec)
  lane["t_reason"] = jnp.where(cancel, jnp.where(pruned, R_PRUNE, R_CANCEL), lane["t_reason"])
  # a cancelled subtree is left out of its parent's join: its KV is dropped now
  ow = lane["s_owner"]
  lane["s_owner"] = jnp.where((ow >= 0) & dropped[jnp.clip(ow, 0)], -1, ow)
  # ---- finishing threads (queue drained with NEXT_FINISH) and cancelled ones
  fin_t = jnp.zeros((nt,), bool).at[jnp.where(fin_w, t_w, nt)].set(True, mode="drop") | cancel
  return lane, fin_t


def _cancellations(lane, t_w, x, allowed, is_child, spec: TreeSpec):
  """(cancel [NT], pruned [NT], dropped [NT]): threads that stop now because a sibling reached the goal
  (race) or because their mean log-prob trails their best sibling's (pruning), with their
  whole subtrees (a sibling waiting on its own children is cancelled with them). A thread
  whose stop is already pending (it wrote its stop token or hit its budget) is not.
  `dropped`: the cancelled subtrees, finished descendants included (their KV is freed)."""
  pr, nt = spec.protocol, spec.threads
  st, par = lane["t_state"], lane["t_parent"]
  pc = jnp.clip(par, 0)
  finishing = lane["t_after"] == NEXT_FINISH
  active = ((st == READY) | (st == RUN) | (st == WAIT)) & ~((st != WAIT) & finishing)
  cancel = jnp.zeros((nt,), bool)
  if spec.race and pr.goal:
    won = allowed & is_child & _isin(x, pr.goal)
    par_won = jnp.zeros((nt,), bool).at[jnp.where(won, par[t_w], nt)].set(True, mode="drop")
    winner = jnp.zeros((nt,), bool).at[jnp.where(won, t_w, nt)].set(True, mode="drop")
    cancel = (par >= 0) & par_won[pc] & ~winner & active
  pruned = jnp.zeros((nt,), bool)
  if spec.prune_margin > 0:
    running = (st == RUN) & (par >= 0) & (lane["t_nsamp"] >= spec.prune_min_tokens) & ~finishing
    mean = lane["t_logp"] / jnp.maximum(lane["t_nsamp"], 1)
    best = jnp.full((nt,), -jnp.inf).at[jnp.where(running, par, nt)].max(mean, mode="drop")
    pruned = running & (mean < best[pc] - spec.prune_margin) & ~cancel
    cancel = cancel | pruned
  subtree = cancel
  for _ in range(max(spec.protocol.max_depth, 1)):  # descendants, one generation at a time
    subtree = subtree | ((par >= 0) & subtree[pc] & (st != FREE))
  return subtree & (st != FREE) & (st != DONE), pruned, subtree


def update(lanes, logits, drained, step, spec: TreeSpec):
  """Acts on every drained row of every lane: fork, finish, or sample and run the protocol
  state machine; then joins. The rare, heavier phases (fork, join) sit behind `lax.cond`s
  taken over all lanes at once (inside a vmap they would run every step)."""
  vm = jax.vmap
  lanes, drained, fork_w = vm(lambda l, d: _pre(l, d, step, spec))(lanes, drained)
  t_w = jnp.clip(lanes["r_thread"], 0)  # before forks release rows
  zeros = jnp.zeros(fork_w.shape, jnp.int32)
  lanes, n_forked = jax.lax.cond(
      jnp.any(fork_w), lambda l: vm(lambda a, f: _fork(a, spec, f, step))(l, fork_w),
      lambda l: (dict(l), zeros), lanes)
  lanes, fin_t = vm(lambda l, t, lo, d, n: _sample_phase(l, t, lo, d, n, step, spec))(
      lanes, t_w, logits, drained, n_forked)
  lanes, join_p, root_done, root_reason = vm(lambda l, f: _finish(l, spec, f, step))(lanes, fin_t)
  lanes = jax.lax.cond(
      jnp.any(root_done),
      lambda l: vm(lambda a, d, r: _close(a, d, r, step, spec))(l, root_done, root_reason),
      lambda l: dict(l), lanes)
  lanes = jax.lax.cond(jnp.any(join_p), lambda l: vm(lambda a, j: _join(a, spec, j, step))(l, join_p),
                       lambda l: dict(l), lanes)
  return lanes


# ----------------------------------------------------------------------------- the loop
LANE_KEYS = tuple(empty_lane(TreeSpec(), 1).keys())


def _split(st):
  return {k: st[k] for k in LANE_KEYS}


def forward_step(model: Transformer, st, spec: TreeSpec, m: int, pad_to: int = 0):
  """One engine step packing at most `m` tokens per lane. Returns (state without the
  cache, a LayerKV per layer with k, v [lanes, K, pad_to, D], their slots [lanes, pad_to]): the cache is only
  read here; the caller writes the new KV (outside any lax.switch, so in place)."""
  step = st["step"]
  lane, pk = jax.vmap(lambda l: pack(l, step, spec, m))(_split(st))
  h, new_kv = model.read_cache(pk["tok"], pk["pos"], pk["mask"], pk["mask_new"], st["cache"])
  slot = pk["slot"]
  if pad_to > m:  # every variant hands back the same shapes; pad slots are dropped
    new_kv = jax.tree.map(lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, pad_to - m), (0, 0))), new_kv)
    pad = jnp.broadcast_to(spec.slots + jnp.arange(m, pad_to), (slot.shape[0], pad_to - m))
    slot = jnp.concatenate([slot, pad.astype(slot.dtype)], axis=1)
  # logits only for rows that drained (at most min(rows, m) of them)
  r = min(spec.rows, m)
  sel = jax.vmap(lambda d: jnp.nonzero(d, size=r, fill_value=spec.rows)[0])(pk["drained"])  # [L, R]
  last = jnp.take_along_axis(pk["last"], jnp.clip(sel, 0, spec.rows - 1), axis=1)
  hl = jnp.take_along_axis(h, last[..., None], axis=1)                    # [L, R, E]
  lo = model.logits(hl)                                                   # [L, R, V]
  b = jnp.arange(lo.shape[0])[:, None]
  logits = jnp.zeros((lo.shape[0], spec.rows, lo.shape[-1]), lo.dtype).at[b, sel].set(lo, mode="drop")
  lane = update(lane, logits, pk["drained"], step, spec)
  return dict(lane, step=step + 1), new_kv, slot


def step_sizes(spec: TreeSpec) -> tuple:
  """Token budgets of the step variants: 1 (one thread decoding), rows (every row decoding),
  2 x rows (a few forced tokens: closing tags, a join's forced tokens) and chunk (prompts,
  re-prefills). More variants cost compile time, not run time."""
  return tuple(sorted({1, spec.rows, min(max(2 * spec.rows, 8), spec.chunk), spec.chunk}))


def segment(graphdef, params, st, until_step, cost, spec: TreeSpec):
  """Runs engine steps while step < until_step and some lane has work.

  Each step runs one variant of `step_sizes(spec)` (tokens per lane). `cost` [n variants]
  float32 is their relative cost per step: with every entry > 0 the step runs the variant
  that writes the most tokens per unit of cost (a busy lane whose work exceeds it waits:
  its forced chunk, or its rows past the budget; e.g. one lane's 30-token prompt does not
  make every lane run a 32-token step on a machine where that costs 6x a 1-token step);
  otherwise (all zeros, the default) the smallest variant that covers the busiest lane.
  The schedule changes when tokens are written, not which: sampled tokens and logits are
  the same; only what depends on siblings' relative progress can differ (which thread a
  total-token budget cuts, race cancellation, pruning). `st["vsteps"]` counts the steps run
  of each variant (the runner fits `cost` from them)."""
  model: Transformer = nnx.merge(graphdef, params)
  sizes = step_sizes(spec)

  def cond(st):
    return (st["step"] < until_step) & jnp.any(st["req_active"] & ~st["req_done"])

  def body(st):
    lane = jax.vmap(lambda l: assign_rows(l, spec))(_split(st))
    st = dict(st, **lane)
    tw = jnp.clip(st["r_thread"], 0)
    qlen = jnp.take_along_axis(st["t_qlen"], tw, axis=1)
    busy = st["r_thread"] >= 0  # rows of ended requests are freed the step they end
    per_lane = jnp.sum(jnp.where(busy, jnp.minimum(qlen, spec.chunk), 0), axis=1)   # [L]
    sz = jnp.asarray(sizes)
    which = jnp.minimum(jnp.sum(sz < jnp.max(per_lane)), len(sizes) - 1)
    covered = jnp.stack([jnp.sum(jnp.minimum(per_lane, m)) for m in sizes]).astype(jnp.float32)
    best = jnp.argmax(covered / jnp.maximum(cost, 1e-9)).astype(which.dtype)
    which = jnp.where(jnp.all(cost > 0), best, which)
    if len(sizes) == 1:
      new, new_kv, slot = forward_step(model, st, spec, sizes[0])
    else:
      new, new_kv, slot = jax.lax.switch(
          which, [functools.partial(forward_step, model, spec=spec, m=m, pad_to=sizes[-1]) for m in sizes],
          st)
    # the cache is written here, not in the switch's branches: a buffer that a lax.cond
    # returns is copied whole every step (the KV pool, at every step)
    cache = tuple(kvlib.write(c, kv.k, kv.v, slot) for c, kv in zip(st["cache"], new_kv))
    return dict(new, cache=cache, vsteps=st["vsteps"].at[which].add(1))

  return jax.lax.while_loop(cond, body, st)


def _on_lane(st, lane_idx, fn):
  old = jax.tree.map(lambda a: a[lane_idx], _split(st))
  lane = jax.tree.map(lambda a, b: a.at[lane_idx].set(b), _split(st), fn(old))
  return dict(st, **lane)


def _admit(st, lane_idx, req_idx, prompt, plen, limits, key, sc_tok, sc_len, sc_parent, sc_rank,
           count0, mark0, fork0, spec: TreeSpec):
  return _on_lane(st, lane_idx, lambda l: admit_lane(
      l, req_idx, prompt, plen, limits, key, sc_tok, sc_len, sc_parent, sc_rank, st["step"], count0,
      mark0, fork0, spec))


def _cancel(st, lane_idx, req_idx, reason, spec: TreeSpec):
  cond = jnp.arange(spec.requests) == req_idx
  return _on_lane(st, lane_idx, lambda l: _terminate(l, reason, st["step"], cond, spec))


def _release(st, lane_idx, req_idx, spec: TreeSpec):
  return _on_lane(st, lane_idx, lambda l: release(l, req_idx, spec))
