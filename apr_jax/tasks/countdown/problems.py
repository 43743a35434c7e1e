"""Countdown problems: settings, the legal moves, solvability, deterministic disjoint splits.

Reach `target` from `nums` with +, *, larger-minus-smaller and exact division, each number
used exactly once. Settings: APR's (4 numbers in 1..99, target 10..100) and a small one that
trains on a CPU (3 numbers in 1..30).
"""
from __future__ import annotations

import dataclasses
import functools
import random
import sys
import time
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
  # "target_first": the target uniform in target_lo..target_hi, then numbers redrawn until
  # solvable (the original generator's draw); "joint": numbers and target redrawn together
  # (what the shipped small models were trained and tested on; it favours easy targets)
  draw: str = "joint"

  def __post_init__(self):
    if self.draw not in ("target_first", "joint"):
      raise UserError(f"draw must be target_first or joint, got {self.draw!r}")


SMALL = Setting()
APR = Setting(n_numbers=4, lo=1, hi=99, target_lo=10, target_hi=100, beam=6, draw="target_first")
SETTINGS = {"small": SMALL, "apr": APR}


@dataclasses.dataclass(frozen=True)
class Problem:
  nums: tuple
  target: int

  @property
  def key(self):
    return (tuple(sorted(self.nums)), self.target)


def apply(a: int, op: str, b: int) -> int | None:
  """a op b as written; None when the operation is not allowed (a difference below zero, a
  division that is not exact). `+` and `*` take their operands in either order."""
  if op == "+":
    return a + b
  if op == "*":
    return a * b
  if op == "-":
    return a - b if a >= b else None
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


PROGRESS_MIN = 10_000  # generating this many problems or more reports progress on stderr


def _draw_target(rng, setting):
  return rng.randint(setting.target_lo, setting.target_hi)


def generate(setting: Setting, n: int, seed: int, exclude=frozenset(),
             progress: bool | None = None) -> list[Problem]:
  """n distinct solvable problems drawn as `setting.draw` says, deterministic in `seed`. `progress`
  (default: when n >= PROGRESS_MIN) prints a line on stderr every ~10% of the way."""
  rng = random.Random(seed)
  out, seen = [], set(exclude)
  misses = 0
  report = n >= PROGRESS_MIN if progress is None else progress
  every, t0 = max(n // 10, 1), time.perf_counter()
  if report:
    print(f"generating {n:,} Countdown problems ({setting.n_numbers} numbers in {setting.lo}.."
          f"{setting.hi})...", file=sys.stderr, flush=True)
  target = None
  while len(out) < n:
    if setting.draw == "target_first" and target is None:
      target = _draw_target(rng, setting)
    nums = tuple(rng.randint(setting.lo, setting.hi) for _ in range(setting.n_numbers))
    if setting.draw == "joint":
      target = _draw_target(rng, setting)
    p = Problem(nums, target)
    if p.key in seen or not solvable(tuple(sorted(nums)), target):
      if p.key in seen:  # as the original: a problem already drawn draws a new target
        target = None
      misses += 1
      if misses > 200_000:  # the setting has (almost) no distinct solvable problems left
        raise UserError(f"could draw only {len(out)} of {n} distinct solvable problems for this "
                        f"setting (numbers {setting.lo}..{setting.hi}, targets {setting.target_lo}.."
                        f"{setting.target_hi}, {len(exclude)} excluded); ask for fewer")
      continue
    misses, target = 0, None
    seen.add(p.key)
    out.append(p)
    if report and (len(out) % every == 0 or len(out) == n):
      print(f"  problems {len(out):,}/{n:,} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
            flush=True)
  return out


def test_split(setting: Setting, n_test: int, seed: int = 0) -> list[Problem]:
  """The held-out half of `splits(setting, *, n_test, seed)` alone (it does not depend on the
  training split's size, so evaluation never generates the training problems)."""
  return generate(setting, n_test, seed * 1_000_003 + 1)


def splits(setting: Setting, n_train: int, n_test: int, seed: int = 0):
  """(train, test): disjoint (no problem with the same numbers and target in both)."""
  test = test_split(setting, n_test, seed)
  train = generate(setting, n_train, seed * 1_000_003 + 2, exclude=frozenset(p.key for p in test))
  return train, test
