"""The Countdown verifier: replays every search line of a trace and its claimed solution."""
from __future__ import annotations

import re
from typing import Sequence

from apr_jax.tasks.countdown.problems import Problem, apply

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
  resulting numbers right. `+` and `*` may name either operand first (the original solver
  writes the pair in the order it drew it). Returns the remaining multiset or raises
  ValueError."""
  pool = list(avail)
  for x in (a, b):
    if x not in pool:
      raise ValueError(f"{x} is not available in {sorted(avail)}")
    pool.remove(x)
  if apply(a, op, b) != c:
    raise ValueError(f"{a}{op}{b}={c} is wrong")
  if rest is not None and sorted(pool + [c]) != sorted(rest):
    raise ValueError(f"resulting numbers {sorted(rest)} should be {sorted(pool + [c])}")
  return sorted(pool + [c])


def replay(p: Problem, ops: Sequence[str]) -> list[int]:
  """Applies `ops` ('53-22=31', ...) from the problem's numbers; returns the final numbers."""
  cur = sorted(p.nums)
  for o in ops:
    m = RE_OP.match(o.strip().strip("'"))
    if not m:
      raise ValueError(f"cannot parse operation {o!r}")
    cur = _check_op(cur, int(m[1]), m[2], int(m[3]), int(m[4]), None)
  return cur


def summary_path(text: str) -> str | None:
  """The original answer form: the text after the second-to-last `Goal Reached` (the summary
  path from `Moving to Node #0` that a solved original trace ends with), or None."""
  at = [m.start() for m in re.finditer("Goal Reached", text)]
  return text[at[-2] + len("Goal Reached"):].strip() if len(at) >= 2 else None


def _replay_summary(p: Problem, path: str) -> list[int]:
  """Replays a summary path's `Exploring Operation` lines from the problem's numbers (each
  line's resulting numbers checked) up to its `Goal Reached` line; the final numbers."""
  cur = sorted(p.nums)
  for line in path.splitlines():
    m = RE_EXPLORE.search(line)
    if m:
      cur = _check_op(cur, int(m[1]), m[2], int(m[3]), int(m[4]), _parse_nums(m[5]))
    if "Goal Reached" in line:
      return cur
  raise ValueError("the summary path does not reach a goal")


def answer(p: Problem, root: str) -> list[int]:
  """The final numbers of a trace's answer, in either form: the last `Solution:` line, else
  the original's summary path. Raises ValueError when there is none or it is wrong."""
  sols = [m[1] for m in (RE_SOLUTION.search(re.sub(r"<[^<>]*>", " ", l))
                         for l in root.splitlines()) if m]
  if sols:
    return replay(p, [o for o in sols[-1].split(",") if o.strip()])
  path = summary_path(root)
  if path is None:
    raise ValueError("no solution claimed")
  return _replay_summary(p, path)


def verify(p: Problem, text: str | Sequence[str], check_lines: bool = True) -> tuple[bool, str]:
  """(correct, why). `text` is one thread's trace, or a list of thread traces (the root's
  first; each thread's text must start with the state it searches from: for APR children,
  their spawn line). Every operation line is replayed (operands available as a multiset,
  arithmetic exact, resulting numbers right, node states consistent, goal claims true), and
  the root's answer, replayed from the problem's numbers, must end in [target]. The answer is
  the last `Solution:` line or, in the original traces (`tasks/countdown/original.py`), the
  summary path after the second-to-last `Goal Reached`. `+` and `*` may name either operand
  first. False goal claims, wrong arithmetic, and reused or invented numbers are rejected.

  check_lines=False checks the claimed solution only (a search that made a slip in a branch
  it abandoned still counts if its answer is right: the accuracy APR reports)."""
  texts = [text] if isinstance(text, str) else list(text)
  try:
    for t in texts if check_lines else ():
      _check_lines(p, t)
    final = answer(p, texts[0])
    if final != [p.target]:
      return False, f"the solution ends in {final}, not [{p.target}]"
    return True, "ok"
  except ValueError as e:
    return False, str(e)


def _check_lines(p: Problem, text: str):
  state = None  # the numbers of the node being expanded (from its Current State line)
  text = re.sub(r"<[^<>]*>", "\n", text)  # protocol tags are not part of the search
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
