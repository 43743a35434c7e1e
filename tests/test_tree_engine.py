"""The fork/join engine: exactness against the plain reference, one compiled program, batch
invariance, sharding, budgets and robustness (hypothesis fuzzing)."""
import re
import zlib

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from apr_jax.engine import tree
from apr_jax.engine.generate import Generator
from apr_jax.engine.runner import Request, TreeEngine
from apr_jax.engine.tree import TreeSpec
from apr_jax.protocols import reference
from tests import tree_fixtures as tf

MODEL = None


def model():
  global MODEL
  if MODEL is None:
    MODEL = tf.tiny_model()
  return MODEL


def engine(name, step_cost="auto", segment_steps=16, **kw):
  args = dict(protocol=tf.PROTOCOLS[name], root_stop=(tf.EOS,), lanes=2, rows=3, threads=16,
              slots=256, log=2048, chunk=8, script=64, script_rows=16, record_logits=True)
  args.update(kw)
  spec = TreeSpec(**args)
  if step_cost == "one_token":  # every step writes one token per lane: rows and queues wait
    step_cost = (1.0,) + (1e9,) * (len(tree.step_sizes(spec)) - 1)
  return TreeEngine(model(), None, spec, segment_steps=segment_steps, step_cost=step_cost)


# layouts: a lane per request; one lane whose rows, thread table, log and KV pool are
# shared by three requests at a time (entries are reused as requests come and go); a
# schedule of one-token steps (forced tokens and sibling rows wait for later steps); and the
# dense attention reference instead of tree attention (blocks of 16 slots elsewhere)
LAYOUTS = {"lanes": dict(block=16), "shared": dict(lanes=1, requests=3, rows=3, threads=48, slots=768),
           "one_token_steps": dict(step_cost="one_token", block=16), "dense": dict(attention="dense")}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", sorted(tf.PROTOCOLS))
def test_exact_against_reference(name, layout):
  """Teacher-forced random trajectories: every thread's logits at every sample equal a full
  forward over its visible context with the protocol's positions; same flat trajectory,
  total tokens and critical path. Fewer rows than threads, so threads also wait for rows."""
  _exact(name, LAYOUTS[layout], shared=layout == "shared")


def _exact(name, layout: dict, shared=False):
  rng = np.random.default_rng(zlib.crc32(name.encode()) % 1000)  # the same in every process
  eng = engine(name, **layout)
  cases = [tf.random_trajectory(name, rng, blocks=b) for b in (0, 1, 2, 2, 1)]
  step0 = int(eng.state.step)
  results = eng.run([Request(p, script=s) for p, s in cases])
  if shared:  # the requests really ran side by side on the shared rows
    assert int(eng.state.step) - step0 < sum(r.steps for r in results)
  forks = 0
  for (prompt, scripts), res in zip(cases, results):
    trace = reference.simulate(tf.PROTOCOLS[name], prompt, scripts, eos_ids=(tf.EOS,))
    tf.check_exact(model(), res, trace, len(prompt))
    assert res.stop_reason == "stop"
    forks += res.forks
  assert forks >= 3
  assert eng.compiled_loops() == 1
  return eng


def test_exact_with_the_pallas_page_kernel():
  """The engine with attention in the Pallas TPU kernel (interpret mode on CPU): the same
  exactness against the reference as every other layout, on stitched Multiverse blocks."""
  _exact("multiverse", dict(attention="pallas", block=16))


@pytest.mark.parametrize("name", ["threadweaver", "apr_tok"])
def test_exact_with_the_prefill_program(name):
  """Forced queues of 2+ tokens written by the prefill program (`tree.prefill`) between
  one-step segments: prompts, flat-join re-prefills (ThreadWeaver), fresh children's prompts
  and results blocks (APR). The same exactness against the reference."""
  layout = dict(prefill=16, prefill_min=2, block=16, segment_steps=1)
  eng = _exact(name, layout)
  assert eng.stats["prefill_calls"] >= 10 and eng.stats["prefill_tokens"] >= 60


@pytest.mark.parametrize("name", sorted(tf.OUTLINE_PROTOCOLS))
def test_outline_numbers_label_threads(name):
  """Protocols that read the model's outline numbers (as the originals do): one child per
  distinct number the originals' regex finds in the block's decoded text, labelled by it;
  duplicates, unnumbered and malformed outlines make no thread; headers split across
  merged, spaced or newline tokens are read. The engine's per-token automaton equals the
  regex reference, logits included; a prompt that writes the outlines forks at once."""
  pr = tf.OUTLINE_PROTOCOLS[name]
  rng = np.random.default_rng(11)
  cases = []
  while len(cases) < 5:
    p, s = tf.random_outline_trajectory(name, rng)
    if len(s) <= 16:
      cases.append((p, s))
  # the prompt opens the block: "2" twice, an unnumbered one, then "1.1" -> threads 2, 1.1
  head = [tf.OPEN, tf.COUNT, tf.DIGITS[2], tf.COLON, 5, tf.COUNT, 3, tf.DIGITS[2], tf.COLON,
          tf.COUNT, 6, tf.COLON, tf.COUNT, tf.DIGITS[1], tf.SEP, 62, 7, tf.FORK]
  cases.append(([tf.BOS, 8] + head, {(0,): [9, tf.STOP], (1,): [10, 11, tf.STOP], (): [12, tf.EOS]}))
  eng = engine(name, protocol=pr)
  results = eng.run([Request(p, script=s) for p, s in cases])
  for (prompt, scripts), res in zip(cases, results):
    trace = reference.simulate(pr, prompt, scripts, eos_ids=(tf.EOS,), text=tf.TEXT_FNS)
    tf.check_exact(model(), res, trace, len(prompt))
    assert res.stop_reason == "stop" and len(res.threads) == len(scripts)
  kids = [t["token_ids"][:6] for t in results[-1].threads[1:]]
  assert kids[0][3:5] == [tf.DIGITS[2], tf.COLON]
  assert kids[1][3:6] == [tf.DIGITS[1], tf.SEP, tf.DIGITS[1]]
  assert sum(r.forks for r in results) >= 8
  assert eng.compiled_loops() == 1


def test_step_costs_fit():
  """The measured step-cost model: recovers per-variant costs from segment counts and wall
  times (with a per-segment overhead and noise), fills unseen variants, rejects bad input."""
  from apr_jax.engine.runner import StepCosts
  from apr_jax.errors import UserError
  rng = np.random.default_rng(0)
  true = np.array([2.0, 6.0, 9.0, 16.0])
  sc = StepCosts((1, 8, 16, 32), "auto")
  assert not np.any(np.asarray(sc.cost()))  # nothing measured: cover the busiest lane
  for _ in range(40):
    counts = rng.integers(0, 30, 4) * (rng.random(4) < 0.7)
    sc.observe(counts, float(counts @ true) * 1e-3 + 0.004 + rng.normal(0, 1e-4))
  np.testing.assert_allclose(np.asarray(sc.cost()), true / true[0], rtol=0.1)
  part = StepCosts((1, 8, 32), "auto")  # the 32-token variant never ran: proportional beyond 8
  for _ in range(10):
    counts = np.array([rng.integers(1, 30), rng.integers(1, 30), 0])
    part.observe(counts, float(counts @ np.array([1.0, 4.0, 0.0])) * 1e-3)
  np.testing.assert_allclose(np.asarray(part.cost()), [1.0, 4.0, 16.0], rtol=1e-3)
  fixed = StepCosts((1, 8), (1.0, 2.0))
  fixed.observe(np.array([5, 5]), 1.0)
  np.testing.assert_allclose(np.asarray(fixed.cost()), [1.0, 2.0])
  equal = StepCosts((1, 8), "auto")  # segments of equal length: no overhead term to fit
  for k in range(12):
    counts = np.array([k, 12 - k])
    equal.observe(counts, float(counts @ np.array([1.0, 3.0])) * 1e-3)
  np.testing.assert_allclose(np.asarray(equal.cost()), [1.0, 3.0], rtol=1e-3)
  off = StepCosts((1, 8))  # the default: never fitted
  off.observe(np.array([3, 4]), 1.0)
  assert not np.any(np.asarray(off.cost()))
  for bad in ((1.0,), (1.0, 0.0), "fast"):
    with pytest.raises(UserError):
      StepCosts((1, 8), bad)


def test_prompt_forced_fork_and_one_thread_equals_sequential():
  """A prompt that ends with the fork trigger forks at once; a one-thread fork (shared
  context) decodes exactly what sequential decoding of the same tokens gives."""
  pr = tf.PROTOCOLS["multiverse"]
  prompt = [tf.BOS, 5, 6, 7, tf.OPEN, tf.COUNT, 9, 10, tf.FORK]
  eng = engine("multiverse", script=0, script_rows=0, record_logits=False)
  res = eng.run([Request(prompt, max_thread_tokens=12)])[0]
  child = next(t for t in res.threads if t["path"] == (0,))
  assert res.forks == 1 and child["tokens"] >= 1
  # the child's context is the prompt plus its forced prefix at the next positions
  prefix = list(pr.child_pre) + pr.label([], 1) + list(pr.child_post)
  assert child["token_ids"][:len(prefix)] == prefix
  gen = Generator(model(), None)
  toks, n, _ = gen.generate_ids([prompt + prefix], max_new_tokens=child["tokens"],
                                stop_ids=list(pr.child_stop) + [tf.EOS])
  assert child["token_ids"][len(prefix):len(prefix) + child["tokens"]] == toks[0, :n[0]].tolist()


def test_one_program_no_callbacks_batch_invariance():
  """Requests that fork zero, one and several times (nested) run in one compiled loop with
  no host callbacks; each request's greedy output is the same alone and batched, and more
  requests than lanes wait for a free lane (continuous batching)."""
  rng = np.random.default_rng(7)
  cases = [tf.random_trajectory("multiverse", rng, blocks=b) for b in (0, 1, 2, 2)]
  # script only the root's first tokens, so the rest is free greedy decoding
  reqs = [Request(p, script={(): s[()][:12]}, max_thread_tokens=20, seed=i)
          for i, (p, s) in enumerate(cases)]
  eng = engine("multiverse", record_logits=False)
  batched = eng.run(reqs)
  alone = [eng.run([r])[0] for r in reqs]
  shared = engine("multiverse", record_logits=False, **LAYOUTS["shared"])
  in_shared = shared.run(reqs)
  for a, b, c in zip(alone, batched, in_shared):
    assert a.token_ids == b.token_ids == c.token_ids
    assert [t["token_ids"] for t in a.threads] == [t["token_ids"] for t in b.threads] == \
        [t["token_ids"] for t in c.threads]
  assert sum(r.forks for r in batched) >= 2
  assert eng.compiled_loops() == 1 and shared.compiled_loops() == 1
  hlo = eng.loop_hlo()
  targets = set(re.findall(r'custom_call_target="([^"]+)"', hlo))
  assert not [t for t in targets if "callback" in t.lower()], targets
  assert not re.search(r"\b(outfeed|send|recv)\(", hlo)


def test_sharded_engine_matches_one_device():
  """Lanes over the data axis, KV heads over the model axis: same results as one device."""
  from apr_jax.model.sharding import make_mesh, ShardingRules
  from apr_jax.checkpoint.build import shard_model
  rng = np.random.default_rng(3)
  cases = [tf.random_trajectory("threadweaver", rng, blocks=1) for _ in range(2)]
  reqs = [Request(p, script=s) for p, s in cases]
  one = engine("threadweaver").run(reqs)
  mesh = make_mesh(2, 2)
  sharded_model = shard_model(model(), mesh, ShardingRules())
  spec = TreeSpec(protocol=tf.PROTOCOLS["threadweaver"], root_stop=(tf.EOS,), lanes=2, rows=3,
                  threads=16, slots=256, chunk=8, script=64, script_rows=16, record_logits=True)
  eng = TreeEngine(sharded_model, None, spec, mesh=mesh)
  assert eng.state.cache[0].k.sharding.spec[:2] == ("data", "model")
  two = eng.run(reqs)
  for a, b in zip(one, two):
    assert a.token_ids == b.token_ids
    for p in a.logits:
      np.testing.assert_allclose(a.logits[p], b.logits[p], atol=1e-4)


def test_shared_lane_sampling_budgets_and_memory():
  """Requests sharing one lane: sampled (temperature 1) outputs and per-request budgets are
  the same as alone; when the shared KV pool runs out, the request that hit it restarts alone
  and still produces its own output (never `out_of_memory` while it fits alone)."""
  from apr_jax.engine.sampling import SamplingConfig
  samp = SamplingConfig(temperature=1.0)
  rng = np.random.default_rng(11)
  cases = [tf.random_trajectory("multiverse", rng, blocks=b) for b in (2, 2, 1, 2)]
  reqs = [Request(p, script={(): s[()][:10]}, max_thread_tokens=16, seed=i,
                  max_total_tokens=6 if i == 1 else None) for i, (p, s) in enumerate(cases)]
  big = engine("multiverse", record_logits=False, sampling=samp, lanes=1, requests=1, rows=3,
               threads=16, slots=512)
  alone = [big.run([r])[0] for r in reqs]
  assert alone[1].stop_reason == "total_budget" and alone[1].total_tokens <= 6
  assert sum(r.forks for r in alone) >= 2
  high = [r.kv_stored_bytes // big.bytes_per_token for r in alone]
  slots = max(high) + 8
  assert sum(high) > slots  # the four cannot all be stored at once
  shared = engine("multiverse", record_logits=False, sampling=samp, lanes=1, requests=4, rows=3,
                  threads=64, slots=slots)
  got = shared.run(reqs)
  assert shared.stats["restarts"] >= 1
  for a, b in zip(alone, got):
    assert a.stop_reason == b.stop_reason and a.token_ids == b.token_ids
    assert [t["token_ids"] for t in a.threads] == [t["token_ids"] for t in b.threads]


def test_budgets_race_deadline():
  pr = tf.PROTOCOLS["apr_tok"]
  rng = np.random.default_rng(5)
  prompt, scripts = tf.random_trajectory("apr_tok", rng, blocks=1, max_kids=3)
  eng = engine("apr_tok", script=64)
  # thread budget: only 2 threads in total -> the fork gets one child
  res = eng.run([Request(prompt, script=scripts, max_threads=2)])[0]
  assert len(res.threads) == 2 and res.forks == 1
  trace = reference.simulate(pr, prompt, scripts, eos_ids=(tf.EOS,), max_threads=2)
  tf.check_exact(model(), res, trace, len(prompt))
  # total-token budget
  res = eng.run([Request(prompt, script=scripts, max_total_tokens=7)])[0]
  assert res.total_tokens <= 7 and res.stop_reason == "total_budget"
  # critical-path budget
  res = eng.run([Request(prompt, script=scripts, max_critical_path=5)])[0]
  assert res.critical_path <= 5
  # deadline: checked between segments
  res = eng.run([Request(prompt, deadline_s=0.0, max_thread_tokens=200, max_threads=1)])[0]
  assert res.stop_reason == "deadline"
  # race: the first child that writes the goal tag cancels its unfinished siblings
  scripts = {(): [3, tf.OPEN, tf.COUNT, 4, tf.COUNT, 5, tf.COUNT, 6, tf.FORK, 7, tf.EOS],
             (0,): [8, tf.GOAL, 9, tf.EOS], (1,): [10] * 30 + [tf.EOS], (2,): [11] * 30 + [tf.EOS]}
  race = engine("apr_tok", rows=4, race=True)
  res = race.run([Request([tf.BOS, 3], script=scripts)])[0]
  reasons = {t["path"]: t["stop_reason"] for t in res.threads}
  assert reasons[(0,)] == "stop" and reasons[(1,)] == "cancelled" and reasons[(2,)] == "cancelled"
  assert res.stop_reason == "stop"


def test_prune_trailing_siblings():
  """With a tiny margin, every child whose mean log-prob trails its best sibling's is
  cancelled once both have sampled prune_min_tokens; the best one runs to its stop."""
  scripts = {(): [3, tf.OPEN, tf.COUNT, tf.COUNT, tf.COUNT, tf.FORK, 7, tf.EOS]}
  for i in range(3):
    scripts[(i,)] = [int(x) for x in np.random.default_rng(i).integers(3, 40, 12)] + [tf.STOP]
  eng = engine("multiverse", rows=4, prune_margin=1e-6, prune_min_tokens=4, record_logits=False)
  res = eng.run([Request([tf.BOS, 3], script=scripts)])[0]
  reasons = sorted(t["stop_reason"] for t in res.threads if t["parent"] == 0)
  assert reasons == ["pruned", "pruned", "stop"], reasons
  assert all(t["tokens"] >= 4 for t in res.threads if t["stop_reason"] == "pruned")
  assert res.stop_reason == "stop"


SPECIAL = [tf.OPEN, tf.COUNT, tf.FORK, tf.STOP, tf.EOS, tf.GOAL, tf.NOGOAL]


@st.composite
def token_streams(draw):
  def stream(n, end):
    body = draw(st.lists(st.one_of(st.sampled_from(SPECIAL), st.integers(3, 39)), min_size=0,
                         max_size=n))
    return body + ([end] if draw(st.booleans()) or draw(st.booleans()) else [])
  paths = [(), (0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (2, 2), (3,)]
  return {p: stream(22, tf.EOS if not p else draw(st.sampled_from([tf.STOP, tf.EOS]))) for p in paths}


FUZZ = {"examples": 0, "exact": 0}


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(name=st.sampled_from(sorted(tf.PROTOCOLS)), scripts=token_streams(),
       max_threads=st.integers(1, 6), max_depth=st.integers(0, 3), thread_tokens=st.integers(1, 20),
       total=st.integers(1, 60), critical=st.sampled_from([None, 6, 12, 30]),
       slots=st.sampled_from([48, 256]))
def _fuzz_state_machine(name, scripts, max_threads, max_depth, thread_tokens, total, critical, slots):
  key = (name, slots)
  if key not in FUZZ:
    FUZZ[key] = engine(name, lanes=1, requests=2, rows=2, threads=16, slots=slots, script=24,
                       script_rows=16)
  eng = FUZZ[key]
  prompt = [tf.BOS, 3, 4]
  req = Request(prompt, script=scripts, max_threads=max_threads, max_depth=max_depth,
                max_thread_tokens=thread_tokens, max_total_tokens=total, max_critical_path=critical)
  # a neighbour in the same lane (shared rows, table and KV) with other limits
  other = Request([tf.BOS, 5], script=scripts, max_threads=8, max_thread_tokens=24)
  res, res2 = eng.run([req, other])
  FUZZ["examples"] += 1
  assert len(res2.threads) <= 8 and res2.stop_reason in ("stop", "length", "out_of_memory")
  # the request is over and released: nothing of it is left in the lane
  lane = jax.tree.map(lambda v: np.asarray(v[0]), eng.state.lanes)
  assert (lane.rows.thread == -1).all() and (lane.threads.req == -1).all()
  assert (lane.threads.state == tree.ThreadState.FREE).all() and (lane.slots.owner == -1).all()
  assert int(lane.log.n) == 0 and not lane.requests.active.any()
  created = len(res.threads)
  assert all(t["stop_reason"] != "running" for t in res.threads)
  assert created <= max_threads and res.total_tokens <= total
  assert all(t["tokens"] <= thread_tokens for t in res.threads)
  assert all(t["depth"] <= max_depth for t in res.threads)
  assert critical is None or res.critical_path <= critical
  assert res.stop_reason in ("stop", "length", "total_budget", "out_of_memory")
  # every child block joined into the final text is closed: it opens with the protocol's
  # prefix and ends with its stop token (sampled, or forced at its budget)
  if tf.PROTOCOLS[name].context == "shared" and res.stop_reason in ("stop", "length"):
    for t in res.threads[1:]:
      if t["stop_reason"] not in ("cancelled", "pruned"):
        assert t["token_ids"][:2] == [tf.NL, tf.TAG_A] and t["token_ids"][-1] in (tf.STOP, tf.EOS), t
  if res.stop_reason in ("stop", "length"):
    trace = reference.simulate(tf.PROTOCOLS[name], prompt, scripts, eos_ids=(tf.EOS,),
                               max_depth=max_depth, max_threads=max_threads,
                               max_thread_tokens=thread_tokens, max_total_tokens=total,
                               max_critical_path=critical)
    if created < max_threads and all(t.stop_reason != "script_end" for t in trace.threads.values()):
      tf.check_exact(model(), res, trace, len(prompt))
      FUZZ["exact"] += 1


def test_fuzz_state_machine():
  """Random token streams (unclosed threads, too many threads for the rows, nesting too
  deep, forks at the end of a budget, a cache that runs out): no crash, every budget holds,
  no row, slot, table or log entry leaks, every opened block is closed, and - whenever no
  thread ran past its script and no fork competed for the last threads - exact logits
  against the reference, which implements every budget."""
  FUZZ.update(examples=0, exact=0)
  _fuzz_state_machine()
  assert FUZZ["examples"] >= 20
  assert FUZZ["exact"] * 3 >= FUZZ["examples"], FUZZ
