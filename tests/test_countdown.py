"""Countdown: problems, splits, solvers in every format, and the verifier."""
import re

import pytest

from apr_jax.tasks import countdown as cd

FORMATS = ["sos", "apr_tok", "threadweaver", "multiverse"]


def test_splits_are_deterministic_disjoint_and_solvable():
  train, test = cd.splits(cd.SMALL, 300, 100, seed=3)
  assert (train, test) == cd.splits(cd.SMALL, 300, 100, seed=3)
  assert not {p.key for p in train} & {p.key for p in test}
  assert train != cd.splits(cd.SMALL, 300, 100, seed=4)[0]
  assert cd.test_split(cd.SMALL, 100, seed=3) == test  # the held-out split alone
  for p in train[:50] + test[:50]:
    assert len(p.nums) == 3 and all(1 <= x <= 30 for x in p.nums) and 10 <= p.target <= 100
    assert cd.solvable(tuple(sorted(p.nums)), p.target)
  apr = cd.generate(cd.APR, 20, seed=0)
  assert all(len(p.nums) == 4 and all(1 <= x <= 99 for x in p.nums) for p in apr)


def texts(p, fmt):
  if fmt == "sos":
    prompt, comp, solved = cd.solve_sos(p)
    return [prompt + comp], solved
  tr = cd.solve_parallel(p, fmt)
  return tr.texts(), tr.solved


@pytest.mark.parametrize("fmt", FORMATS)
def test_solver_traces_verify(fmt):
  train, _ = cd.splits(cd.SMALL, 60, 1, seed=0)
  n_solved = 0
  for p in train:
    t, solved = texts(p, fmt)
    ok, why = cd.verify(p, t)
    assert ok == solved, (p, why)
    n_solved += solved
  assert n_solved >= 30


def _mutate(texts, pattern, repl):
  """Applies the first match of `pattern` in any thread (the root first)."""
  for i, t in enumerate(texts):
    new, n = re.subn(pattern, repl, t, count=1)
    if n:
      return texts[:i] + [new] + texts[i + 1:]
  raise AssertionError(f"no {pattern!r} in the trace")


@pytest.mark.parametrize("fmt", FORMATS)
def test_verifier_rejects_bad_traces(fmt):
  train, _ = cd.splits(cd.SMALL, 80, 1, seed=1)
  p = next(q for q in train if texts(q, fmt)[1])
  good, _ = texts(p, fmt)
  assert cd.verify(p, good)[0]
  # wrong arithmetic in an explored operation
  bad = _mutate(good, r"Exploring Operation: (\d+)\+(\d+)=(\d+)",
                lambda m: f"Exploring Operation: {m[1]}+{m[2]}={int(m[3]) + 1}")
  assert not cd.verify(p, bad)[0]
  # a false goal claim
  bad = _mutate(good, r"(\d+),(\d+) unequal: No Solution", r"\1,\2 equal: Goal Reached")
  assert not cd.verify(p, bad)[0]
  # an invented number in the solution
  sol = re.search(r"Solution: (.+)", good[0])[1]
  first = cd.RE_OP.match(sol.split(",")[0].strip())
  invented = max(p.nums) + 7
  bad = [good[0].replace(f"Solution: {sol}", f"Solution: {invented}{first[2]}{first[3]}="
                         f"{cd.apply(invented, first[2], int(first[3]))}" + sol[len(first[0]):])] + good[1:]
  assert not cd.verify(p, bad)[0]
  # a reused number: the same operand twice
  a = sorted(p.nums)[-1]
  bad = [good[0].replace(f"Solution: {sol}", f"Solution: {a}+{a}={2 * a}")] + good[1:]
  assert not cd.verify(p, bad)[0]
  # a solution that does not reach the target
  ops = sol.split(",")
  assert not cd.verify(p, [good[0].replace(f"Solution: {sol}", "Solution: " + ",".join(ops[:-1]))] + good[1:])[0]


def test_generating_many_problems_reports_progress(capsys):
  cd.generate(cd.SMALL, 50, seed=0)
  assert capsys.readouterr().err == ""  # a small draw is silent
  cd.generate(cd.SMALL, 50, seed=0, progress=True)
  err = capsys.readouterr().err
  assert "generating 50 Countdown problems" in err and "problems 50/50" in err
  assert cd.PROGRESS_MIN <= 10_000
