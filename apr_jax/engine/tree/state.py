"""The engine's state: what is static (`TreeSpec`), the vocabularies (thread states, stop
reasons, limits) and the typed tables of a lane.

Shapes use R = `spec.requests` (request slots per lane), NT = `spec.threads` (thread-table
entries), W = `spec.rows` (thread rows), S = `spec.slots` (KV slots), G = `spec.n_log`
(token-log entries), Q = `spec.n_queue` (forced-queue tokens per thread), LBL = `spec.label`,
NS = `spec.script_rows`, J = `spec.script`. Every table of the whole engine state carries a
leading [lanes] axis (the lane tables are built per lane and vmapped).
"""
from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp
from flax import struct

from apr_jax.engine.sampling import SamplingConfig
from apr_jax.engine.stop_reasons import REASONS, StopReason  # noqa: F401 (re-exported)
from apr_jax.errors import UserError
from apr_jax.protocols import Protocol
from apr_jax.protocols.apr_text import MAX_ID


class ThreadState(enum.IntEnum):
  FREE = 0     # the table entry holds no thread
  READY = 1    # waiting for a row
  RUN = 2      # on a row
  WAIT = 3     # waiting for its children (forked)
  DONE = 4


STATE_NAMES = ("free", "ready", "running", "waiting", "done")  # as progress views report them


class Next(enum.IntEnum):
  """What a thread does when its forced queue drains."""
  SAMPLE = 0
  FORK = 1
  FINISH = 2
  REWIND = 3   # the original APR: its stop string was written, rewind it (`forkjoin.rewind`)




class LogKind(enum.IntEnum):
  FORCED = 1   # prompt, forced prefix, label, close, re-prefill, results block
  SAMPLED = 2


class Limit(enum.IntEnum):
  """Columns of `Requests.limits`."""
  THREADS = 0
  DEPTH = 1
  TOTAL = 2
  CRITICAL = 3
  THREAD_TOKENS = 4


LIMITS = ("max_threads", "max_depth", "max_total_tokens", "max_critical_path", "max_thread_tokens")
MAX_OUTLINES = 64  # outline labels kept per thread and block
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
  attention: str = "tree"      # "tree": read only the slots the step's tokens see; "dense": every
                               # slot; "pallas": the pages they see, in the Pallas TPU kernel
  block: int = 64              # tree attention: KV slots per block
  prefill: int = 0             # >0: tokens per prefill call, a program apart from the loop that
                               # writes one long forced queue per data shard (`tree.prefill`)
  prefill_min: int = 0         # queues shorter than this are left to the loop (0: 2 x chunk)

  def __post_init__(self):
    if self.attention not in ("tree", "dense", "pallas"):
      raise UserError(f"attention must be tree, dense or pallas, got {self.attention!r}")
    if self.attention == "pallas" and self.slots % self.block:
      raise UserError(f"pallas attention reads whole pages: slots ({self.slots}) must be a "
                      f"multiple of block ({self.block})")
    for f in ("lanes", "requests", "rows", "threads", "slots", "chunk", "block"):
      if getattr(self, f) < 1:
        raise UserError(f"{f} must be >= 1, got {getattr(self, f)}")
    if self.prefill < 0 or self.prefill_min < 0:
      raise UserError(f"prefill and prefill_min must be >= 0, got {self.prefill}, "
                      f"{self.prefill_min}")
    if self.chunk < self.rows:
      raise UserError(f"chunk ({self.chunk}) must be >= rows ({self.rows})")
    if self.threads < self.requests:
      raise UserError(f"threads ({self.threads}) must be >= requests per lane ({self.requests})")
    if self.protocol.text is not None and self.label < MAX_ID:  # labels hold node ids
      object.__setattr__(self, "label", MAX_ID)

  @property
  def n_prefill_min(self):
    """The shortest forced queue a prefill call takes (shorter ones the loop writes)."""
    return self.prefill_min or 2 * self.chunk

  @property
  def n_log(self):
    return self.log or 4 * self.slots

  @property
  def n_queue(self):
    return self.queue or self.slots

  @property
  def n_outlines(self):
    """Outline labels kept per thread (protocols that label threads by their outline
    numbers): a fork creates at most this many children."""
    return min(self.request_threads, MAX_OUTLINES) if self.protocol.outline else 1

  @property
  def n_spawn(self):
    """Spawn lines one original-APR spawn reads (and checks) at most: its children."""
    return MAX_OUTLINES

  @property
  def n_stream(self):
    """Text tags read on every sample (1 when the protocol has none)."""
    return len(self.protocol.text.stream.tags) if self.protocol.text is not None else 1

  @property
  def n_label(self):
    """Label tokens kept per outline (1 when the protocol reads no outline numbers)."""
    return self.label if self.protocol.outline else 1

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
  if pr.text is not None:  # the original APR: a child's prompt copies a few of its parent's
    # lines (~256 tokens), a join each child's number and node id and its summary path (at
    # most its samples); a stop string's replacement (a few tokens) can exceed this
    return prompt_len + 2 * total + threads * (256 + 64 + MAX_ID)
  copies = (depth if pr.join != "stitch" else 0) + (1 if pr.context == "fresh" else 0)
  return prompt_len + (1 + copies) * (total + threads * per_thread) + threads * per_join


# ----------------------------------------------------------------------------- tables
class _Table:
  """Field-wise updates shared by the tables (each returns a new table)."""

  def set_at(self, idx, mode="drop", **vals):
    """field[idx] = value for each field given (indices past the end are dropped)."""
    return self.replace(**{k: getattr(self, k).at[idx].set(v, mode=mode) for k, v in vals.items()})

  def add_at(self, idx, **vals):
    return self.replace(**{k: getattr(self, k).at[idx].add(v, mode="drop") for k, v in vals.items()})

  def where(self, cond, **vals):
    """field = where(cond, value, field): `cond` is broadcast over each field's trailing axes."""
    def pick(k, v):
      old = getattr(self, k)
      return jnp.where(cond.reshape(cond.shape + (1,) * (old.ndim - cond.ndim)), v, old)
    return self.replace(**{k: pick(k, v) for k, v in vals.items()})


def _key_shape():
  return jax.random.key_data(jax.random.key(0)).shape


@struct.dataclass
class Requests(_Table):
  """Per request slot of a lane: every field [R] unless noted.

  active: the slot holds a request; done: it ended (its result waits for the host).
  reason: its StopReason. created: threads created (the root included); forks: fork events.
  total: tokens sampled by all its threads; ending: a StopReason to apply next step (the total
  budget ran out this step). start / end: engine steps. high: the most KV slots it held.
  limits [R, len(Limit)]: its budgets. key [R, 2]: PRNG key data from its seed.
  """
  active: jax.Array
  done: jax.Array
  reason: jax.Array
  created: jax.Array
  total: jax.Array
  forks: jax.Array
  ending: jax.Array
  start: jax.Array
  end: jax.Array
  high: jax.Array
  limits: jax.Array
  key: jax.Array

  @classmethod
  def empty(cls, spec: TreeSpec):
    r = spec.requests
    z = lambda *shape: jnp.zeros(shape, jnp.int32)
    return cls(active=jnp.zeros((r,), bool), done=jnp.zeros((r,), bool), reason=z(r), created=z(r),
               total=z(r), forks=z(r), ending=z(r), start=z(r), end=z(r), high=z(r),
               limits=z(r, len(Limit)), key=jnp.zeros((r,) + _key_shape(), jnp.uint32))


@struct.dataclass
class Scripts(_Table):
  """Teacher forcing, per request slot and script row (`runner.script_rows`).

  tokens [R, NS, J]: the row's sampled tokens; length [R, NS]; parent [R, NS]: the script row
  of its parent thread (-1: the root's row; -2: unused); rank [R, NS]: its rank in the parent.
  """
  tokens: jax.Array
  length: jax.Array
  parent: jax.Array
  rank: jax.Array

  @classmethod
  def empty(cls, spec: TreeSpec):
    r, ns, j = spec.requests, max(spec.script_rows, 1), max(spec.script, 1)
    return cls(tokens=jnp.zeros((r, ns, j), jnp.int32), length=jnp.zeros((r, ns), jnp.int32),
               parent=jnp.full((r, ns), -2, jnp.int32), rank=jnp.full((r, ns), -2, jnp.int32))


@struct.dataclass
class Threads(_Table):
  """The thread table of a lane, shared by its requests: every field [NT] unless noted.

  req: its request slot (-1: free entry). state: ThreadState. parent: entry (-1: a root).
  depth; rank: its number among all its parent's children (unique); n_children: children of
  its latest fork; kid_base: children created so far; pending: children not done yet.
  pos: next position it writes. queue [NT, Q], q_head, q_len: forced tokens still to write;
  q_sampled: the queue starts with its last sample. after: Next. count: children announced
  since the block opened. mark_pending / mark_pos / mark_log: the block's opening tag (its
  position, then its log entry once written; -1: no open block). n_sampled, n_written
  (sampled + forced); cp: critical path so far. start / end: steps. reason: StopReason.
  row: its row (-1: none). script: its script row (-1: samples freely). key [NT, 2]: its PRNG
  key data (the request's key folded down its path). logp: summed log-prob of its samples;
  last_logp: its latest sample's (the log records it when the sample is written).
  born_log: log length when it was created. label [NT, LBL], label_len: its label tokens.
  vis [NT, NT]: vis[t, u] = thread t sees the KV written by thread u.
  src, upto: a shared prompt prefix (another request's root, or -1): the thread also sees
  src's slots at positions < upto (the first `upto` prompt tokens, stored once for the lane's
  samples of one prompt); a root with a source waits for a row until src has written them.
  Outline numbers (protocols with an `outline` reader; shapes [NT, 1(, 1)] otherwise):
  o_state: the reader's state; o_cur [NT, LBL], o_cur_len: the number being read (its length
  counts past LBL: such a number is no label); o_lab [NT, M, LBL], o_len [NT, M]: the distinct
  numbers of the open block, in order (M = `spec.n_outlines`; `count` of them).
  Text tags (protocols with `text`, the original APR; `protocols.apr_text`): t_state
  [NT, n_stream]: the stream matcher's state over the current call's samples; t_flag: 1 the
  current line holds `<End Calling Sub Searches>`, 2 that line then a newline (an EOS then
  spawns), 0 neither; g_hit [NT, 2]: positions of the second-to-last and last `Goal
  Reached` (-1: none), g_clean: it ends at its token's last byte. call_base: samples before
  the current call (a thread's token budget counts per call). rw_need: bytes to take back
  from the end of its text at a rewind (the stop string and what followed it in its token).
  mark_sp: its spawn block's first token holds a space before the tag (`apr_text.plan`).
  """
  req: jax.Array
  state: jax.Array
  parent: jax.Array
  depth: jax.Array
  rank: jax.Array
  n_children: jax.Array
  kid_base: jax.Array
  pending: jax.Array
  pos: jax.Array
  queue: jax.Array
  q_head: jax.Array
  q_len: jax.Array
  q_sampled: jax.Array
  after: jax.Array
  count: jax.Array
  mark_pending: jax.Array
  mark_log: jax.Array
  mark_pos: jax.Array
  n_sampled: jax.Array
  n_written: jax.Array
  cp: jax.Array
  start: jax.Array
  end: jax.Array
  reason: jax.Array
  row: jax.Array
  script: jax.Array
  key: jax.Array
  logp: jax.Array
  last_logp: jax.Array
  born_log: jax.Array
  label: jax.Array
  label_len: jax.Array
  vis: jax.Array
  src: jax.Array
  upto: jax.Array
  o_state: jax.Array
  o_cur: jax.Array
  o_cur_len: jax.Array
  o_lab: jax.Array
  o_len: jax.Array
  t_state: jax.Array
  t_flag: jax.Array
  g_hit: jax.Array
  g_clean: jax.Array
  call_base: jax.Array
  rw_need: jax.Array
  mark_sp: jax.Array

  @classmethod
  def empty(cls, spec: TreeSpec):
    nt, q = spec.threads, spec.n_queue
    i32 = lambda *shape, v=0: jnp.full(shape, v, jnp.int32)
    return cls(
        req=i32(nt, v=-1), state=i32(nt), parent=i32(nt, v=-1), depth=i32(nt), rank=i32(nt),
        n_children=i32(nt), kid_base=i32(nt), pending=i32(nt), pos=i32(nt), queue=i32(nt, q),
        q_head=i32(nt), q_len=i32(nt), q_sampled=jnp.zeros((nt,), bool), after=i32(nt),
        count=i32(nt), mark_pending=jnp.zeros((nt,), bool), mark_log=i32(nt, v=-1),
        mark_pos=i32(nt), n_sampled=i32(nt), n_written=i32(nt), cp=i32(nt), start=i32(nt),
        end=i32(nt), reason=i32(nt), row=i32(nt, v=-1), script=i32(nt, v=-1),
        key=jnp.zeros((nt,) + _key_shape(), jnp.uint32), logp=jnp.zeros((nt,), jnp.float32),
        last_logp=jnp.zeros((nt,), jnp.float32),
        born_log=i32(nt), label=i32(nt, spec.label), label_len=i32(nt),
        vis=jnp.zeros((nt, nt), bool), src=i32(nt, v=-1), upto=i32(nt), o_state=i32(nt), o_cur=i32(nt, spec.n_label),
        o_cur_len=i32(nt), o_lab=i32(nt, spec.n_outlines, spec.n_label),
        o_len=i32(nt, spec.n_outlines), t_state=i32(nt, spec.n_stream), t_flag=i32(nt),
        g_hit=i32(nt, 2, v=-1), g_clean=jnp.zeros((nt, 2), bool), call_base=i32(nt), rw_need=i32(nt),
        mark_sp=jnp.zeros((nt,), bool))


@struct.dataclass
class Rows(_Table):
  """thread [W]: the thread-table entry on each row (-1: free row)."""
  thread: jax.Array


@struct.dataclass
class Slots(_Table):
  """The KV pool's bookkeeping: owner [S] (thread entry, -1: free), pos [S] (its position)."""
  owner: jax.Array
  pos: jax.Array


@struct.dataclass
class Log(_Table):
  """The token log: every token written, in order (entries [G]; n: entries used).

  tok; thread: its writer's entry (-1: unused); pos; kind: LogKind; step: when it was written;
  logp (float32): a sampled token's log-prob under the logits it was sampled from (0: forced).
  """
  tok: jax.Array
  thread: jax.Array
  pos: jax.Array
  kind: jax.Array
  step: jax.Array
  logp: jax.Array
  n: jax.Array


@struct.dataclass
class Lane:
  """One lane: its requests, scripts, thread table, rows, KV bookkeeping and token log, and
  rec [NT, J, V] (the logits of every scripted sample with `record_logits`, else [1, 1, 1])."""
  requests: Requests
  scripts: Scripts
  threads: Threads
  rows: Rows
  slots: Slots
  log: Log
  rec: jax.Array


@struct.dataclass
class EngineState:
  """The whole engine: lanes (a Lane whose every field has a leading [lanes] axis), the KV
  cache (a LayerKV per layer, k/v [lanes, kv_heads, S, head_dim]), the step counter, the
  steps run per step variant (vsteps [len(step_sizes)]) and the KV slots attention read
  (reads [2] float32, summed over steps and lanes: the slots some packed token saw, the slots
  attention visited; per layer)."""
  lanes: Lane
  cache: tuple
  step: jax.Array
  vsteps: jax.Array
  reads: jax.Array


def empty_lane(spec: TreeSpec, vocab: int) -> Lane:
  """One lane with no request (no leading lane axis)."""
  w, s, lg = spec.rows, spec.slots, spec.n_log
  i32 = lambda *shape, v=0: jnp.full(shape, v, jnp.int32)
  rec_shape = (spec.threads, max(spec.script, 1), vocab) if spec.record_logits else (1, 1, 1)
  return Lane(
      requests=Requests.empty(spec), scripts=Scripts.empty(spec), threads=Threads.empty(spec),
      rows=Rows(thread=i32(w, v=-1)), slots=Slots(owner=i32(s, v=-1), pos=i32(s)),
      log=Log(tok=i32(lg), thread=i32(lg, v=-1), pos=i32(lg), kind=i32(lg), step=i32(lg),
              logp=jnp.zeros((lg,), jnp.float32), n=i32()),
      rec=jnp.zeros(rec_shape, jnp.float32))
