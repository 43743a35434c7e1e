"""Host side of the fork/join engine: admission (continuous batching), deadlines, results.

`TreeEngine.run(requests)` pushes any number of requests through `spec.lanes` lanes of
`spec.requests` request slots each: between loop segments a waiting request takes a free
slot (in the least busy lane), runs its whole thread tree on the device, its threads sharing
the lane's rows, thread table and KV pool with the lane's other requests, and leaves when its
root thread finishes.

Batch independence. A request's tokens do not depend on what it was batched with: PRNG keys
derive from the request's seed and each thread's path, a thread sees only its own request's
KV, and each request reserves its share of the thread table (`max_threads` entries) when it
is admitted, so its forks are never cut short by other requests. KV slots are not reserved:
a request that runs out of slots while sharing its lane is restarted, alone in a lane (its
output is the same; the restart costs time). Only a request that runs out of slots alone ends
with `out_of_memory`. (Floating-point sums over a shared pool visit slots in a different
order, so logits can differ in the last bits; greedy decoding flips only on exact near-ties.)
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from apr_jax.cache import kv as kvlib
from apr_jax.cache import memory as memlib
from apr_jax.engine import tree
from apr_jax.processes import agree, fetch
from apr_jax.engine.sampling import derive
from apr_jax.engine.stop_reasons import finish_reason
from apr_jax.engine.tree import TreeSpec
from apr_jax.errors import UserError
from apr_jax.model.sharding import ShardingRules, single_device_mesh
from apr_jax.model.transformer import Transformer

BIG = 1 << 30


@dataclasses.dataclass
class Request:
  """One reasoning request. Limits default to the engine's capacity."""
  prompt: Sequence[int]
  seed: int | None = None               # None: derive(engine seed, the request's index in run())
  max_threads: int | None = None        # threads in the tree, the root included
  max_depth: int | None = None          # nesting depth (defaults to the protocol's)
  max_total_tokens: int | None = None   # sampled tokens over all threads
  max_critical_path: int | None = None  # sampled tokens along the longest root-to-leaf chain
  max_thread_tokens: int | None = None  # sampled tokens per thread (the root's max_new_tokens)
  deadline_s: float | None = None       # wall clock from admission (checked between segments)
  script: dict | None = None            # teacher forcing: {thread path tuple: sampled tokens}
  n: int = 1                            # samples of the prompt (OpenAI's n): sample i is the
                                        # request with seed derive(seed, i); the prompt is
                                        # stored once for the samples that share a lane


@dataclasses.dataclass
class ThreadInfo:
  id: int
  parent: int
  path: tuple                 # ranks from the root: () is the root, (1, 0) a grandchild
  depth: int
  start_step: int
  end_step: int
  tokens: int                 # sampled by this thread
  forced: int                 # forced tokens it wrote (prompt, prefix, re-prefill, results)
  stop_reason: str
  token_ids: list             # everything it wrote, in order
  positions: list             # ... and their positions
  text: str = ""
  logprobs: list = dataclasses.field(default_factory=list)  # per token_ids entry: the model's
                              # log-prob of a sampled token (log-softmax of the logits it was
                              # drawn from, before temperature, top-k, top-p); None: forced


@dataclasses.dataclass
class TreeResult:
  prompt_tokens: int
  token_ids: list             # the flat trajectory after the prompt, in the protocol's format
  text: str
  stop_reason: str
  threads: list
  total_tokens: int           # sampled by every thread (shared prefix counted once)
  critical_path: int          # sequential tokens + the longest thread of each parallel block
  forks: int
  steps: int
  wall_s: float
  kv_bytes: int               # the lane's KV pool (shared by the lane's requests)
  kv_stored_bytes: int        # high-water mark of KV actually stored
  logits: dict | None = None  # teacher forcing with record_logits: {path: [n, V]}
  samples: list = dataclasses.field(default_factory=list)  # n > 1: every sample's TreeResult
                              # (the fields above are sample 0's); n = 1: empty

  @property
  def finish_reason(self) -> str:
    """OpenAI's finish_reason for `stop_reason` (docs/engine.md)."""
    return finish_reason(self.stop_reason)

  def summary(self) -> dict:
    d = dataclasses.asdict(dataclasses.replace(self, logits=None, samples=[]))
    d.pop("logits")
    d.pop("samples")
    if self.samples:
      d["samples"] = [s.summary() for s in self.samples]
    d["finish_reason"] = self.finish_reason
    d["threads"] = [{k: v for k, v in t.items() if k not in ("token_ids", "positions", "logprobs")}
                    for t in d["threads"]]
    for t in d["threads"]:
      t["path"] = list(t["path"])
    return d


def script_rows(script: dict) -> list:
  """[(path, tokens, parent row, rank)] of a teacher-forcing script, parents before children;
  an ancestor without a script of its own gets an empty one (it samples freely), so every
  scripted thread is found on device from its parent's row and its rank."""
  paths = set()
  for p in script:
    p = tuple(int(r) for r in p)
    paths.update(p[:k] for k in range(len(p) + 1))
  order = sorted(paths, key=lambda p: (len(p), p))
  row = {p: i for i, p in enumerate(order)}
  toks = {tuple(int(r) for r in p): list(t) for p, t in script.items()}
  return [(p, toks.get(p, []), row[p[:-1]] if p else -1, p[-1] if p else -1) for p in order]


class StepCosts:
  """The relative cost of each step variant (`tree.step_sizes`), for `tree.segment`'s choice.

  "auto": measured on the running machine, no calibration run: every segment reports how
  many steps of each variant it ran and its wall time; a least-squares fit over the recent
  segments gives the per-step cost of each variant. Until two variants have been seen often
  enough, the loop covers the busiest lane (on accelerators, where a step's cost hardly
  grows with its tokens, the fit comes out flat and the choice stays close to that). A
  sequence fixes the costs; None (the default) always covers the busiest lane, the
  schedule that depends on nothing but the requests."""

  def __init__(self, sizes: Sequence[int], mode: Sequence[float] | str | None = None,
               window: int = 256, min_segments: int = 4):
    self.sizes = tuple(sizes)
    self.auto = isinstance(mode, str)
    if self.auto and mode != "auto":
      raise UserError(f"step_cost: 'auto', None or {len(self.sizes)} numbers, got {mode!r}")
    self.fixed = None
    if mode is not None and not self.auto:
      self.fixed = np.asarray(mode, np.float32)
      if self.fixed.shape != (len(self.sizes),) or not np.all(self.fixed > 0):
        raise UserError(f"step_cost needs {len(self.sizes)} positive numbers (variants "
                        f"{self.sizes}), got {mode!r}")
    self.window, self.min_segments = window, min_segments
    self.rows: list = []
    self.fitted: np.ndarray | None = None

  def cost(self) -> np.ndarray:
    """float32 [n variants]: the segment's `cost` argument (all zeros: cover the busiest lane)."""
    c = self.fixed if self.fixed is not None else self.fitted
    return np.zeros(len(self.sizes), np.float32) if c is None else c

  def observe(self, counts: np.ndarray, seconds: float):
    if not self.auto or counts.sum() == 0:
      return
    self.rows = (self.rows + [(counts.astype(np.float64), seconds)])[-self.window:]
    a = np.array([r[0] for r in self.rows])
    y = np.array([r[1] for r in self.rows])
    seen = (a > 0).sum(0) >= self.min_segments
    if seen.sum() < 2:
      return
    used = (a > 0).any(0)  # every variant that ran stays in the fit (its time is in y)
    x = np.concatenate([a[:, used], np.ones((len(a), 1))], axis=1)
    if np.linalg.matrix_rank(x) < x.shape[1]:  # segments of equal length: no overhead term
      x = x[:, :-1]
    if np.linalg.matrix_rank(x) < x.shape[1]:
      return
    sol = np.linalg.lstsq(x, y, rcond=None)[0][:used.sum()]
    per = np.zeros(len(self.sizes))
    per[used] = sol
    if np.any(per[seen] <= 0):
      return  # too noisy yet
    m = np.asarray(self.sizes, np.float64)
    # variants not seen enough: interpolated in tokens, proportional beyond the largest seen
    c = np.interp(m, m[seen], per[seen])
    big = m > m[seen].max()
    c[big] = per[seen][-1] * m[big] / m[seen].max()
    c = np.maximum.accumulate(c)  # more tokens never cost less
    self.fitted = (c / c[0]).astype(np.float32)


class _Batch:
  """The host's bookkeeping of one `TreeEngine.run`: the waiting queue (first come, first
  served) of sample groups, which sample holds which lane and slot, and the results.

  A request with n samples waits as groups of samples that fit one lane together (request
  slots, thread-table shares); the first sample of a group stores the prompt and the others
  share all of it but its last token (`tree.admit`'s src_slot)."""

  def __init__(self, eng: "TreeEngine", requests: Sequence[Request]):
    self.eng, self.requests, spec = eng, requests, eng.spec
    # waiting: (request index, its sample numbers, first admission time or None, alone)
    self.waiting = collections.deque()
    for i, r in enumerate(requests):
      k = eng.group_size(r)
      for j0 in range(0, r.n, k):
        self.waiting.append((i, tuple(range(j0, min(j0 + k, r.n))), None, False))
    # per lane and slot: dict(i, j, t0, threads, shared, alone, upto); a lane holding a
    # request that runs alone (a restart) takes no other request until that one ends
    self.occ: list = [[None] * spec.requests for _ in range(spec.lanes)]
    self.free_kv = [spec.slots] * spec.lanes      # free KV slots per lane, as of the last segment
    self.samples: list = [[None] * r.n for r in requests]
    self.results: list = [None] * len(requests)
    self.root_pos = np.full((spec.lanes, spec.requests), -1)  # as of the last segment
    self.prompts = [np.asarray(r.prompt, np.int64) for r in requests]
    # prompts that open a fork block are never shared (their block marks index the prompt)
    self.opens = [eng._prompt_block(list(r.prompt))[1] >= 0 for r in requests]

  def busy(self) -> bool:
    return bool(self.waiting) or any(o is not None for lane in self.occ for o in lane)

  def lane_view(self) -> list:
    return [[(o["i"], o["alone"]) for o in lane if o is not None] for lane in self.occ]

  def seed(self, i: int, j: int) -> int:
    r = self.requests[i]
    base = r.seed if r.seed is not None else derive(self.eng.seed, i)
    return base if r.n == 1 else derive(base, j)

  def _fits(self, lane: int, r: Request, alone: bool, k: int, stored: int) -> bool:
    """Lane `lane` has k free request slots, their threads and (when shared) room for the
    `stored` prompt tokens the group writes."""
    spec, need = self.eng.spec, self.eng._limits(r)[0]
    used = [o for o in self.occ[lane] if o is not None]
    if len(used) + k > spec.requests or sum(o["threads"] for o in used) + k * need > spec.threads:
      return False
    return not used or not (alone or any(o["alone"] for o in used) or
                            self.free_kv[lane] < stored + k + spec.chunk)

  def _lane_for(self, r: Request, alone: bool, k: int):
    """The least busy lane that fits the group, or None."""
    best = None
    for lane in range(self.eng.spec.lanes):
      if not self._fits(lane, r, alone, k, len(r.prompt)):
        continue
      used = sum(o is not None for o in self.occ[lane])
      if best is None or used < best[1]:
        best = (lane, used)
    return None if best is None else best[0]

  def _donor(self, i: int, lane: int):
    """(request slot, tokens) of the running request in `lane` whose stored prompt shares
    the longest leading span with request i's prompt (at most all but its last token), or
    None when no span reaches the engine's `prefix_cache` tokens. Donors store their whole
    prompt themselves and have written the span, or will (a reader waits on device): a
    donor admitted since the last segment qualifies only without a deadline, the one way
    it could end before writing it that would not restart its readers too."""
    need, best = self.eng.prefix_cache, None
    if not need or self.opens[i]:
      return None
    for slot, o in enumerate(self.occ[lane]):
      if o is None or o["upto"] or self.opens[o["i"]]:
        continue
      n = min(_common_prefix(self.prompts[o["i"]], self.prompts[i]), len(self.prompts[i]) - 1)
      stored = self.root_pos[lane, slot] >= n or self.requests[o["i"]].deadline_s is None
      if n >= need and stored and (best is None or n > best[1]):
        best = (slot, n)
    return best

  def _prefix_lane(self, i: int, k: int):
    """The lane (with room for k samples) whose donor shares the longest prompt prefix."""
    best = None
    for lane in range(self.eng.spec.lanes):
      d = self._donor(i, lane)
      if d is not None and (best is None or d[1] > best[1][1]) and \
          self._fits(lane, self.requests[i], False, k, len(self.prompts[i]) - d[1]):
        best = (lane, d)
    return best

  def admit(self):
    """Admits waiting groups in order while the head finds a lane."""
    while self.waiting:
      i, js, t0, alone = self.waiting[0]
      r = self.requests[i]
      pre = None if alone or len(js) > 1 else self._prefix_lane(i, 1)
      lane = pre[0] if pre else self._lane_for(r, alone, len(js))
      if lane is None:
        return  # first come, first served: the head waits for room
      self.waiting.popleft()
      text = self.eng.spec.protocol.text is not None  # the original APR reads its whole prompt
      shared = any(o is not None for o in self.occ[lane]) or len(js) > 1
      for o in self.occ[lane]:
        if o is not None:
          o["shared"] = True
      t0 = time.perf_counter() if t0 is None else t0
      lead = None
      for j in js:
        slot = self.occ[lane].index(None)
        src, upto = (-1, 0) if lead is None or text else (lead, len(r.prompt) - 1)
        if pre:  # a running request's prompt prefix
          src, upto = pre[1]
          self.eng.stats["prefix_tokens"] += upto
        threads = self.eng._admit_request(lane, slot, r, self.seed(i, j), src, upto)
        self.occ[lane][slot] = dict(i=i, j=j, t0=t0, threads=threads, shared=shared,
                                    alone=alone, upto=upto)
        self.root_pos[lane, slot] = -1  # not the slot's last occupant's
        self.free_kv[lane] -= len(r.prompt) - upto
        lead = slot if lead is None else lead

  def deadlines(self, done: np.ndarray) -> np.ndarray:
    """Cancels the running requests past their deadline (by process 0's clock, so every
    process cancels the same); returns done [lanes, R] with them."""
    eng, now = self.eng, time.perf_counter()
    expired = np.zeros(done.shape, bool)
    for lane, slots in enumerate(self.occ):
      for slot, o in enumerate(slots):
        dl = None if o is None else self.requests[o["i"]].deadline_s
        expired[lane, slot] = dl is not None and not done[lane, slot] and now - o["t0"] > dl
    if not any(self.requests[o["i"]].deadline_s is not None
               for slots in self.occ for o in slots if o is not None):
      return done  # nothing to agree on (the same on every process)
    for lane, slot in zip(*np.nonzero(agree(expired))):
      eng.state = eng._cancel(eng.state, np.int32(lane), np.int32(slot),
                              np.int32(tree.StopReason.DEADLINE))
      done[lane, slot] = True
    return done

  def _key(self, o):
    return o["i"] if self.requests[o["i"]].n == 1 else f"{o['i']}.{o['j']}"

  def _store(self, o, res, on_done):
    i = o["i"]
    self.samples[i][o["j"]] = res
    if any(x is None for x in self.samples[i]):
      return
    out = self.samples[i][0]
    if len(self.samples[i]) > 1:
      out = dataclasses.replace(out, samples=list(self.samples[i]))
    self.results[i] = out
    if on_done is not None:
      on_done(i, out)

  def collect(self, done: np.ndarray, on_progress, on_done):
    """Reads and releases the finished samples (a shared one out of memory is queued again,
    first, to run alone in a lane with its whole prompt); reports progress."""
    eng, occ = self.eng, self.occ
    finished = [(lane, slot) for lane, slots in enumerate(occ) for slot, o in enumerate(slots)
                if o is not None and done[lane, slot]]
    if on_progress is None and not finished:
      return
    snap = fetch(eng.state.lanes.replace(rec=None))
    if on_progress is not None:
      on_progress({self._key(o): eng._view(jax.tree.map(lambda v: v[lane], snap), slot)
                   for lane, slots in enumerate(occ) for slot, o in enumerate(slots) if o is not None})
    requeue = []
    for lane, slot in finished:
      o = occ[lane][slot]
      lane_np = jax.tree.map(lambda v: v[lane], snap)
      if eng.spec.record_logits:
        lane_np = lane_np.replace(rec=np.asarray(fetch(eng.state.lanes.rec)[lane]))
      res = eng._result(lane_np, slot, self.requests[o["i"]], time.perf_counter() - o["t0"],
                        o["upto"])
      if res.stop_reason == "out_of_memory" and o["shared"]:
        requeue.append((o["i"], (o["j"],), o["t0"], True))  # run it again, alone in a lane
        eng.stats["restarts"] += 1
      else:
        self._store(o, res, on_done)
      eng.state = eng._release(eng.state, np.int32(lane), np.int32(slot))
      occ[lane][slot] = None
    self.waiting.extendleft(reversed(requeue))


def _root_positions(th: tree.Threads, n_req: int):
  """[lanes, R]: the next position each request's root writes (-1: no request)."""
  def one(req, parent, pos):
    root = (req >= 0) & (parent < 0)
    return jnp.full((n_req,), -1, jnp.int32).at[jnp.where(root, req, n_req)].max(pos, mode="drop")
  return jax.vmap(one)(th.req, th.parent, th.pos)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
  n = min(len(a), len(b))
  diff = np.nonzero(a[:n] != b[:n])[0]
  return int(diff[0]) if len(diff) else n


class TreeEngine:
  """The fork/join engine for one model, protocol and static `TreeSpec`.

  `step_cost` picks how each loop step chooses its size (see `StepCosts`): None (always
  cover the busiest lane), "auto" (the most tokens per measured cost: more throughput on a
  compute-bound machine such as a CPU), or a fixed list.

  `prefix_cache`: a request whose prompt starts with at least this many tokens of the
  prompt of a request running in its lane reads them from that request's KV instead of
  storing its own (0: off)."""

  def __init__(self, model: Transformer, tokenizer=None, spec: TreeSpec = TreeSpec(), *,
               mesh: Mesh | None = None, rules: ShardingRules | None = None, cache_dtype=None,
               segment_steps: int = 32, step_cost: Sequence[float] | str | None = None,
               seed: int = 0, prefix_cache: int = 16):
    self.graphdef, self.params = nnx.split(model)
    self.cfg = model.cfg
    self.tokenizer = tokenizer
    if not spec.context:  # threads never write past the model's context
      spec = dataclasses.replace(spec, context=model.cfg.max_seq_len)
    self.spec = spec
    self.seed = seed
    self.mesh = mesh or single_device_mesh()
    self.rules = rules or ShardingRules()
    leaves = jax.tree.leaves(self.params)
    self.cache_dtype = jnp.dtype(cache_dtype or (leaves[0].dtype if leaves else jnp.float32))
    self.segment_steps = segment_steps
    if prefix_cache < 0:
      raise UserError(f"prefix_cache must be >= 0 tokens, got {prefix_cache}")
    # a text protocol reads its roots' own tokens (the original APR parses its prompt): no
    # prompt prefix is read from another request
    self.prefix_cache = 0 if spec.protocol.text is not None else prefix_cache
    data = self.mesh.shape.get("data", 1)
    if spec.lanes % data:
      raise UserError(f"lanes ({spec.lanes}) must be a multiple of the mesh data axis ({data})")
    self._lane_sh = NamedSharding(self.mesh, P("data"))
    self._rep = NamedSharding(self.mesh, P())
    self._cache_sh = kvlib.cache_sharding(self.cfg, spec.lanes, spec.slots, self.mesh, self.rules)
    self.bytes_per_token = memlib.kv_bytes_per_token(self.cfg, self.cache_dtype)
    self.stats = {"compile_s": 0.0, "restarts": 0, "prefix_tokens": 0, "prefill_calls": 0,
                  "prefill_tokens": 0, "prefill_s": 0.0}
    self.costs = StepCosts(tree.step_sizes(spec), step_cost)
    # a pool that cannot fit is an error here, not deep inside XLA (`cache.memory`)
    self.memory = memlib.check(spec, self.cfg, self.cache_dtype, self.mesh)
    self._build()

  @property
  def capacity(self) -> int:
    """Requests in flight at once."""
    return self.spec.lanes * self.spec.requests

  # ---- compiled programs
  def _shardings(self):
    shape = jax.eval_shape(lambda: tree.empty_lane(self.spec, self.cfg.vocab_size))
    lanes = jax.tree.map(lambda _: self._lane_sh, shape)
    cache = tuple(kvlib.LayerKV(self._cache_sh, self._cache_sh) for _ in range(self.cfg.n_layers))
    return tree.EngineState(lanes=lanes, cache=cache, step=self._rep, vsteps=self._rep,
                            reads=self._rep)

  def _build(self):
    t0 = time.perf_counter()
    spec, cfg = self.spec, self.cfg
    sh = self._shardings()
    self._init = jax.jit(lambda: tree.init(spec, cfg, self.cache_dtype, self._cache_sh),
                         out_shardings=sh)
    # a partial per engine: its jit cache counts this engine's loop programs only
    self._segment = jax.jit(functools.partial(tree.segment, spec=spec), static_argnums=(0,),
                            donate_argnums=(2,), out_shardings=sh)
    self._admit = jax.jit(functools.partial(tree.admit, spec=spec), donate_argnums=(0,),
                          out_shardings=sh)
    self._cancel = jax.jit(functools.partial(tree.cancel, spec=spec), donate_argnums=(0,),
                           out_shardings=sh)
    self._release = jax.jit(functools.partial(tree.release, spec=spec), donate_argnums=(0,),
                            out_shardings=sh)
    self._root_pos = jax.jit(functools.partial(_root_positions, n_req=spec.requests))
    if spec.prefill:
      shards = self.mesh.shape.get("data", 1)
      self._prefill_fn = jax.jit(functools.partial(
          tree.prefill, spec=spec, c=spec.prefill, min_tokens=spec.n_prefill_min, shards=shards),
          static_argnums=(0,), donate_argnums=(2,), out_shardings=sh)
      self._prefill_work = jax.jit(functools.partial(
          tree.prefill_work, spec=spec, c=spec.prefill, min_tokens=spec.n_prefill_min,
          shards=shards))
    self.state = self._init()
    # compile the loop now (one program for every protocol event, request and batch): a call
    # with until_step = 0 runs no step
    self.state = self._segment(self.graphdef, self.params, self.state, np.int32(0),
                               self.costs.cost())
    if spec.prefill:  # and the prefill program, ahead of time
      self._prefill = self._prefill_fn.lower(self.graphdef, self.params, self.state).compile()
      fetch(self._prefill_work(self.state))
    jax.block_until_ready(self.state.step)
    self.stats["compile_s"] += time.perf_counter() - t0

  def loop_hlo(self) -> str:
    """The optimized HLO of the loop program (tests look for host callbacks in it)."""
    return self._segment.lower(self.graphdef, self.params, self.state,
                               np.int32(0), self.costs.cost()).compile().as_text()

  def compiled_loops(self) -> int:
    """How many loop programs have been compiled (the jit cache size): 1 whatever ran."""
    return self._segment._cache_size()

  # ---- requests
  def _limits(self, r: Request) -> np.ndarray:
    """The request's limits (tree.LIMITS order), each checked against what the engine can
    hold: a budget the engine cannot honour is an error, never a silent cap."""
    spec, pr = self.spec, self.spec.protocol
    vals = [spec.request_threads if r.max_threads is None else r.max_threads,
            pr.max_depth if r.max_depth is None else r.max_depth,
            r.max_total_tokens or BIG, r.max_critical_path or BIG, r.max_thread_tokens or BIG]
    for name, v in zip(tree.LIMITS, vals):
      if v < 0 or (v == 0 and name != "max_depth"):
        raise UserError(f"{name} must be positive, got {v}")
    threads, depth = vals[tree.Limit.THREADS], min(vals[tree.Limit.DEPTH], pr.max_depth)
    if threads > spec.request_threads:
      raise UserError(f"max_threads {threads} > the {spec.request_threads} threads a request can "
                      f"have in this engine ({spec.threads} table entries per lane shared by "
                      f"{spec.requests} requests); build it with more (TreeSpec.threads)")
    if pr.digits and pr.forks and threads - 1 > 10 ** tree.LABEL_DIGITS - 1:
      raise UserError(f"max_threads {threads}: thread labels are numbered up to "
                      f"{10 ** tree.LABEL_DIGITS - 1} children per fork")
    if pr.forks and tree.label_tokens(pr, depth) > spec.label:
      raise UserError(f"labels at depth {depth} need {tree.label_tokens(pr, depth)} tokens > "
                      f"TreeSpec.label {spec.label}; lower max_depth or raise the label size")
    return np.asarray(vals, np.int32)

  def log_need(self, r: Request) -> int | None:
    """Token-log entries the request can need at most (`tree.log_bound`); None when its
    sampled tokens are unbounded (no total or per-thread budget: it runs until the engine's
    memory ends it, `out_of_memory`)."""
    lim = [int(x) for x in self._limits(r)]
    total = min(lim[tree.Limit.TOTAL], lim[tree.Limit.THREADS] * lim[tree.Limit.THREAD_TOKENS])
    if total >= BIG:
      return None
    depth = int(min(lim[tree.Limit.DEPTH], self.spec.protocol.max_depth))
    if not self.spec.protocol.forks:
      depth = 0
    return tree.log_bound(self.spec.protocol, len(r.prompt), int(lim[tree.Limit.THREADS]), depth, total)

  def group_size(self, r: Request) -> int:
    """How many of a request's samples run together in one lane, sharing its prompt: as
    many as the lane's request slots and thread table take; 1 when the prompt cannot be
    shared (one token, a prompt that opens a fork block)."""
    if r.n == 1 or len(r.prompt) < 2 or self._prompt_block(list(r.prompt))[1] >= 0:
      return 1
    need = int(self._limits(r)[tree.Limit.THREADS])
    return max(1, min(r.n, self.spec.requests, self.spec.threads // need))

  def _check(self, r: Request):
    spec = self.spec
    n = len(r.prompt)
    if isinstance(r.n, bool) or not isinstance(r.n, (int, np.integer)) or r.n < 1:
      raise UserError(f"n (samples per request) must be a positive integer, got {r.n!r}")
    if n == 0:
      raise UserError("empty prompt")
    if n > spec.n_queue or n >= spec.slots:
      raise UserError(f"prompt of {n} tokens does not fit the engine (queue {spec.n_queue}, "
                      f"{spec.slots} KV slots per lane); build it with more slots "
                      f"(TreeSpec.slots, an eval config's `slots`)")
    if n >= spec.context:
      raise UserError(f"prompt of {n} tokens does not fit the model's context of {spec.context}")
    bad = [t for t in r.prompt if not 0 <= int(t) < self.cfg.vocab_size]
    if bad:
      raise UserError(f"token id {bad[0]} is outside the model's vocab of {self.cfg.vocab_size}")
    need = self.log_need(r)
    if need is not None and need > spec.n_log:
      raise UserError(f"the request's budgets can need {need} token-log entries > the "
                      f"engine's {spec.n_log} per lane; build it with TreeSpec.log >= {need} "
                      f"(or lower max_total_tokens / max_threads)")
    if r.script:
      if not spec.script:
        raise UserError("this engine was built without teacher forcing (TreeSpec.script)")
      rows = script_rows(r.script)
      if len(rows) > spec.script_rows:
        raise UserError(f"{len(rows)} scripted threads (with their ancestors) > script_rows "
                        f"{spec.script_rows}")
      for p, toks, _, _ in rows:
        if len(toks) > spec.script:
          raise UserError(f"script of thread {p} has {len(toks)} tokens > {spec.script}")

  def _admit_request(self, lane: int, slot: int, r: Request, seed: int, src_slot: int = -1,
                     upto: int = 0):
    """Admits `r` into (lane, slot); src_slot >= 0: the request there stores its first
    `upto` prompt tokens (the same prompt), and this one writes the rest."""
    spec, pr = self.spec, self.spec.protocol
    prompt = [int(t) for t in r.prompt]
    q = np.zeros((spec.n_queue,), np.int32)
    q[:len(prompt) - upto] = prompt[upto:]
    # the prompt may open a block and end with the fork trigger: a forced fork
    count, mark, outline0 = self._prompt_block(prompt)
    limits = self._limits(r)
    fork0 = (pr.forks and prompt[-1] == pr.fork and mark >= 0 and count >= 1 and
             min(limits[tree.Limit.DEPTH], pr.max_depth) >= 1)
    ns, j = max(spec.script_rows, 1), max(spec.script, 1)
    sc = tree.Scripts(tokens=np.zeros((ns, j), np.int32), length=np.zeros((ns,), np.int32),
                      parent=np.full((ns,), -2, np.int32), rank=np.full((ns,), -2, np.int32))
    for i, (_, toks, parent, rank) in enumerate(script_rows(r.script or {})):
      sc.tokens[i, :len(toks)] = toks
      sc.length[i], sc.parent[i], sc.rank[i] = len(toks), parent, rank
    key = np.asarray(jax.random.key_data(jax.random.key(seed)))
    self.state = self._admit(self.state, np.int32(lane), np.int32(slot), q,
                             np.int32(len(prompt) - upto), limits, key, sc, np.int32(count),
                             np.int32(mark), np.bool_(fork0), outline0, np.int32(src_slot),
                             np.int32(upto))
    return int(limits[0])

  def _prompt_block(self, prompt) -> tuple[int, int, dict]:
    """The root's block state after its prompt, which may open a block and announce its
    threads (`--assistant_prefix`): (children announced, the opening tag's index or -1, the
    outline reader's fields `Threads.o_*`). With an outline reader the children are the
    block's distinct outline numbers, as on device."""
    spec, pr = self.spec, self.spec.protocol
    n_lab, m = spec.n_label, spec.n_outlines
    out = dict(o_state=np.int32(0), o_cur=np.zeros((n_lab,), np.int32), o_cur_len=np.int32(0),
               o_lab=np.zeros((m, n_lab), np.int32), o_len=np.zeros((m,), np.int32))
    count, mark, state, cur, labels = 0, -1, 0, [], []
    for i, t in enumerate(prompt):
      if t == pr.open:
        count, mark, state, cur, labels = 0, i, 0, [], []
        continue
      count += t == pr.count
      if pr.outline is not None:
        state, cur, done = pr.outline.step(state, cur, t)
        if done is not None and len(done) <= n_lab and done not in labels and len(labels) < m:
          labels.append(done)
    if pr.outline is None:
      return count, mark, out
    for i, lab in enumerate(labels):
      out["o_lab"][i, :len(lab)] = lab
      out["o_len"][i] = len(lab)
    out["o_state"] = np.int32(state)
    out["o_cur_len"] = np.int32(len(cur))
    out["o_cur"][:min(len(cur), n_lab)] = cur[:n_lab]
    return len(labels), mark, out

  def run(self, requests: Sequence[Request], on_progress: Callable | None = None,
          on_done: Callable | None = None, on_segment: Callable | None = None) -> list[TreeResult]:
    """Runs every request to completion; results in request order.

    `on_progress(views)` is called after every segment with {request index: [thread dicts
    (id, parent, state, tokens)]} for the requests in flight; `on_done(index, result)` as
    each request finishes; `on_segment(info)` after every loop segment with
    {"first_step", "steps", "seconds", "lanes"} (the segment's device time up to its results
    being read: what benchmarks time, one step per segment with `segment_steps = 1`; per lane
    the (request index, runs alone) pairs that were in it).

    A request without a seed gets `derive(engine seed, its index in requests)`: identical
    prompts sample differently, and the same list gives the same results."""
    for r in requests:
      self._check(r)
    batch = _Batch(self, requests)
    v0, step_now = fetch((self.state.vsteps, self.state.step))  # steps per variant so far
    while batch.busy():
      batch.admit()
      self._run_prefill()
      step = int(step_now)
      t_seg = time.perf_counter()
      # the step-size choice must be the same on every process: process 0's fitted costs
      self.state = self._segment(self.graphdef, self.params, self.state,
                                 np.int32(step + self.segment_steps), agree(self.costs.cost()))
      st = self.state
      done, free, v1, step_now, root_pos = fetch((
          st.lanes.requests.done, jnp.sum(st.lanes.slots.owner < 0, axis=1), st.vsteps, st.step,
          self._root_pos(st.lanes.threads)))
      batch.root_pos = np.array(root_pos)  # writable: admission resets entries
      seconds = time.perf_counter() - t_seg
      v1 = np.asarray(v1)
      self.costs.observe(v1 - v0, seconds)
      v0 = v1
      if on_segment is not None:
        on_segment({"first_step": step, "steps": int(step_now) - step, "seconds": seconds,
                    "lanes": batch.lane_view()})
      self.stats["step_cost"] = [round(float(c), 3) for c in self.costs.cost()]
      batch.free_kv = [int(x) for x in free]
      done = batch.deadlines(np.array(done))
      batch.collect(done, on_progress, on_done)
    return batch.results

  def _run_prefill(self):
    """Prefill calls between decode segments (`TreeSpec.prefill`): one call when some
    running thread is not served by it (decoding, or a queue the loop takes chunk by chunk:
    it waits for one call of `prefill` tokens per segment, not for the whole prompt), back
    to back while every running thread is (nobody waits)."""
    if not self.spec.prefill:
      return
    t0 = time.perf_counter()
    while True:
      todo, waiting = fetch(self._prefill_work(self.state))
      if not np.any(todo):
        break
      self.state = self._prefill(self.params, self.state)
      self.stats["prefill_calls"] += 1
      self.stats["prefill_tokens"] += int(np.sum(
          np.max(np.asarray(todo).reshape(self.mesh.shape.get("data", 1), -1), axis=1)))
      if waiting:
        break
    self.stats["prefill_s"] += time.perf_counter() - t0

  # ---- outputs
  @staticmethod
  def _paths(L: tree.Lane, slot: int) -> dict:
    """{table entry: its path of ranks from the root} for the request in `slot`."""
    mine = [int(t) for t in np.nonzero(L.threads.req == slot)[0]]
    paths: dict = {}

    def path(t):
      if t not in paths:
        p = int(L.threads.parent[t])
        paths[t] = () if p < 0 else path(p) + (int(L.threads.rank[t]),)
      return paths[t]
    for t in mine:
      path(t)
    return paths

  @classmethod
  def _order(cls, L: tree.Lane, slot: int) -> list:
    """The request's thread-table entries in creation order (root first; threads created in
    the same step by depth, then path)."""
    paths = cls._paths(L, slot)
    return sorted(paths, key=lambda t: (int(L.threads.born_log[t]), len(paths[t]), paths[t]))

  def _view(self, L: tree.Lane, slot: int) -> list:
    order = self._order(L, slot)
    local = {t: k for k, t in enumerate(order)}
    return [dict(id=local[t], parent=local.get(int(L.threads.parent[t]), -1),
                 state=tree.STATE_NAMES[int(L.threads.state[t])], tokens=int(L.threads.n_sampled[t]))
            for t in order]

  # ---- outputs
  def _threads(self, L: tree.Lane, slot: int, req: Request, order: list, upto: int = 0) -> list:
    """ThreadInfo of each of the request's threads (`order`: creation order; the root wrote
    its prompt but the first `upto` tokens)."""
    th, tok = L.threads, self.tokenizer
    n = int(L.log.n)
    g_tok, g_thr, g_pos = L.log.tok[:n], L.log.thread[:n], L.log.pos[:n]
    g_lp, g_sampled = L.log.logp[:n], L.log.kind[:n] == tree.LogKind.SAMPLED
    local = {t: k for k, t in enumerate(order)}
    paths = self._paths(L, slot)
    root, plen, start = order[0], len(req.prompt) - upto, int(L.requests.start[slot])
    out = []
    for t in order:
      own = np.nonzero(g_thr == t)[0]
      if t == root:
        own = own[plen:]  # the root's own tokens start after the prompt
      ids = [int(x) for x in g_tok[own]]
      out.append(ThreadInfo(
          id=local[t], parent=local.get(int(th.parent[t]), -1), path=paths[t],
          depth=int(th.depth[t]), start_step=int(th.start[t]) - start,
          end_step=int(th.end[t]) - start, tokens=int(th.n_sampled[t]),
          forced=int(th.n_written[t]) - int(th.n_sampled[t]) - (plen if t == root else 0),
          stop_reason=tree.REASONS[int(th.reason[t])] or "running", token_ids=ids,
          positions=[int(x) for x in g_pos[own]], text=tok.decode(ids) if tok is not None else "",
          logprobs=[float(g_lp[e]) if g_sampled[e] else None for e in own]))
    return out

  def _render(self, L: tree.Lane, order: list) -> list:
    """The request's flat trajectory (prompt included) in the protocol's format: each
    thread's written tokens; stitch joins insert the children where they forked; cancelled
    threads are left out (as they are of their parent's join)."""
    th, pr = L.threads, self.spec.protocol
    n = int(L.log.n)
    g_tok, g_thr = L.log.tok[:n], L.log.thread[:n]
    dropped = {t for t in order if int(th.reason[t]) in (tree.StopReason.CANCELLED,
                                                         tree.StopReason.PRUNED)}
    children = collections.defaultdict(list)
    for t in order[1:]:
      if t not in dropped:
        children[int(th.parent[t])].append(t)
    by_rank = lambda cs: sorted(cs, key=lambda c: int(th.rank[c]))

    if pr.text is not None:  # the original APR: the root's context as its last call holds it
      own = np.nonzero(g_thr == order[0])[0]
      pos = L.log.pos[:n][own]
      later = np.minimum.accumulate(np.append(pos, np.iinfo(np.int32).max)[::-1])[::-1][1:]
      return [int(x) for x in g_tok[own[pos < later]]]

    def render(t):
      out, groups = [], []
      if pr.join == "stitch":
        by_born = collections.defaultdict(list)
        for c in children[t]:
          by_born[int(th.born_log[c])].append(c)
        groups = sorted(by_born.items())
      gi = 0
      for e in np.nonzero(g_thr == t)[0]:
        while gi < len(groups) and groups[gi][0] <= e:
          for c in by_rank(groups[gi][1]):
            out += render(c)
          gi += 1
        out.append(int(g_tok[e]))
      for _, cs in groups[gi:]:
        for c in by_rank(cs):
          out += render(c)
      return out
    return render(order[0])

  def _result(self, L: tree.Lane, slot: int, req: Request, wall: float, upto: int = 0) -> TreeResult:
    """The result of the request in `slot` of lane arrays `L` (its first `upto` prompt tokens
    stored by another). Threads are numbered in creation order (the root is 0) whatever
    table entries they used."""
    spec, tok, th, rq = self.spec, self.tokenizer, L.threads, L.requests
    order = self._order(L, slot)
    plen = len(req.prompt)
    traj = self._render(L, order)[plen - upto:]
    if spec.protocol.text is not None:  # the last call's text past the prompt; the whole call
      live = self._render(L, order)     # when a spawn without a block opener dropped the prompt
      if live[:plen] != [int(t) for t in req.prompt]:
        traj = live[1:] if tok is not None and live[:1] == [tok.bos_id] else live
    body = traj
    if body and tok is not None and body[-1] in set(tok.stop_ids()):
      body = body[:-1]
    text = tok.decode(body) if tok is not None else ""
    if spec.protocol.text is not None and text.endswith("\n"):
      text = text[:-1]  # the original drops one trailing newline of a call's text
    logits = None
    if spec.record_logits:
      paths = self._paths(L, slot)
      logits = {paths[t]: np.asarray(L.rec[t, :min(int(th.n_sampled[t]), spec.script)])
                for t in order}
    start = int(rq.start[slot])
    return TreeResult(
        prompt_tokens=plen, token_ids=traj, text=text,
        stop_reason=tree.REASONS[int(rq.reason[slot])],
        threads=[dataclasses.asdict(x) for x in self._threads(L, slot, req, order, upto)],
        total_tokens=int(th.n_sampled[order].sum()), critical_path=int(th.cp[order].max()),
        forks=int(rq.forks[slot]), steps=int(rq.end[slot]) - start, wall_s=wall,
        kv_bytes=spec.slots * self.bytes_per_token,
        kv_stored_bytes=int(rq.high[slot]) * self.bytes_per_token, logits=logits)
