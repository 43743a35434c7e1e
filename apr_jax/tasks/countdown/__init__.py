"""Countdown (APR's task, REFERENCE.md §2): problems, solvers that write trajectories, a verifier.

Reach `target` from `nums` with +, *, larger-minus-smaller and exact division, each number
used exactly once. Settings: APR's (4 numbers in 1..99, target 10..100) and a small one that
trains on a CPU (3 numbers in 1..30).

Trajectory formats (the text each thread writes; `apr_jax.protocols` defines the tags):
- "sos": sequential Stream-of-Search (APR's SoS+ lines), depth-first with a heuristic;
- "apr": the parent expands the root, spawns one sub search per child node
  (`<Sub Search> Moving to Node #0,1 Current State: ...` - the child's whole fresh prompt),
  the children search their subtrees and end with `<Goal Reached> Solution: ...` or
  `<No Solution>`; the parent reads the results block and writes the solution;
- "threadweaver" / "multiverse": the parent expands the root, writes one outline per child
  node, the threads (sharing the parent's context) search their subtrees.
"""
from __future__ import annotations

import dataclasses
import functools
import random
import re
from typing import Sequence

from apr_jax.errors import UserError

OPS = ("+", "-", "*", "/")


@dataclasses.dataclass(frozen=True)
class Setting:
  n_numbers: int = 3
  lo: int = 1
  hi: int = 30
  target_lo: int = 10
  target_hi: int = 100
  beam: int = 4          # children generated per node (the heuristic keeps the best)


SMALL = Setting()
APR = Setting(n_numbers=4, lo=1, hi=99, target_lo=10, target_hi=100, beam=6)
SETTINGS = {"small": SMALL, "apr": APR}


@dataclasses.dataclass(frozen=True)
class Problem:
  nums: tuple
  target: int

  @property
  def key(self):
    return (tuple(sorted(self.nums)), self.target)


def apply(a: int, op: str, b: int) -> int | None:
  """a op b with a >= b; None when the operation is not allowed."""
  if op == "+":
    return a + b
  if op == "*":
    return a * b
  if op == "-":
    return a - b
  if op == "/":
    return a // b if b and a % b == 0 else None
  raise ValueError(op)


def moves(nums: Sequence[int]):
  """Every (a, op, b, result, remaining numbers sorted) from a pair of `nums` (a >= b)."""
  out = []
  n = len(nums)
  for i in range(n):
    for j in range(i + 1, n):
      a, b = max(nums[i], nums[j]), min(nums[i], nums[j])
      rest = [nums[k] for k in range(n) if k not in (i, j)]
      for op in OPS:
        c = apply(a, op, b)
        if c is not None:
          out.append((a, op, b, c, tuple(sorted(rest + [c]))))
  return out


@functools.lru_cache(maxsize=200_000)
def solvable(nums: tuple, target: int) -> bool:
  if len(nums) == 1:
    return nums[0] == target
  return any(solvable(m[4], target) for m in moves(nums))


def generate(setting: Setting, n: int, seed: int, exclude=frozenset()) -> list[Problem]:
  """n solvable problems (redrawn until solvable), deterministic in `seed`."""
  rng = random.Random(seed)
  out, seen = [], set(exclude)
  misses = 0
  while len(out) < n:
    nums = tuple(rng.randint(setting.lo, setting.hi) for _ in range(setting.n_numbers))
    target = rng.randint(setting.target_lo, setting.target_hi)
    p = Problem(nums, target)
    if p.key in seen or not solvable(tuple(sorted(nums)), target):
      misses += 1
      if misses > 200_000:  # the setting has (almost) no distinct solvable problems left
        raise UserError(f"could draw only {len(out)} of {n} distinct solvable problems for this "
                        f"setting (numbers {setting.lo}..{setting.hi}, targets {setting.target_lo}.."
                        f"{setting.target_hi}, {len(exclude)} excluded); ask for fewer")
      continue
    misses = 0
    seen.add(p.key)
    out.append(p)
  return out


def splits(setting: Setting, n_train: int, n_test: int, seed: int = 0):
  """(train, test): disjoint (no problem with the same numbers and target in both)."""
  test = generate(setting, n_test, seed * 1_000_003 + 1)
  train = generate(setting, n_train, seed * 1_000_003 + 2, exclude=frozenset(p.key for p in test))
  return train, test


# ----------------------------------------------------------------------------- formatting
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
    if fmt == "apr":
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
  if fmt == "apr":
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


# ----------------------------------------------------------------------------- verifier
_NUMS = r"\[([0-9, ]*)\]"
RE_STATE = re.compile(r"Current State: (\d+):" + _NUMS + r", Operations: \[(.*)\]")
RE_EXPLORE = re.compile(r"Exploring Operation: (\d+)([-+*/])(\d+)=(\d+), Resulting Numbers: " + _NUMS)
RE_GEN = re.compile(r"Generated Node (#[0-9,]+): (\d+):" + _NUMS + r" Operation: (\d+)([-+*/])(\d+)=(\d+)")
RE_CHECK = re.compile(r"(\d+),(\d+) (equal: Goal Reached|unequal: No Solution)")
RE_SOLUTION = re.compile(r"Solution: (.+)")
RE_OP = re.compile(r"^(\d+)([-+*/])(\d+)=(\d+)$")


def _parse_nums(s):
  s = s.strip()
  return sorted(int(x) for x in s.split(",")) if s else []


def _check_op(avail, a, op, b, c, rest):
  """An operation line is right: operands available (as a multiset), arithmetic exact,
  resulting numbers right. Returns the remaining multiset or raises ValueError."""
  if a < b:
    raise ValueError(f"{a}{op}{b}: the larger number must come first")
  pool = list(avail)
  for x in (a, b):
    if x not in pool:
      raise ValueError(f"{x} is not available in {sorted(avail)}")
    pool.remove(x)
  if apply(a, op, b) != c:
    raise ValueError(f"{a}{op}{b}={c} is wrong")
  if sorted(pool + [c]) != sorted(rest):
    raise ValueError(f"resulting numbers {sorted(rest)} should be {sorted(pool + [c])}")
  return sorted(pool + [c])


def replay(p: Problem, ops: Sequence[str]) -> list[int]:
  """Applies `ops` ('53-22=31', ...) from the problem's numbers; returns the final numbers."""
  cur = sorted(p.nums)
  for o in ops:
    m = RE_OP.match(o.strip().strip("'"))
    if not m:
      raise ValueError(f"cannot parse operation {o!r}")
    a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
    pool = list(cur)
    for x in (a, b):
      if x not in pool:
        raise ValueError(f"{x} is not available in {cur}")
      pool.remove(x)
    if a < b or apply(a, op, b) != c:
      raise ValueError(f"{o} is wrong")
    cur = sorted(pool + [c])
  return cur


def verify(p: Problem, text: str | Sequence[str], check_lines: bool = True) -> tuple[bool, str]:
  """(correct, why). `text` is one thread's trace, or a list of thread traces (the root's
  first; each thread's text must start with the state it searches from: for APR children,
  their spawn line). Every operation line is replayed (operands available as a multiset,
  arithmetic exact, resulting numbers right, node states consistent, goal claims true), and
  the root's last `Solution:` line, replayed from the problem's numbers, must end in
  [target]. False goal claims, wrong arithmetic, and reused or invented numbers are rejected.

  check_lines=False checks the claimed solution only (a search that made a slip in a branch
  it abandoned still counts if its answer is right: the accuracy APR reports)."""
  texts = [text] if isinstance(text, str) else list(text)
  try:
    for t in texts if check_lines else ():
      _check_lines(p, t)
    sols = [m[1] for m in (RE_SOLUTION.search(re.sub(r"<[^<>]*>", " ", l))
                           for l in texts[0].splitlines()) if m]
    if not sols:
      return False, "no solution claimed"
    final = replay(p, [o for o in sols[-1].split(",") if o.strip()])
    if final != [p.target]:
      return False, f"the solution ends in {final}, not [{p.target}]"
    return True, "ok"
  except ValueError as e:
    return False, str(e)


def _check_lines(p: Problem, text: str):
  state = None  # the numbers of the node being expanded (from its Current State line)
  text = re.sub(r"<[^<>]*>", "\n", text)  # protocol tags are not part of the search
  if True:
    for line in text.splitlines():
      line = line.strip()
      if not line:
        continue
      m = RE_STATE.search(line)
      if m:
        if int(m[1]) != p.target:
          raise ValueError(f"wrong target in {line!r}")
        ops = [o.strip().strip("'") for o in m[3].split(",") if o.strip()]
        state = replay(p, ops)
        if state != _parse_nums(m[2]):
          raise ValueError(f"state {m[2]} does not follow from {ops}")
        continue
      m = RE_EXPLORE.search(line)
      if m:
        if state is None:
          raise ValueError("an operation before any Current State")
        _check_op(state, int(m[1]), m[2], int(m[3]), int(m[4]), _parse_nums(m[5]))
        continue
      m = RE_GEN.search(line)
      if m:
        if state is None:
          raise ValueError("a generated node before any Current State")
        if int(m[2]) != p.target:
          raise ValueError(f"wrong target in {line!r}")
        _check_op(state, int(m[4]), m[5], int(m[6]), int(m[7]), _parse_nums(m[3]))
        continue
      m = RE_CHECK.search(line)
      if m:
        if int(m[2]) != p.target:
          raise ValueError(f"compared with {m[2]}, not the target {p.target}")
        if (int(m[1]) == int(m[2])) != m[3].startswith("equal"):
          raise ValueError(f"false claim: {line!r}")
