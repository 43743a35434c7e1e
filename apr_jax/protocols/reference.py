"""The plain reference semantics of a protocol, in Python lists: what each thread sees.

`simulate(protocol, prompt, scripts)` runs a trajectory whose sampled tokens are given per
thread (teacher forcing) and returns, for every thread, the exact context in front of each
of its samples: entries (token, position, uid), where every written token has a uid and
`Trace.visible[uid]` is the set of uids it attended to when it was written (itself
included). A full forward of the model over such a context, with positions as given and the
mask `Trace.mask(context)` (plain causal, except inside stitched Multiverse blocks where a
path never saw its siblings), gives the logits the engine must produce at that sample; the
training-side packing of a trajectory is checked against the same contexts. Threads are keyed by their path of ranks from the root (`()` is
the root, `(1, 0)` the first child of the second child).

This is deliberately independent of the engine's data structures (no slots, no masks, no
logs): threads run depth-first, contexts are Python lists.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from apr_jax.protocols import Protocol, outlines


@dataclasses.dataclass
class Thread:
  path: tuple
  forced: list = dataclasses.field(default_factory=list)    # forced tokens it started with
  written: list = dataclasses.field(default_factory=list)   # (token, position, uid) it wrote
  contexts: list = dataclasses.field(default_factory=list)  # per sample: [(token, position, uid)]
  samples: list = dataclasses.field(default_factory=list)   # the sampled tokens
  stop_reason: str = ""
  fork_groups: list = dataclasses.field(default_factory=list)  # (index in written, [child paths])


@dataclasses.dataclass
class Trace:
  threads: dict            # path -> Thread
  final_context: list      # the flat trajectory: [(token, position, uid)]
  total_tokens: int        # sampled tokens over all threads
  critical_path: int       # sequential samples + the longest child of every fork, recursively
  visible: dict            # uid -> frozenset of uids that token attended to

  def mask(self, context) -> np.ndarray:
    """[n, n] bool: entry i attends entry j."""
    uids = [u for _, _, u in context]
    return np.array([[u in self.visible[a] for u in uids] for a in uids], bool)


class _RequestEnds(Exception):
  """The request's total-token budget is spent: every thread stops where it is."""


def simulate(pr: Protocol, prompt: Sequence[int], scripts: dict, eos_ids: Sequence[int] = (),
             max_depth: int | None = None, max_threads: int | None = None,
             max_thread_tokens: int | None = None, max_total_tokens: int | None = None,
             max_critical_path: int | None = None, race: bool = False, prune_margin: float = 0.0,
             prune_min_tokens: int = 8, logprobs: dict | None = None, text=None) -> Trace:
  """scripts: {path: [sampled tokens]}; a thread whose script runs out stops ("script_end").

  Budgets, from their definitions:
  - max_threads: a fork creates at most max_threads - (threads so far) children (in
    depth-first order here, in time order in the engine: the same unless several forks
    compete for the last threads);
  - max_depth: a thread at that depth does not fork (its trigger is an ordinary token);
  - max_thread_tokens: a thread stops after that many samples (a child writes the
    protocol's close tokens first; its fork trigger is ignored);
  - max_critical_path: a thread stops once the samples on its path (its ancestors' before
    they forked, the longest child of each of its joins, its own) reach the limit, closed like
    a per-thread budget; after a join that reaches it, the parent writes its forced join
    tokens (and a child parent its close tokens) and stops;
  - max_total_tokens: the request ends after its that-many-th sample, wherever it is (the
    depth-first order here is the engine's when the budget binds outside parallel blocks);
  - race: the children that write the goal tag at the earliest sample count win; siblings
    still running then are cancelled with their subtrees and left out of the join (siblings
    sample in lockstep, one sample per step each, as in the engine when every child has a
    row); a sibling that stopped by then, or stops at that very sample, is kept;
  - pruning (prune_margin > 0, with `logprobs` {path: [log-prob of each sample]}): after
    each lockstep sample k >= prune_min_tokens, among the siblings still sampling (not
    ending at this sample) a child whose mean log-prob over its k samples trails the best
    such sibling's by more than the margin is cancelled ("pruned") with its subtree and left
    out of the join. Exact for children that do not fork (a child that forks pauses, so its
    clock leaves its siblings': not modelled, an error).
  A fork needs a block opened (`pr.open`) since the thread started or last joined.

  Protocols with an outline reader (`pr.outline`) need `text` = (decode, encode): the
  children are the outline numbers found by the originals' regex on the decoded block
  (`protocols.outlines.numbers`), each child's header spells its number with `encode`."""
  sim = _Sim(pr, scripts, eos_ids,
             pr.max_depth if max_depth is None else min(max_depth, pr.max_depth),
             max_threads or 1 << 30, max_thread_tokens or 1 << 30, max_total_tokens or 1 << 30,
             max_critical_path or 1 << 30, race)
  sim.prune = (prune_margin, prune_min_tokens, logprobs or {}) if prune_margin > 0 else None
  if pr.outline is not None and text is None:
    raise ValueError("a protocol that reads outline numbers needs text=(decode, encode)")
  sim.text = text
  try:
    _, _, cp = sim.run((), [], list(prompt), 0, 0, [], True, 0)
  except _RequestEnds:
    cp = max(sim.cp_seen)
  return Trace(threads=sim.threads, final_context=flat_trajectory(sim.threads, pr),
               total_tokens=sum(len(t.samples) for t in sim.threads.values()), critical_path=cp,
               visible=sim.visible)


class _Sim:
  """The depth-first simulation behind `simulate` (Python lists, no engine structures)."""

  def __init__(self, pr, scripts, eos_ids, max_depth, max_threads, max_thread_tokens, max_total,
               max_cp, race):
    self.pr, self.scripts, self.eos = pr, scripts, set(eos_ids)
    self.max_depth, self.max_threads, self.max_thread_tokens = max_depth, max_threads, max_thread_tokens
    self.max_total, self.max_cp, self.race = max_total, max_cp, race
    self.created, self.total = 1, 0
    self.threads: dict = {}
    self.visible: dict = {}
    self.cp_seen = [0]
    self.prune = None  # (margin, min tokens, logprobs)

  def run(self, path, ctx, forced, pos, depth, label, scan_forced, cp, limit=None):
    """Runs thread `path` from context `ctx`, critical path `cp` so far. Returns (what it
    adds to a shared context, final position, critical path at its end). `limit`:
    (samples, reason) after which it is cancelled (race) or pruned, with its subtree."""
    pr = self.pr
    th = self.threads[path] = Thread(path=path, forced=list(forced))
    st = dict(seen=list(ctx), pos=pos, count=0, mark=-1, mark_pos=0, labels=[])
    n0 = len(ctx)
    script = list(self.scripts.get(path, ()))
    is_child = len(path) > 0

    def write(t, scan):
      if scan and pr.forks:
        if t == pr.open:
          st.update(count=0, mark=len(st["seen"]), mark_pos=st["pos"])
        elif t == pr.count and pr.outline is None:
          st["count"] += 1
      uid = len(self.visible)
      self.visible[uid] = frozenset([u for _, _, u in st["seen"]] + [uid])
      st["seen"].append((t, st["pos"], uid))
      if scan and pr.outline is not None and st["mark"] >= 0:  # the block's text, read again
        st["labels"] = outlines.numbers(self.text[0]([e[0] for e in st["seen"][st["mark"]:]]))
        st["count"] = len(st["labels"])
      th.written.append((t, st["pos"], uid))
      st["pos"] += 1

    def stop_by_budget():
      if is_child:
        for t in pr.child_close:
          write(t, False)
      th.stop_reason = "budget" if is_child else "length"

    def can_fork():
      return pr.forks and st["count"] >= 1 and st["mark"] >= 0 and depth < self.max_depth

    for t in forced:
      write(t, scan_forced)
    pending = bool(scan_forced and forced and forced[-1] == pr.fork and can_fork())
    try:
      while True:
        if pending:
          pending = False
          n_kids = min(st["count"], self.max_threads - self.created)
          if n_kids > 0:  # no thread budget left: keep decoding sequentially
            cp, ended = self.fork(th, st, write, depth, label, n_kids, cp)
            st["labels"] = []
            if cp >= self.max_cp:
              stop_by_budget()
              break
            if ended:  # a malformed join closed the block: the thread ends
              th.stop_reason = ended
              break
        if limit is not None and len(th.samples) >= limit[0]:
          th.stop_reason = limit[1]
          break
        if not script:
          th.stop_reason = "script_end"
          break
        th.contexts.append(list(st["seen"]))
        x = script.pop(0)
        th.samples.append(x)
        self.total += 1
        cp += 1
        self.cp_seen.append(cp)
        write(x, True)
        if self.total >= self.max_total:
          th.stop_reason = "total_budget"
          raise _RequestEnds()
        if (is_child and (x in pr.child_stop or x in self.eos)) or (not is_child and x in self.eos):
          th.stop_reason = "stop"
          break
        if len(th.samples) >= self.max_thread_tokens or cp >= self.max_cp:
          stop_by_budget()
          break
        pending = x == pr.fork and can_fork()
    except _RequestEnds:
      th.stop_reason = th.stop_reason or "total_budget"
      raise
    return st["seen"][n0:], st["pos"], cp

  def _goal_at(self, cpath):
    """The sample index at which child `cpath`'s script writes the goal (None: never, or it
    stops or forks first: a child that forks pauses, so its clock is not its siblings')."""
    pr = self.pr
    for i, x in enumerate(list(self.scripts.get(cpath, ()))[:self.max_thread_tokens]):
      if x in pr.goal:
        return i
      if x in pr.child_stop or x in self.eos or x == pr.fork:
        return None
    return None

  def fork(self, th, st, write, depth, label, n_kids, cp):
    """The fork of thread `th` into n_kids children and its join; returns the parent's
    critical path after the join and, when a malformed flat join ends it, its stop reason."""
    pr = self.pr
    path, ended = th.path, None
    self.created += n_kids
    base = sum(len(g) for _, g in th.fork_groups)  # ranks are unique per parent
    paths = [path + (base + i,) for i in range(n_kids)]
    th.fork_groups.append((len(th.written) - 1, paths))
    limits = [None] * n_kids
    if self.race and pr.goal:
      goals = [self._goal_at(c) for c in paths]
      first = min((g for g in goals if g is not None), default=None)
      if first is not None:
        # winners stop at their goal sample's step; the rest are cut after first + 1 samples
        limits = [None if g == first else (first + 1, "cancelled") for g in goals]
    if self.prune is not None:
      limits = self._prune_limits(paths, cp, limits)
    kids = []
    seen = st["seen"]
    for i, cpath in enumerate(paths, start=1):
      if pr.context == "shared":
        clabel = (list(self.text[1](st["labels"][i - 1])) if pr.outline is not None
                  else pr.label(label, i))
        cforced = list(pr.child_pre) + clabel + list(pr.child_post)
        kids.append(self.run(cpath, seen, cforced, st["pos"], depth + 1, clabel, False, cp,
                             limits[i - 1]))
      else:
        span, seg = [], 0
        for t, _, _ in seen[st["mark"] + 1:]:
          if t == pr.count:
            seg += 1
          elif t != pr.fork and seg == i:
            span.append(t)
        kids.append(self.run(cpath, [], list(pr.child_pre) + span, 0, depth + 1, [], False, cp,
                             limits[i - 1]))
    new_cp = max(k[2] for k in kids)
    kept = [(cpath, k) for cpath, k in zip(paths, kids)
            if not self._cancelled(cpath)]
    if pr.join == "stitch":
      for _, (added, _, _) in kept:
        seen.extend(added)
      st["pos"] = max([st["pos"]] + [k[1] for _, k in kept])
      after = list(pr.after_join)
    elif pr.join == "flat":
      after, bad = self._flat_join(kept)
      if bad:
        cut = any(self.threads[c].stop_reason == "budget" for c, _ in kept)
        ended = ("budget" if len(path) else "length") if cut else "stop"
    else:  # results
      del seen[st["mark"]:]
      st["pos"] = st["mark_pos"]
      after = list(pr.results_open)
      for cpath, _ in kept:
        w = [e[0] for e in self.threads[cpath].written]
        tags = [j for j, t in enumerate(w) if t in pr.result_tags]
        if tags:
          after += [t for t in w[tags[-1]:] if t not in pr.child_stop]
        else:
          after += list(pr.no_result)
      after += list(pr.results_close) + list(pr.after_join)
    st.update(count=0, mark=-1)  # the block is over: a new fork needs a new opening tag
    for t in after:
      write(t, False)
    return new_cp, ended

  def _flat_join(self, kept):
    """The tokens a flat join re-prefills into the parent, and whether it is malformed (a
    child ended without its stop tag, for protocols that close the block then)."""
    pr, after, bad = self.pr, [], False
    for j, (cpath, (added, _, _)) in enumerate(kept):
      toks = [e[0] for e in added]
      if j > 0 and pr.join_skip_first:
        toks = toks[1:]
      kid = self.threads[cpath]
      if pr.malformed_close:
        at_eos = kid.stop_reason == "stop" and kid.samples[-1] in self.eos
        if at_eos:
          toks = toks[:-1] + list(pr.child_close)
        bad = bad or at_eos or kid.stop_reason == "budget"
      after += toks
    return after + list(pr.malformed_close if bad else pr.after_join), bad

  def _cancelled(self, path):
    return self.threads[path].stop_reason in ("cancelled", "pruned")

  def _natural_end(self, cpath, cp):
    """How many samples child `cpath` takes when nothing cancels it (its stop token, its
    token budget or the critical path)."""
    pr = self.pr
    script = list(self.scripts.get(cpath, ()))
    n = min(len(script), self.max_thread_tokens, max(self.max_cp - cp, 0))
    for i, x in enumerate(script[:n]):
      if x in pr.child_stop or x in self.eos:
        return i + 1
      if x == pr.fork and pr.forks:
        raise ValueError(f"the pruning reference needs children that do not fork ({cpath})")
    return n

  def _prune_limits(self, paths, cp, limits):
    """Per child: (samples, "pruned") where pruning stops it, else its race limit."""
    margin, min_tokens, logprobs = self.prune
    ends = [self._natural_end(c, cp) for c in paths]
    for i, lim in enumerate(limits):
      if lim is not None:
        ends[i] = min(ends[i], lim[0])
    out = list(limits)
    alive = set(range(len(paths)))
    for k in range(max(min_tokens, 1), max(ends, default=0) + 1):
      running = [i for i in sorted(alive) if k < ends[i]]
      if not running:
        continue
      mean = {i: sum(logprobs[paths[i]][:k]) / k for i in running}
      best = max(mean.values())
      for i in running:
        if mean[i] < best - margin:
          out[i] = (k, "pruned")
          alive.discard(i)
    return out


def flat_trajectory(threads: dict, pr: Protocol, path: tuple = ()) -> list:
  """A thread's written entries; for stitch joins with each fork's children (but the
  cancelled ones) inlined after the fork trigger (the flat trajectory in the protocol's
  own format)."""
  th = threads[path]
  groups = dict(th.fork_groups) if pr.join == "stitch" else {}
  out = []
  for i, tp in enumerate(th.written):
    out.append(tp)
    for k in groups.get(i, ()):
      if threads[k].stop_reason not in ("cancelled", "pruned"):  # left out of the join
        out.extend(flat_trajectory(threads, pr, k))
  return out




# ----------------------------------------------------------------------------- APR, original
# The released APR checkpoints' protocol at the text level, as the original evaluation loop
# runs it (REFERENCE.md §5; github:Parallel-Reasoning/APR src/eval/eval_apr.py and
# parallel_infernce_utils.py): plain-text tags, a model-written `<Sub Searches>` replaced by
# `<Calling Sub Searches>`, the spawn at the end of a call whose last line holds
# `<End Calling Sub Searches>`, child prompts rebuilt from the parent's own node lines, one
# level of children, the results block, and a malformed block ending the search unsolved.
APR_STOP = "<Sub Searches>"
APR_CALLING = "<Calling Sub Searches>"
APR_END_CALLING = "<End Calling Sub Searches>"


class AprMalformed(Exception):
  """The parent's spawn block names a node its text never generated, or a node line does
  not parse: the original's search ends there, with no result."""


@dataclasses.dataclass
class AprSearch:
  """One search as the original's `trace_dict`: calls (the root's texts, each whole, its
  prompt first), prefixes (the text each root call started from: the prompt, then the text
  with each results block), sub_calls (per spawn, each child's whole text), child_prompts
  (the same shape), result (the summary path after the second-to-last `Goal Reached` of the
  last call, or None) and error (why a malformed search ended, or "")."""
  calls: list
  prefixes: list
  sub_calls: list
  child_prompts: list
  result: str | None
  error: str = ""


def apr_calls_children(trace: str) -> bool:
  return APR_END_CALLING in trace.split("\n")[-1]


def apr_search_result(trace: str) -> str | None:
  """The text after the second-to-last `Goal Reached` (its newline dropped), stripped; None
  without two of them."""
  idx = [i for i in range(len(trace)) if trace.startswith("Goal Reached", i)]
  if len(idx) < 2:
    return None
  return trace[idx[-2]:].strip()[len("Goal Reached") + 1:]


def _list(text: str) -> list:
  import ast
  try:
    v = ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    raise AprMalformed(f"cannot read {text!r}") from e
  if not isinstance(v, list):
    raise AprMalformed(f"{text!r} is not a list")
  return v


def apr_nodes(trace: str) -> dict:
  """Every node the text names: id -> (target, nums, operations along its path). From each
  `Moving to Node #id` line followed by a `Current State: T:[...], Operations: [...]` line
  (a later pair wins), then from each `Generated Node #id: T:[...] Operation: op` line not
  known yet (its parent's operations + op)."""
  lines, nodes = trace.split("\n"), {}
  for a, b in zip(lines, lines[1:]):
    if "Moving to Node #" in a and "Current State:" in b:
      node = a.split("Moving to Node #")[1].strip()
      state = b.split("Current State:")[1].split("],")[0].strip()
      try:
        target = int(state.split(":")[0])
        nums = _list(state.split(":")[1].strip() + "]")
        ops = _list(b.split("Operations:")[1].strip())
      except (ValueError, IndexError) as e:
        raise AprMalformed(f"cannot read the state line {b!r}") from e
      nodes[node] = (target, nums, ops)
  for line in lines:
    if "Generated Node" not in line:
      continue
    try:
      node = line.split(":")[0].split("#")[1]
      if node in nodes:
        continue
      rest = line.split(":", 1)[1].strip()
      state, op = rest.split("Operation:")[0].strip(), rest.split("Operation:")[1].strip()
      target, nums = int(state.split(":")[0]), _list(state.split(":")[1].strip())
    except (ValueError, IndexError) as e:
      raise AprMalformed(f"cannot read the node line {line!r}") from e
    parent = ",".join(node.split(",")[:-1])
    if parent not in nodes:
      raise AprMalformed(f"node #{node}'s parent #{parent} was never visited")
    nodes[node] = (target, nums, nodes[parent][2] + [op])
  return nodes


def apr_children(trace: str) -> tuple[list, list]:
  """(child node ids, child prompts) of the trace's last spawn block: one per `<Start Sub
  Search ...> Moving to Node #id` line, each prompt `Moving to Node #id\\nCurrent State:
  T:[a, b], Operations: ['x-y=z', ...]`. A node named twice is malformed: the original's
  parallel evaluation (its default) files both children's results under the first one and
  then fails on the missing one."""
  nodes = apr_nodes(trace)
  block = trace.split(APR_CALLING + "\n")[-1].split("\n" + APR_END_CALLING)[0]
  ids, prompts = [], []
  for line in block.split("\n"):
    if "<Start Sub Search" in line and "Moving to Node" in line:
      if "Moving to Node #" not in line:
        raise AprMalformed(f"the spawn line {line!r} names no node")
      node = line.split("Moving to Node #")[1].strip()
      if node not in nodes:
        raise AprMalformed(f"the spawn block names node #{node}, which the text never generated")
      if node in ids:  # the original's parallel mode files both results under the first
        raise AprMalformed(f"the spawn block names node #{node} twice")
      target, nums, ops = nodes[node]
      ids.append(node)
      prompts.append(f"Moving to Node #{node}\nCurrent State: {target}:[{', '.join(map(str, nums))}], "
                     f"Operations: {ops!r}")
  return ids, prompts


def apr_join(trace: str, ids: Sequence[str], results: Sequence[str | None]) -> str:
  """The parent's text after its children: the last spawn block (from its last
  `<Calling Sub Searches>` line) replaced by the results block."""
  head = (APR_CALLING + "\n").join(trace.split(APR_CALLING + "\n")[:-1])
  out = head + "<Sub Searches>\n"
  for i, (node, res) in enumerate(zip(ids, results)):
    if res is None:
      out += f"<No Solution in Sub Search {i} at level 1 at Node #{node}>\n"
    else:
      out += f"<Goal Reached in Sub Search {i} at level 1 at Node #{node}>\n{res}\n"
  return out + "<End Sub Searches>\n"


def _calls(prompts: list):
  """Calls, as a generator: yields the texts still open, is sent their continuations (each
  from the text to EOS or the call's token budget), returns the finished texts. A
  continuation is cut at its first `<Sub Searches>` (the original's stop string), which is
  replaced by `<Calling Sub Searches>` before the model goes on; a trailing newline is
  dropped at the end."""
  texts, open_ = list(prompts), list(range(len(prompts)))
  while open_:
    conts = yield [texts[i] for i in open_]
    nxt = []
    for i, c in zip(open_, conts):
      cut = c.find(APR_STOP)
      if cut < 0:
        texts[i] += c
      else:
        texts[i] += c[:cut] + APR_CALLING
        nxt.append(i)
    open_ = nxt
  return [t[:-1] if t.split("\n")[-1] == "" else t for t in texts]


def apr_search_steps(prompt: str, max_spawns: int = 64, max_threads: int | None = None):
  """One search from the root prompt, as a generator (see `_calls`); returns an AprSearch.
  A spawn's children are completed together. `max_spawns` bounds the spawns of one search.
  `max_threads` (the engine's budget, the root included; the original has none): a spawn
  gets the first children that fit, none when the budget is spent (an empty results block)."""
  out = AprSearch(calls=[], prefixes=[prompt], sub_calls=[], child_prompts=[], result=None)
  trace = (yield from _calls([prompt]))[0]
  out.calls.append(trace)
  created = 1
  try:
    while apr_calls_children(trace):
      if len(out.sub_calls) >= max_spawns:
        raise AprMalformed(f"more than {max_spawns} spawns")
      ids, prompts = apr_children(trace)
      if max_threads is not None:
        keep = max(0, min(len(ids), max_threads - created))
        ids, prompts = ids[:keep], prompts[:keep]
      created += len(ids)
      kids = yield from _calls(prompts)
      out.sub_calls.append(kids)
      out.child_prompts.append(prompts)
      out.prefixes.append(apr_join(trace, ids, [apr_search_result(k) for k in kids]))
      trace = (yield from _calls([out.prefixes[-1]]))[0]
      out.calls.append(trace)
  except AprMalformed as e:
    out.error = str(e)
    return out
  out.result = apr_search_result(trace)
  return out


def apr_search_many(prompts: Sequence[str], complete_batch, max_spawns: int = 64,
                    max_threads: int | None = None) -> list:
  """Every search in lockstep: each round, the texts every search has open go to one
  `complete_batch(texts) -> continuations` call (as the original's thread pool sends them
  concurrently). Returns one AprSearch per prompt."""
  steps = [apr_search_steps(p, max_spawns, max_threads) for p in prompts]
  pending = {i: next(g) for i, g in enumerate(steps)}
  done: list = [None] * len(prompts)
  while pending:
    order = list(pending)
    conts = complete_batch([t for i in order for t in pending[i]])
    k, nxt = 0, {}
    for i in order:
      n = len(pending[i])
      try:
        nxt[i] = steps[i].send(conts[k:k + n])
      except StopIteration as stop:
        done[i] = stop.value
      k += n
    pending = nxt
  return done


def apr_search(prompt: str, complete, max_spawns: int = 64,
               max_threads: int | None = None) -> AprSearch:
  """One search; `complete(text) -> continuation` runs the model from `text`."""
  return apr_search_many([prompt], lambda texts: [complete(t) for t in texts], max_spawns,
                         max_threads)[0]
