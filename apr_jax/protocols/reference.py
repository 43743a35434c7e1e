"""The plain reference semantics of a protocol, in Python lists: what each thread sees.

`simulate(protocol, prompt, scripts)` runs a trajectory whose sampled tokens are given per
thread (teacher forcing) and returns, for every thread, the exact context in front of each
of its samples: entries (token, position, uid), where every written token has a uid and
`Trace.visible[uid]` is the set of uids it attended to when it was written (itself
included). A full forward of the model over such a context, with positions as given and the
mask `Trace.mask(context)` (plain causal, except inside stitched Multiverse blocks where a
path never saw its siblings), gives the logits the engine must produce at that sample; the training-side packing of a trajectory is checked
against the same contexts. Threads are keyed by their path of ranks from the root (`()` is
the root, `(1, 0)` the first child of the second child).

This is deliberately independent of the engine's data structures (no slots, no masks, no
logs): threads run depth-first, contexts are Python lists.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from apr_jax.protocols import Protocol


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


def simulate(pr: Protocol, prompt: Sequence[int], scripts: dict, eos_ids: Sequence[int] = (),
             max_depth: int | None = None, max_threads: int | None = None,
             max_thread_tokens: int | None = None) -> Trace:
  """scripts: {path: [sampled tokens]}; a thread whose script runs out stops ("script_end").

  Budgets as the engine applies them: a fork creates at most max_threads - (threads so far)
  children (in depth-first order here, in time order in the engine: the same unless several
  forks compete for the last threads); a thread that reaches max_thread_tokens samples
  stops (a child writes the protocol's close tokens first; its fork trigger is ignored)."""
  max_depth = pr.max_depth if max_depth is None else min(max_depth, pr.max_depth)
  max_threads = max_threads or 1 << 30
  max_thread_tokens = max_thread_tokens or 1 << 30
  created = [1]
  threads: dict = {}
  visible: dict = {}
  eos = set(eos_ids)

  def run(path, ctx, forced, pos, depth, label, scan_forced):
    """Returns (what the thread adds to a shared context, final position, critical path)."""
    th = threads[path] = Thread(path=path, forced=list(forced))
    seen = list(ctx)
    n0 = len(seen)
    count, mark_idx, mark_pos = 0, -1, 0
    script = list(scripts.get(path, ()))
    cp = 0

    def write(t, scan):
      nonlocal pos, count, mark_idx, mark_pos
      if scan and pr.forks:
        if t == pr.open:
          count, mark_idx, mark_pos = 0, len(seen), pos
        elif t == pr.count:
          count += 1
      uid = len(visible)
      visible[uid] = frozenset([u for _, _, u in seen] + [uid])
      seen.append((t, pos, uid))
      th.written.append((t, pos, uid))
      pos += 1

    for t in forced:
      write(t, scan_forced)
    pending_fork = bool(scan_forced and forced and forced[-1] == pr.fork and count >= 1 and
                        depth < max_depth and pr.forks)
    while True:
      n_kids = min(count, max_threads - created[0]) if pending_fork else 0
      if pending_fork and n_kids == 0:
        pending_fork = False  # no thread budget left: keep decoding sequentially
      if pending_fork:
        pending_fork = False
        count = n_kids
        created[0] += n_kids
        kids = []
        base = sum(len(g) for _, g in th.fork_groups)  # ranks are unique per parent
        th.fork_groups.append((len(th.written) - 1, [path + (base + i,) for i in range(count)]))
        for i in range(1, count + 1):
          cpath = path + (base + i - 1,)
          if pr.context == "shared":
            clabel = pr.label(label, i)
            cforced = list(pr.child_pre) + clabel + list(pr.child_post)
            kids.append(run(cpath, seen, cforced, pos, depth + 1, clabel, False))
          else:
            span, seg = [], 0
            for t, _, _ in seen[mark_idx + 1:]:
              if t == pr.count:
                seg += 1
              elif t != pr.fork and seg == i:
                span.append(t)
            kids.append(run(cpath, [], list(pr.child_pre) + span, 0, depth + 1, [], False))
        cp += max(k[2] for k in kids)
        if pr.join == "stitch":
          for added, _, _ in kids:
            seen.extend(added)
          pos = max(k[1] for k in kids)
          after = list(pr.after_join)
        elif pr.join == "flat":
          after = [e[0] for added, _, _ in kids for e in added] + list(pr.after_join)
        else:  # results
          del seen[mark_idx:]
          pos = mark_pos
          after = list(pr.results_open)
          for cpath in th.fork_groups[-1][1]:
            w = [e[0] for e in threads[cpath].written]
            tags = [j for j, t in enumerate(w) if t in pr.result_tags]
            if tags:
              after += [t for t in w[tags[-1]:] if t not in pr.child_stop]
            else:
              after += list(pr.no_result)
          after += list(pr.results_close) + list(pr.after_join)
        count = 0
        for t in after:
          write(t, False)
      if not script:
        th.stop_reason = "script_end"
        break
      th.contexts.append(list(seen))
      x = script.pop(0)
      th.samples.append(x)
      cp += 1
      write(x, True)
      is_child = len(path) > 0
      if (is_child and (x in pr.child_stop or x in eos)) or (not is_child and x in eos):
        th.stop_reason = "stop"
        break
      if len(th.samples) >= max_thread_tokens:
        if is_child:
          for t in pr.child_close:
            write(t, False)
        th.stop_reason = "budget" if is_child else "length"
        break
      if pr.forks and x == pr.fork and count >= 1 and depth < max_depth:
        pending_fork = True
    return seen[n0:], pos, cp

  _, _, cp = run((), [], list(prompt), 0, 0, [], True)
  return Trace(threads=threads, final_context=flat_trajectory(threads, pr),
               total_tokens=sum(len(t.samples) for t in threads.values()), critical_path=cp,
               visible=visible)


def flat_trajectory(threads: dict, pr: Protocol, path: tuple = ()) -> list:
  """A thread's written entries; for stitch joins with each fork's children
  inlined after the fork trigger (the flat trajectory in the protocol's own format)."""
  th = threads[path]
  groups = dict(th.fork_groups) if pr.join == "stitch" else {}
  out = []
  for i, tp in enumerate(th.written):
    out.append(tp)
    for k in groups.get(i, ()):
      out.extend(flat_trajectory(threads, pr, k))
  return out


