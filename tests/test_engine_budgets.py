"""Budgets, cancellation, capacities and malformed joins of the fork/join engine, each
against the plain reference (`protocols.reference`, which implements every budget from its
definition) or a direct check: one named regression test per fixed defect."""
import dataclasses
import zlib

import numpy as np
import pytest

from apr_jax.engine.tree.requests import child_key
from apr_jax.engine.runner import Request
from apr_jax.engine.sampling import SamplingConfig, derive
from apr_jax.errors import UserError
from apr_jax.protocols import reference
from tests import tree_fixtures as tf
from tests.test_tree_engine import engine as _new_engine, model

_ENGINES = {}


def engine(name, **kw):
  """Engines of the same settings are compiled once for this module (their state is empty
  between runs)."""
  key = (name, repr(sorted(kw.items())))
  if key not in _ENGINES:
    _ENGINES[key] = _new_engine(name, **kw)
  return _ENGINES[key]

KID_END = {"multiverse": tf.STOP, "threadweaver": tf.STOP, "apr_tok": tf.EOS}
MV_GOAL = dataclasses.replace(tf.PROTOCOLS["multiverse"], goal=(tf.GOAL,))


def _balanced(ids):
  """Every child block opened in the flat trajectory (toy child_pre has TAG_A) is closed."""
  return ids.count(tf.TAG_A) == ids.count(tf.STOP)


@pytest.mark.parametrize("name", sorted(tf.PROTOCOLS))
def test_critical_path_budget_holds_after_join(name):
  """The children use up the critical path: the parent writes its join tokens and stops; it
  never samples past the limit (it used to inherit the children's count and sample again)."""
  root = [3, tf.OPEN, tf.COUNT, 4, tf.COUNT, 5, tf.FORK, 7, 8, tf.EOS]  # 7 samples to the fork
  scripts = {(): root, (0,): [9] * 10 + [KID_END[name]], (1,): [10] * 10 + [KID_END[name]]}
  res = engine(name).run([Request([tf.BOS, 3], script=scripts, max_critical_path=8)])[0]
  assert res.critical_path == 8 and res.forks == 1
  assert res.stop_reason == "length"
  trace = reference.simulate(tf.PROTOCOLS[name], [tf.BOS, 3], scripts, eos_ids=(tf.EOS,),
                             max_critical_path=8)
  tf.check_exact(model(), res, trace, 2)


def test_critical_path_budget_closes_a_nested_parent():
  """A child that forks and whose own children use up the critical path closes its block
  (the protocol's close tokens) after its join; the root then stops too."""
  scripts = {(): [3, tf.OPEN, tf.COUNT, tf.FORK, 5, tf.EOS],
             (0,): [6, tf.OPEN, tf.COUNT, tf.FORK, 7, 8, tf.STOP], (0, 0): [9] * 10 + [tf.STOP]}
  res = engine("multiverse").run([Request([tf.BOS, 3], script=scripts, max_critical_path=9)])[0]
  assert res.critical_path == 9 and _balanced(res.token_ids)
  reasons = {t["path"]: t["stop_reason"] for t in res.threads}
  assert reasons == {(): "length", (0,): "budget", (0, 0): "budget"}
  trace = reference.simulate(tf.PROTOCOLS["multiverse"], [tf.BOS, 3], scripts, eos_ids=(tf.EOS,),
                             max_critical_path=9)
  tf.check_exact(model(), res, trace, 2)


@pytest.mark.parametrize("name", ["multiverse", "apr_tok"])
def test_raced_children_are_left_out_of_the_join(name):
  """Race: the first child to write the goal cancels its running siblings, which are left
  out of the join (the parent never reads an unclosed block); the same as the reference."""
  pr = MV_GOAL if name == "multiverse" else tf.PROTOCOLS["apr_tok"]
  end = KID_END[name]
  scripts = {(): [3, tf.OPEN, tf.COUNT, 4, tf.COUNT, 5, tf.COUNT, 6, tf.FORK, 7, tf.EOS],
             (0,): [8, tf.GOAL, 9, end], (1,): [10] * 30 + [end], (2,): [11] * 30 + [end]}
  # a row per child and the prefixes in one step: the children sample in lockstep
  eng = engine(name, protocol=pr, rows=4, chunk=16, race=True, step_cost=None)
  res = eng.run([Request([tf.BOS, 3], script=scripts)])[0]
  reasons = {t["path"]: t["stop_reason"] for t in res.threads}
  assert reasons == {(): "stop", (0,): "stop", (1,): "cancelled", (2,): "cancelled"}
  if name == "multiverse":
    assert _balanced(res.token_ids) and res.token_ids.count(tf.TAG_A) == 1
  else:
    assert res.token_ids.count(tf.NOGOAL) == 0  # no results entry for a cancelled child
  trace = reference.simulate(pr, [tf.BOS, 3], scripts, eos_ids=(tf.EOS,), race=True)
  tf.check_exact(model(), res, trace, 2)


def test_race_cancels_waiting_subtrees_and_keeps_pending_stops():
  """A sibling waiting on its own children is cancelled with its whole subtree; a sibling
  whose stop token was sampled in the winner's step keeps its `stop` and its place."""
  scripts = {(): [3, tf.OPEN, tf.COUNT, tf.COUNT, tf.COUNT, tf.FORK, 7, tf.EOS],
             (0,): [8, 8, 8, tf.GOAL, 9, tf.STOP],
             (1,): [tf.OPEN, tf.COUNT, tf.FORK, 5, tf.STOP], (1, 0): [12] * 30 + [tf.STOP],
             (2,): [10, 10, 10, tf.STOP]}
  eng = engine("multiverse", protocol=MV_GOAL, rows=4, chunk=16, race=True, step_cost=None)
  res = eng.run([Request([tf.BOS, 3], script=scripts)])[0]
  reasons = {t["path"]: t["stop_reason"] for t in res.threads}
  assert reasons == {(): "stop", (0,): "stop", (1,): "cancelled", (1, 0): "cancelled",
                     (2,): "stop"}, reasons
  assert _balanced(res.token_ids) and res.token_ids.count(tf.TAG_A) == 2
  assert all(t["end_step"] <= res.threads[1]["end_step"] + 1 for t in res.threads
             if t["path"][:1] == (1,))  # the subtree did not run on after the race


def _sample_logprobs(trace):
  """{path: [log-prob of each sample]} from plain full forwards over the reference contexts
  (independent of the engine)."""
  out = {}
  for path, th in trace.threads.items():
    lps = []
    for ctx, x in zip(th.contexts, th.samples):
      lo = tf.reference_logits(model(), trace, ctx).astype(np.float64)
      lps.append(float(lo[x] - lo.max() - np.log(np.exp(lo - lo.max()).sum())))
    out[path] = lps
  return out


@pytest.mark.parametrize("name", ["multiverse", "threadweaver"])
def test_pruning_matches_the_reference(name):
  """Pruned children are left out of the join, and which child is pruned after how many
  samples is what the reference's definition gives from independently computed log-probs."""
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  pr = tf.PROTOCOLS[name]
  eng = engine(name, step_cost=None, rows=4, chunk=32, prune_margin=0.15, prune_min_tokens=3)
  seen = set()
  for _ in range(3):
    k = int(rng.integers(2, 4))
    scripts = {(): [3, tf.OPEN] + [tf.COUNT] * k + [tf.FORK, 7, tf.EOS]}
    for i in range(k):
      scripts[(i,)] = tf.plain(rng, 3, 10) + [tf.STOP]
    prompt = [tf.BOS, 3]
    logprobs = _sample_logprobs(reference.simulate(pr, prompt, scripts, eos_ids=(tf.EOS,)))
    trace = reference.simulate(pr, prompt, scripts, eos_ids=(tf.EOS,), prune_margin=0.15,
                               prune_min_tokens=3, logprobs=logprobs)
    res = eng.run([Request(prompt, script=scripts)])[0]
    got = {tuple(t["path"]): t["stop_reason"] for t in res.threads}
    assert got == {p: t.stop_reason for p, t in trace.threads.items()}
    assert _balanced(res.token_ids)
    tf.check_exact(model(), res, trace, 2)
    seen.update(got.values())
  assert {"pruned", "stop"} <= seen, seen


def test_second_fork_needs_a_new_opening_tag():
  """After a join the block is over: a fork trigger without a new opening tag does not fork
  (it used to spawn from the first block's lines); with one, the child reads its own line."""
  base = [3, tf.OPEN, tf.COUNT, 4, tf.FORK, 5]
  kids = {(0,): [8, tf.EOS], (1,): [9, tf.EOS]}
  pr = tf.PROTOCOLS["apr_tok"]
  eng = engine("apr_tok")
  for second, forks in (([tf.COUNT, 6, tf.FORK, 7, tf.EOS], 1),
                        ([tf.OPEN, tf.COUNT, 6, tf.FORK, 7, tf.EOS], 2)):
    scripts = {**kids, (): base + second}
    res = eng.run([Request([tf.BOS, 3], script=scripts)])[0]
    assert res.forks == forks and len(res.threads) == 1 + forks
    if forks == 2:
      assert res.threads[2]["token_ids"][:2] == [tf.BOS, 6]  # its own spawn line
    trace = reference.simulate(pr, [tf.BOS, 3], scripts, eos_ids=(tf.EOS,))
    tf.check_exact(model(), res, trace, 2)


def test_requests_without_a_seed_sample_differently_and_reproducibly():
  eng = engine("multiverse", sampling=SamplingConfig(temperature=1.0), record_logits=False,
               script=0, script_rows=0)
  reqs = [Request([tf.BOS, 3, 4], max_thread_tokens=12, max_threads=1) for _ in range(3)]
  a = eng.run(reqs)
  assert len({tuple(r.token_ids) for r in a}) == 3  # identical prompts, different samples
  assert [r.token_ids for r in eng.run(reqs)] == [r.token_ids for r in a]
  seeded = eng.run([Request([tf.BOS, 3, 4], max_thread_tokens=12, max_threads=1, seed=derive(0, 1))])
  assert seeded[0].token_ids == a[1].token_ids  # request i's default seed is derive(0, i)
  assert len({derive(s, i) for s in range(30) for i in range(30)}) == 900


def test_deep_nesting_keeps_scripts_and_streams_apart():
  """Thread identities no longer come from path codes that overflowed int32 past depth 5:
  a chain nested 7 deep is scripted (and matched) at every level."""
  pr = dataclasses.replace(tf.PROTOCOLS["multiverse"], max_depth=8)
  scripts = {}
  path = ()
  for _ in range(7):
    scripts[path] = [tf.OPEN, tf.COUNT, tf.FORK, 5, tf.STOP if path else tf.EOS]
    path = path + (0,)
  scripts[path] = [6, 7, tf.STOP]
  eng = engine("multiverse", protocol=pr, label=24, threads=16)
  res = eng.run([Request([tf.BOS, 3], script=scripts)])[0]
  assert max(t["depth"] for t in res.threads) == 7 and res.forks == 7
  trace = reference.simulate(pr, [tf.BOS, 3], scripts, eos_ids=(tf.EOS,))
  tf.check_exact(model(), res, trace, 2)
  keys = {}
  for p in [(0,) * 7, (0,) * 6 + (1,), (1,) + (0,) * 6]:
    k = np.asarray(child_key(np.asarray([0, 0], np.uint32), -1))
    for r in p:
      k = np.asarray(child_key(k, r))
    keys[p] = tuple(k.tolist())
  assert len(set(keys.values())) == 3


def test_admission_checks_every_capacity_and_the_context_limit():
  """A budget the engine cannot honour is one clear error, never a silent cap; no thread
  writes past the model's context: the request ends with `context`."""
  import types
  from apr_jax.engine.runner import TreeEngine
  eng = engine("multiverse", log=256, context=24, record_logits=False)
  prompt = [tf.BOS, 3, 4]
  with pytest.raises(UserError, match="token-log"):
    eng.run([Request(prompt, max_total_tokens=500, max_thread_tokens=40)])
  with pytest.raises(UserError, match="max_threads 40"):
    eng.run([Request(prompt, max_threads=40, max_thread_tokens=4)])
  with pytest.raises(UserError, match="context"):
    eng.run([Request([tf.BOS] + [3] * 30, max_thread_tokens=4)])
  deep = types.SimpleNamespace(spec=dataclasses.replace(
      eng.spec, protocol=dataclasses.replace(tf.PROTOCOLS["multiverse"], max_depth=8)))
  with pytest.raises(UserError, match="labels at depth 8"):
    TreeEngine._limits(deep, Request(prompt, max_thread_tokens=4))
  # within the capacities it runs; at the context it stops
  res = eng.run([Request(prompt, script={(): [5] * 40}, max_thread_tokens=40, max_threads=1)])[0]
  assert res.stop_reason == "context"
  assert max(p for t in res.threads for p in t["positions"]) < 24


def test_join_queue_overflow_is_out_of_memory():
  """A flat join whose re-prefill does not fit a thread's queue ends the request
  `out_of_memory` instead of re-prefilling a silently truncated block."""
  scripts = {(): [3, tf.OPEN, tf.COUNT, tf.COUNT, tf.FORK, 7, tf.EOS],
             (0,): [9] * 10 + [tf.STOP], (1,): [10] * 10 + [tf.STOP]}
  small = engine("threadweaver", queue=20, record_logits=False)
  assert small.run([Request([tf.BOS, 3], script=scripts)])[0].stop_reason == "out_of_memory"
  big = engine("threadweaver")
  assert big.run([Request([tf.BOS, 3], script=scripts)])[0].stop_reason == "stop"


def test_restarted_request_runs_alone_until_it_ends():
  """A request restarted after the shared pool ran out holds its lane alone: no other
  request joins it (it used to be joined again and restart over and over)."""
  rng = np.random.default_rng(11)
  cases = [tf.random_trajectory("multiverse", rng, blocks=b) for b in (2, 2, 1, 2, 2, 1)]
  reqs = [Request(p, script={(): s[()][:10]}, max_thread_tokens=16, seed=i)
          for i, (p, s) in enumerate(cases)]
  shared = engine("multiverse", record_logits=False, lanes=2, requests=3, rows=3, threads=48,
                  slots=64, step_cost=None)  # a schedule that depends only on the requests
  lanes_seen = []
  res = shared.run(reqs, on_segment=lambda seg: lanes_seen.append(seg["lanes"]))
  assert shared.stats["restarts"] >= 1
  alone_runs = 0
  for lanes in lanes_seen:
    for lane in lanes:
      if any(alone for _, alone in lane):
        assert len(lane) == 1, lane
        alone_runs += 1
  assert alone_runs >= 1
  assert shared.stats["restarts"] <= len(reqs)
  assert all(r.stop_reason in ("stop", "length") for r in res)


def test_log_bound_covers_what_requests_write():
  """The admission bound on token-log entries is an upper bound of what requests write."""
  rng = np.random.default_rng(5)
  for name in sorted(tf.PROTOCOLS):
    eng = engine(name)
    for b in (0, 1, 2):
      prompt, scripts = tf.random_trajectory(name, rng, blocks=b)
      r = Request(prompt, script=scripts, max_thread_tokens=30, max_threads=12)
      res = eng.run([r])[0]
      written = len(r.prompt) + sum(len(t["token_ids"]) for t in res.threads) - 0
      assert written <= eng.log_need(r), (name, written, eng.log_need(r))


def test_one_stop_reason_vocabulary_with_openai_finish_reasons():
  """Every reason either engine reports is a StopReason label with one OpenAI
  finish_reason; results carry it."""
  from apr_jax.engine.stop_reasons import REASONS, StopReason, finish_reason
  assert set(REASONS[1:]) == {r.label for r in StopReason if r is not StopReason.NONE}
  assert {finish_reason(x) for x in REASONS[1:]} <= {"stop", "length"}
  scripts = {(): [3, 4, 5, 6, tf.EOS]}
  for limit, want in ((None, "stop"), (3, "length")):
    res = engine("multiverse").run([Request([tf.BOS, 3], script=scripts, max_thread_tokens=limit)])[0]
    assert res.stop_reason == want and res.finish_reason == want
    assert res.summary()["finish_reason"] == want
  res = engine("multiverse").run([Request([tf.BOS, 3], script=scripts, max_total_tokens=2)])[0]
  assert res.stop_reason == "total_budget" and res.finish_reason == "length"

# ----------------------------------------------------------------------------- ThreadWeaver's join
# As its original agent loop writes it (REFERENCE.md §5): later threads follow the previous
# `</Thread>` without a newline; a thread that ends at EOS or at a budget gets its close tag,
# the block is closed and the request ends. Each case against the reference and the exact
# token stream.

TW = tf.PROTOCOLS["threadweaver"]
D1, D2 = tf.DIGITS[1], tf.DIGITS[2]
TW_ROOT = [tf.OPEN, tf.COUNT, 4, tf.COUNT, 5, tf.FORK]


def _tw_run(scripts, **budgets):
  res = engine("threadweaver").run([Request([tf.BOS, 3], script=scripts, **budgets)])[0]
  trace = reference.simulate(TW, [tf.BOS, 3], scripts, eos_ids=(tf.EOS,), **budgets)
  tf.check_exact(model(), res, trace, 2)
  return res


def _after_fork(res):
  ids = res.token_ids
  return ids[ids.index(tf.FORK) + 1:]


def test_threadweaver_threads_join_adjacent():
  res = _tw_run({(): TW_ROOT + [7, tf.EOS], (0,): [9, tf.STOP], (1,): [10, tf.STOP]})
  assert _after_fork(res) == [tf.NL, tf.TAG_A, tf.NL, D1, tf.COLON, 9, tf.STOP,
                              tf.TAG_A, tf.NL, D2, tf.COLON, 10, tf.STOP,  # `</Thread><Thread>`
                              tf.NL, 7, tf.EOS]
  assert res.stop_reason == "stop"


def test_threadweaver_thread_ending_at_eos_closes_the_block_and_ends_the_request():
  """The EOS is not re-prefilled: the thread gets `\\n</Thread>`, the block `\\n</Parallel>`,
  and the root does not sample again (its script has more)."""
  res = _tw_run({(): TW_ROOT + [7, 8, tf.EOS], (0,): [9, tf.STOP], (1,): [10, tf.EOS]})
  assert _after_fork(res) == [tf.NL, tf.TAG_A, tf.NL, D1, tf.COLON, 9, tf.STOP,
                              tf.TAG_A, tf.NL, D2, tf.COLON, 10, tf.NL, tf.STOP, tf.NL, tf.CLOSE_B]
  assert res.stop_reason == "stop" and res.finish_reason == "stop"
  assert {t["path"]: t["stop_reason"] for t in res.threads}[()] == "stop"


@pytest.mark.parametrize("first", [True, False])
def test_threadweaver_thread_cut_by_its_budget_closes_the_block(first):
  """A thread at max_thread_tokens is closed by the engine, the block is closed and the
  request ends `length` (its output was cut)."""
  long, short = [9] * 8 + [tf.STOP], [10, tf.STOP]
  kids = {(0,): long, (1,): short} if first else {(0,): short, (1,): long}
  res = _tw_run({(): TW_ROOT + [7, tf.EOS], **kids}, max_thread_tokens=7)
  tail = _after_fork(res)
  assert tail[-2:] == [tf.NL, tf.CLOSE_B] and 7 not in tail
  assert tail.count(tf.STOP) == 2 and tail.count(tf.TAG_A) == 2
  assert res.stop_reason == "length" and res.finish_reason == "length"
  reasons = {t["path"]: t["stop_reason"] for t in res.threads}
  assert reasons[(0,) if first else (1,)] == "budget"
