"""Countdown traces in the original APR repository's formats (github:Parallel-Reasoning/APR,
`src/data/search.py`), written from its documented behaviour:

- "sos_original": SoS+, a best-first beam search. Each expanded node writes its
  `Current State`, generates every move (`+` and `*` in the order the pair was drawn, `-` and
  `/` larger first, `/` only when exact), keeps the `beam` best by `mult_heuristic` (distance
  to the target's factors), shuffles them and writes an `Exploring Operation` line per kept
  move and a `Generated Node` line per non-leaf child. With probability `promising` it "doubles
  down": each child is searched recursively (`Start Sub Search at level L: Moving to Node #id`
  ... `Exit Sub Search at level L`). A goal writes `T,T equal: Goal Reached` and the summary
  path from `Moving to Node #0`, ending in a second `Goal Reached`. The beam width is drawn
  per trace from 1..`max_beam` (5).
- "apr_original": the same search with `Moving to Node #0` on top; at the root level, with
  probability `promising` (0.9) and more than one child, it spawns one sub search per child
  (`<Calling Sub Searches>` / `<Start Sub Search i at level 1> Moving to Node #id` /
  `<End Calling Sub Searches>`, then EOS); each child searches from the prompt
  `Moving to Node #id\\nCurrent State: T:[...], Operations: [...]` with the sub-call beam
  (1..`max_sub_beam`, 10); the next root call replaces the spawn block with the results block
  (`<Sub Searches>`, `<Goal Reached in Sub Search i at level 1 at Node #id>` + the child's
  summary path, or `<No Solution in Sub Search i ...>`, `<End Sub Searches>`), and on a goal
  writes `T,T equal: Goal Reached` and the summary path from the root.

Numbers print as Python lists (`[22, 31, 27]`, in the order the search holds them, unsorted).
The random draws (beam widths, shuffles, doubling down) come from the `random.Random` passed
in, so a trace is reproducible from its seed (not equal to the original's own stream).
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import random

from apr_jax.tasks.countdown.problems import Problem, apply


def combine(a: int, b: int) -> list[tuple[int, str]]:
  """The moves from the pair (a, b) as the original writes them: `+` and `*` in the order
  drawn, `-` and `/` larger first."""
  lo, hi = min(a, b), max(a, b)
  out = []
  for op, x, y in (("+", a, b), ("*", a, b), ("-", hi, lo), ("/", hi, lo)):
    c = apply(x, op, y)
    if c is not None:
      out.append((c, f"{x}{op}{y}={c}"))
  return out


def mult_heuristic(nums, target: int) -> int:
  factors = [f for f in range(2, target + 1) if target % f == 0]
  return sum(min(abs(x - f) for f in factors) for x in nums)


@dataclasses.dataclass(eq=False)
class _Node:
  nums: list
  ops: list
  h: int
  parent: "_Node | None" = None
  idx: str = "0"

  def __lt__(self, other):  # heap order by heuristic only, as the original's nodes compare
    return self.h < other.h


def _state(target, node) -> str:
  return f"Current State: {target}:{node.nums}, Operations: {node.ops}\n"


def _children(node, target, beam, rng) -> list[_Node]:
  gen = []
  for i, j in itertools.combinations(range(len(node.nums)), 2):
    rest = [node.nums[k] for k in range(len(node.nums)) if k not in (i, j)]
    for res, op in combine(node.nums[i], node.nums[j]):
      nums = rest + [res]
      gen.append(_Node(nums, node.ops + [op], mult_heuristic(nums, target), node))
  gen.sort(key=lambda n: n.h)  # stable: ties keep generation order
  gen = gen[:beam]
  rng.shuffle(gen)
  return gen


def summary_path(goal: _Node, start: _Node, target: int) -> str:
  """The path from `start` to the goal node, as the original writes it after a goal."""
  chain = [goal]
  while chain[-1] is not start:
    chain.append(chain[-1].parent)
  chain.reverse()
  out = f"Moving to Node #{start.idx}\n"
  for node, nxt in zip(chain, chain[1:]):
    out += _state(target, node)
    out += f"Exploring Operation: {nxt.ops[-1]}, Resulting Numbers: {nxt.nums}\n"
    if len(nxt.nums) == 1 and nxt.nums[0] == target:
      return out + f"{target},{target} equal: Goal Reached\n"
    out += f"Generated Node #{nxt.idx}: {target}:{nxt.nums} Operation: {nxt.ops[-1]}\n"
    out += f"Moving to Node #{nxt.idx}\n"
  raise AssertionError("the chain does not end at the goal")


def _expand(node, target, beam, rng) -> tuple[str, _Node | None, list[_Node]]:
  """A node's moves: (their text, the goal node or None, the children to explore, sorted)."""
  text, explore = "", []
  for child in _children(node, target, beam, rng):
    child.idx = f"{node.idx},{len(explore)}"
    op = child.ops[-1]
    text += f"Exploring Operation: {op}, Resulting Numbers: {child.nums}\n"
    if len(child.nums) == 1 and child.nums[0] == target:
      return text + f"{target},{target} equal: Goal Reached\n", child, []
    if len(child.nums) == 1:
      text += f"{child.nums[0]},{target} unequal: No Solution\n"
    else:
      text += f"Generated Node #{child.idx}: {target}:{child.nums} Operation: {op}\n"
      explore.append(child)
  explore.sort(key=lambda n: n.h)
  return text, None, explore


def _sos(start, root, target, beam, promising, rng, level) -> tuple[str, _Node | None]:
  text = ""
  open_set = [(start.h, start)]
  while open_set:
    current = [heapq.heappop(open_set) for _ in range(min(beam, len(open_set)))]
    for k, (_, node) in enumerate(current):
      moves, goal, explore = _expand(node, target, beam, rng)
      text += _state(target, node) + moves
      if goal is not None:
        return text + summary_path(goal, root, target), goal
      double = rng.random() < promising
      for child in explore:
        if not double:
          heapq.heappush(open_set, (child.h, child))
          continue
        sub, found = _sos(child, root, target, beam, promising, rng, level + 1)
        text += (f"Start Sub Search at level {level + 1}: Moving to Node #{child.idx}\n" + sub +
                 f"Exit Sub Search at level {level + 1}\n")
        if found is not None:
          return text, found
        text += "No solution found in sub search\n"
      if k < len(current) - 1:
        text += f"Moving to Node #{current[k + 1][1].idx}\n"
    if open_set:
      text += f"Moving to Node #{open_set[0][1].idx}\n"
  return text + "No solution found.\n", None


def sos_prompt(p: Problem) -> str:
  """The original SoS+ evaluation prompt (numbers as drawn, no trailing newline)."""
  return f"Current State: {p.target}:{list(p.nums)}, Operations: []"


def solve_sos_original(p: Problem, rng: random.Random, beam: int | None = None, max_beam: int = 5,
                       promising: float = 0.5) -> tuple[str, str, bool]:
  """(prompt, completion, solved): an SoS+ trace as the original writes it; the beam width is
  drawn from 1..max_beam unless given."""
  beam = beam or rng.randint(1, max_beam)
  start = _Node(list(p.nums), [], mult_heuristic(p.nums, p.target))
  trace, goal = _sos(start, start, p.target, beam, promising, rng, 0)
  prompt = sos_prompt(p)
  assert trace.startswith(prompt)
  return prompt, trace[len(prompt):], goal is not None


@dataclasses.dataclass
class AprOriginalTrace:
  """An APR trace as the original's `trace_dict`: the root's calls (each its whole text,
  prompt included; call k+1 repeats call k up to its spawn block) and, per spawn, each
  child's whole text (its prompt first)."""
  prompt: str
  calls: list
  children: list          # children[k]: the texts of the sub searches spawned by call k
  child_prompts: list     # the same shape: each child's prompt
  solved: bool

  def sequences(self) -> list[tuple[str, str]]:
    """(context, whole text) of every call, as the original trains on them (each call one
    sequence, `add_all_calls`): the root's calls in order, then every child. A call's context
    is the text the model was given: the prompt, the text through the results block the
    engine wrote (`<End Sub Searches>\\n`), or the child's prompt."""
    out = []
    for k, call in enumerate(self.calls):
      end = call.rindex(RESULTS_END) + len(RESULTS_END) if k else len(self.prompt)
      out.append((call[:end], call))
    for texts, prompts in zip(self.children, self.child_prompts):
      out += list(zip(prompts, texts))
    return out


RESULTS_END = "<End Sub Searches>\n"


def apr_prompt(p: Problem) -> str:
  return f"Moving to Node #0\nCurrent State: {p.target}:{list(p.nums)}, Operations: []"


def child_prompt(node: _Node, target: int) -> str:
  nums = ", ".join(str(x) for x in node.nums)
  return f"Moving to Node #{node.idx}\nCurrent State: {target}:[{nums}], Operations: {node.ops}"


def _spawn(calls, explore, target, sub_beam, rng) -> tuple[list, list, _Node | None]:
  """Runs one sub search per child; rewrites the root's calls (spawn block, results block).
  Returns (child texts, child prompts, the goal node found or None)."""
  before = calls[-1]
  texts, prompts, goals = [], [], []
  for child in explore:
    text, goal = _sos(child, child, target, sub_beam, 0.0, rng, 1)
    texts.append(f"Moving to Node #{child.idx}\n" + text)
    prompts.append(child_prompt(child, target))
    goals.append(goal)
  calls[-1] = before + "<Calling Sub Searches>\n" + "".join(
      f"<Start Sub Search {i} at level 1> Moving to Node #{c.idx}\n" for i, c in enumerate(explore)
  ) + "<End Calling Sub Searches>\n"
  results = "<Sub Searches>\n"
  for i, (child, goal) in enumerate(zip(explore, goals)):
    if goal is None:
      results += f"<No Solution in Sub Search {i} at level 1 at Node #{child.idx}>\n"
    else:
      results += (f"<Goal Reached in Sub Search {i} at level 1 at Node #{child.idx}>\n" +
                  summary_path(goal, child, target))
  calls.append(before + results + RESULTS_END)
  return texts, prompts, next((g for g in goals if g is not None), None)


def solve_apr_original(p: Problem, rng: random.Random, beam: int | None = None,
                       sub_beam: int | None = None, max_beam: int = 6, max_sub_beam: int = 10,
                       promising: float = 0.9) -> AprOriginalTrace:
  """An APR trace as the original writes it (beam widths drawn unless given)."""
  beam = beam or rng.randint(1, max_beam)
  sub_beam = sub_beam or rng.randint(1, max_sub_beam)
  target = p.target
  start = _Node(list(p.nums), [], mult_heuristic(p.nums, target))
  calls, children, prompts = ["Moving to Node #0\n"], [], []
  open_set, solved = [(start.h, start)], False
  while open_set and not solved:
    current = [heapq.heappop(open_set) for _ in range(min(beam, len(open_set)))]
    for k, (_, node) in enumerate(current):
      moves, goal, explore = _expand(node, target, beam, rng)
      calls[-1] += _state(target, node) + moves
      if goal is not None:
        calls[-1] += summary_path(goal, start, target)
        solved = True
        break
      if len(explore) > 1 and rng.random() < promising:  # the root level spawns
        texts, cps, goal = _spawn(calls, explore, target, sub_beam, rng)
        children.append(texts)
        prompts.append(cps)
        if goal is not None:
          calls[-1] += f"{target},{target} equal: Goal Reached\n" + summary_path(goal, start, target)
          solved = True
          break
      else:
        for child in explore:
          heapq.heappush(open_set, (child.h, child))
      if k < len(current) - 1:
        calls[-1] += f"Moving to Node #{current[k + 1][1].idx}\n"
    else:
      if open_set:
        calls[-1] += f"Moving to Node #{open_set[0][1].idx}\n"
  if not solved:
    calls[-1] += "No solution found.\n"
  return AprOriginalTrace(apr_prompt(p), calls, children, prompts, solved)
