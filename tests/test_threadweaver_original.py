"""ThreadWeaver's join as its original agent loop writes it (REFERENCE.md §5), on the toy
protocol: later threads follow the previous `</Thread>` without a newline; a thread that
ends at EOS or at a budget gets its close tag, the block is closed and the request ends.
Each case against the plain reference (`protocols.reference`) and the exact token stream."""
import pytest

from apr_jax.engine.runner import Request
from apr_jax.protocols import reference
from tests import tree_fixtures as tf
from tests.test_engine_budgets import engine
from tests.test_tree_engine import model

PR = tf.PROTOCOLS["threadweaver"]
D1, D2 = tf.DIGITS[1], tf.DIGITS[2]
ROOT = [tf.OPEN, tf.COUNT, 4, tf.COUNT, 5, tf.FORK]


def _run(scripts, **budgets):
  res = engine("threadweaver").run([Request([tf.BOS, 3], script=scripts, **budgets)])[0]
  trace = reference.simulate(PR, [tf.BOS, 3], scripts, eos_ids=(tf.EOS,), **budgets)
  tf.check_exact(model(), res, trace, 2)
  return res


def _after_fork(res):
  ids = res.token_ids
  return ids[ids.index(tf.FORK) + 1:]


def test_threads_join_adjacent():
  res = _run({(): ROOT + [7, tf.EOS], (0,): [9, tf.STOP], (1,): [10, tf.STOP]})
  assert _after_fork(res) == [tf.NL, tf.TAG_A, tf.NL, D1, tf.COLON, 9, tf.STOP,
                              tf.TAG_A, tf.NL, D2, tf.COLON, 10, tf.STOP,  # `</Thread><Thread>`
                              tf.NL, 7, tf.EOS]
  assert res.stop_reason == "stop"


def test_a_thread_ending_at_eos_closes_the_block_and_ends_the_request():
  """The EOS is not re-prefilled: the thread gets `\\n</Thread>`, the block `\\n</Parallel>`,
  and the root does not sample again (its script has more)."""
  res = _run({(): ROOT + [7, 8, tf.EOS], (0,): [9, tf.STOP], (1,): [10, tf.EOS]})
  assert _after_fork(res) == [tf.NL, tf.TAG_A, tf.NL, D1, tf.COLON, 9, tf.STOP,
                              tf.TAG_A, tf.NL, D2, tf.COLON, 10, tf.NL, tf.STOP, tf.NL, tf.CLOSE_B]
  assert res.stop_reason == "stop" and res.finish_reason == "stop"
  assert {t["path"]: t["stop_reason"] for t in res.threads}[()] == "stop"


@pytest.mark.parametrize("first", [True, False])
def test_a_thread_cut_by_its_budget_closes_the_block(first):
  """A thread at max_thread_tokens is closed by the engine, the block is closed and the
  request ends `length` (its output was cut)."""
  long, short = [9] * 8 + [tf.STOP], [10, tf.STOP]
  kids = {(0,): long, (1,): short} if first else {(0,): short, (1,): long}
  res = _run({(): ROOT + [7, tf.EOS], **kids}, max_thread_tokens=7)
  tail = _after_fork(res)
  assert tail[-2:] == [tf.NL, tf.CLOSE_B] and 7 not in tail
  assert tail.count(tf.STOP) == 2 and tail.count(tf.TAG_A) == 2
  assert res.stop_reason == "length" and res.finish_reason == "length"
  reasons = {t["path"]: t["stop_reason"] for t in res.threads}
  assert reasons[(0,) if first else (1,)] == "budget"
