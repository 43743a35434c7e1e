"""Countdown solvers: the text each thread writes, in every trajectory format.

- "sos": sequential Stream-of-Search (APR's SoS+ lines), depth-first; a closeness heuristic
  keeps the best `beam` moves per node;
- "apr_tok": the parent expands the root, spawns one sub search per child node
  (`<Sub Search> Moving to Node #0,1 Current State: ...` - the child's whole fresh prompt),
  the children search their subtrees and end with `<Goal Reached> Solution: ...` or
  `<No Solution>`; the parent reads the results block and writes the solution;
- "threadweaver" / "multiverse": the parent expands the root, writes one outline per child
  node, the threads (sharing the parent's context) search their subtrees.

`apr_jax.protocols` defines the tags; docs/protocols.md describes the formats.
"""
from __future__ import annotations

import dataclasses

from apr_jax.tasks.countdown.problems import SMALL, Problem, Setting, moves

def fmt_nums(nums) -> str:
  return "[" + ", ".join(str(x) for x in nums) + "]"


def fmt_state(target, nums) -> str:
  return f"{target}:{fmt_nums(nums)}"


def fmt_op(a, op, b, c) -> str:
  return f"{a}{op}{b}={c}"


def fmt_ops(ops) -> str:
  return "[" + ", ".join(f"'{o}'" for o in ops) + "]"


def node_id(path) -> str:
  return "#" + ",".join(str(x) for x in (0,) + tuple(path))


def prompt_text(p: Problem) -> str:
  return f"Current State: {fmt_state(p.target, sorted(p.nums))}, Operations: []\n"


def _ranked(nums, target, beam):
  """Moves ordered by a small heuristic (a result close to the target first), best `beam`."""
  ms = moves(nums)
  if len(nums) == 2:  # the last operation: check each, exact hits first
    return sorted(ms, key=lambda m: (m[3] != target, abs(m[3] - target)))
  return sorted(ms, key=lambda m: min(abs(x - target) for x in m[4]))[:beam]


def _search(nums, ops, path, target, beam, lines):
  """Depth-first SoS from a node whose `Current State` line is already written. Returns the
  solution's operations or None."""
  if len(nums) == 2:
    for a, op, b, c, rest in _ranked(nums, target, beam):
      lines.append(f"Exploring Operation: {fmt_op(a, op, b, c)}, Resulting Numbers: {fmt_nums(rest)}")
      if c == target:
        lines.append(f"{c},{target} equal: Goal Reached")
        return ops + [fmt_op(a, op, b, c)]
      lines.append(f"{c},{target} unequal: No Solution")
    return None
  kids = _expand(nums, path, target, beam, lines)
  for kpath, krest, kop in kids:
    lines.append(f"Moving to Node {node_id(kpath)}")
    lines.append(f"Current State: {fmt_state(target, krest)}, Operations: {fmt_ops(ops + [kop])}")
    sol = _search(krest, ops + [kop], kpath, target, beam, lines)
    if sol is not None:
      return sol
  return None


def _expand(nums, path, target, beam, lines):
  kids = []
  for i, (a, op, b, c, rest) in enumerate(_ranked(nums, target, beam)):
    o = fmt_op(a, op, b, c)
    kpath = tuple(path) + (i,)
    lines.append(f"Exploring Operation: {o}, Resulting Numbers: {fmt_nums(rest)}")
    lines.append(f"Generated Node {node_id(kpath)}: {fmt_state(target, rest)} Operation: {o}")
    kids.append((kpath, rest, o))
  return kids


def solution_line(sol) -> str:
  return "Solution: " + ", ".join(sol) if sol else "No Solution Found"


def solve_sos(p: Problem, setting: Setting = SMALL) -> tuple[str, str, bool]:
  """(prompt, completion, solved): the sequential Stream-of-Search trace."""
  lines = []
  sol = _search(tuple(sorted(p.nums)), [], (), p.target, setting.beam, lines)
  lines.append(solution_line(sol))
  return prompt_text(p), "\n".join(lines) + "\n", sol is not None


@dataclasses.dataclass
class ParallelTrace:
  """A fork/join trajectory as the text each thread writes (its sampled text).

  `threads[path]` is thread `path`'s text; `()` the root, `(i,)` its i-th child. For APR the
  children's prompts are not here: the engine builds them from the spawn lines."""
  prompt: str
  threads: dict
  solved: bool
  fmt: str = ""
  spawn: dict = dataclasses.field(default_factory=dict)  # apr: child path -> its spawn line

  def texts(self) -> list[str]:
    """Each thread's text as it reads to the verifier: the root's first (prompt included),
    APR children after their spawn line."""
    out = [self.prompt + self.threads[()]]
    for path in sorted(p for p in self.threads if p):
      out.append(self.spawn.get(path, "") + self.threads[path])
    return out


def solve_parallel(p: Problem, fmt: str, setting: Setting = SMALL) -> ParallelTrace:
  """The root expands the start node, then one thread per child node searches its subtree."""
  nums = tuple(sorted(p.nums))
  head = []
  kids = _expand(nums, (), p.target, setting.beam, head)
  threads, results = {}, []
  for i, (kpath, krest, kop) in enumerate(kids):
    lines = []
    sol = _search(krest, [kop], kpath, p.target, setting.beam, lines)
    results.append(sol)
    body = "\n".join(lines)
    state = f"Current State: {fmt_state(p.target, krest)}, Operations: {fmt_ops([kop])}"
    if fmt == "apr_tok":
      end = f"<Goal Reached> {solution_line(sol)}\n" if sol else "<No Solution>\n"
      threads[(i,)] = body + "\n" + end
    elif fmt == "threadweaver":
      threads[(i,)] = f" Moving to Node {node_id(kpath)}\n{state}\n{body}\n" + \
          (f"{solution_line(sol)}\n" if sol else "No Solution\n") + "</Thread>"
    elif fmt == "multiverse":
      threads[(i,)] = f" Moving to Node {node_id(kpath)}\n{state}\n{body}\n" + \
          (f"{solution_line(sol)}\n" if sol else "No Solution\n") + "</Path>"
    else:
      raise ValueError(f"unknown format {fmt!r}")
  best = next((s for s in results if s), None)
  root = "\n".join(head) + "\n"
  lines = {}
  if fmt == "apr_tok":
    lines = {(i,): f" Moving to Node {node_id(kp)} Current State: {fmt_state(p.target, kr)}, "
                   f"Operations: {fmt_ops([ko])}\n" for i, (kp, kr, ko) in enumerate(kids)}
    spawn = "".join("<Sub Search>" + lines[(i,)] for i in range(len(kids)))
    threads[()] = root + "<Calling Sub Searches>\n" + spawn + "<End Calling Sub Searches>" + \
        solution_line(best) + "\n"
  elif fmt == "threadweaver":
    outl = "".join(f"<Outline>{i + 1}: Node {node_id(kp)}</Outline>\n" for i, (kp, _, _) in enumerate(kids))
    threads[()] = root + "<Parallel>\n<Outlines>\n" + outl + "</Outlines>" + "</Parallel>\n" + \
        solution_line(best) + "\n"
  else:
    outl = "".join(f"<Outline>{i + 1}: Node {node_id(kp)}</Outline>\n" for i, (kp, _, _) in enumerate(kids))
    threads[()] = root + "<Parallel>\n<Goal>\n" + outl + "</Goal>" + solution_line(best) + \
        "\n</Conclusion>\n</Parallel>\n"
  return ParallelTrace(prompt=prompt_text(p), threads=threads, solved=best is not None, fmt=fmt,
                       spawn=lines)
