"""n samples per request: the prompt stored once per lane for the samples that share it, each
sample equal to a separate request with seed derive(seed, i), token for token."""
import numpy as np
import pytest

from apr_jax.engine.runner import Request, TreeEngine
from apr_jax.engine.sampling import SamplingConfig, derive
from apr_jax.engine.tree import TreeSpec
from apr_jax.errors import UserError
from tests import tree_fixtures as tf

MODEL = tf.tiny_model()


def engine(name, prefix_cache=16, **kw):
  args = dict(protocol=tf.PROTOCOLS[name], root_stop=(tf.EOS,), lanes=1, requests=4, rows=4,
              threads=32, slots=512, log=4096, chunk=8, sampling=SamplingConfig(temperature=1.0),
              script=64, script_rows=16)
  args.update(kw)
  return TreeEngine(MODEL, None, TreeSpec(**args), segment_steps=8, prefix_cache=prefix_cache)


def case(name, seed):
  """A prompt and a script that makes the root fork once; the rest is sampled freely."""
  rng = np.random.default_rng(seed)
  p, sc = tf.random_trajectory(name, rng, blocks=1)
  return p + tf.plain(rng, 12, 13), {(): sc[()][:sc[()].index(tf.FORK) + 1]}


def same(a, b):
  assert a.token_ids == b.token_ids and a.stop_reason == b.stop_reason
  assert [t["token_ids"] for t in a.threads] == [t["token_ids"] for t in b.threads]
  assert [t["forced"] for t in a.threads] == [t["forced"] for t in b.threads]
  lp = lambda r: [x for t in r.threads for x in t["logprobs"] if x is not None]
  np.testing.assert_allclose(lp(a), lp(b), atol=1e-4)


@pytest.mark.parametrize("name", ["multiverse", "apr_tok"])
def test_samples_equal_separate_requests_and_share_the_prompt(name):
  """Six samples in groups of four (the lane's request slots): each equals the request with
  seed derive(seed, i), forks included; the prompt is stored once per group (the roots'
  slots below the prompt's last position); a sample that outlives the one that stored the prompt
  still reads it (it passes to a surviving sample)."""
  prompt, script = case(name, 3)
  eng = engine(name)
  p = len(prompt)
  held = []

  def count(_):
    sl, th = eng.state.lanes.slots, eng.state.lanes.threads
    owner, parent = np.asarray(sl.owner[0]), np.asarray(th.parent[0])
    root = (owner >= 0) & (parent[np.clip(owner, 0, None)] < 0)  # roots' slots: the prompts
    held.append(int(np.sum(root & (np.asarray(sl.pos[0]) < p - 1))))
  kw = dict(max_thread_tokens=40, max_threads=8, script=script)
  res = eng.run([Request(prompt, n=6, seed=5, **kw)], on_segment=count)[0]
  shared_held = max(held)
  held.clear()
  eng = engine(name, prefix_cache=0)  # separate requests, each storing its own prompt
  sep = eng.run([Request(prompt, seed=derive(5, j), **kw) for j in range(6)], on_segment=count)
  assert len(res.samples) == 6 and res.token_ids == res.samples[0].token_ids
  for a, b in zip(res.samples, sep):
    same(a, b)
  assert all(s.forks == 1 for s in res.samples)
  assert len({tuple(s.token_ids) for s in res.samples}) == 6  # they differ after the script
  # at most two groups hold a copy at once; separate requests without the prefix cache hold four
  assert shared_held <= 2 * (p - 1) and max(held) == 4 * (p - 1)
  first = res.samples[:4]
  assert any(s.steps > first[0].steps for s in first[1:])  # outlived the prompt's first owner
  assert res.summary()["samples"][5]["token_ids"] == sep[5].token_ids


def test_samples_out_of_memory_restart_and_errors():
  """A pool too small for the group: a sample that runs out restarts alone with its whole
  prompt and still equals its separate request; n must be a positive integer."""
  prompt, script = case("multiverse", 4)
  kw = dict(max_thread_tokens=40, max_threads=8, script=script)
  big = engine("multiverse", requests=1, threads=8)
  sep = big.run([Request(prompt, seed=derive(9, j), **kw) for j in range(4)])
  high = max(r.kv_stored_bytes // big.bytes_per_token for r in sep)
  small = engine("multiverse", slots=high + 8)
  res = small.run([Request(prompt, n=4, seed=9, **kw)])[0]
  assert small.stats["restarts"] >= 1
  for a, b in zip(res.samples, sep):
    same(a, b)
  for bad in (0, -1, 1.5, True):
    with pytest.raises(UserError, match="n \\(samples"):
      small.run([Request(prompt, n=bad)])


def test_prefix_cache_across_requests():
  """Requests whose prompts start with the same 24 tokens (a system prompt) and differ after:
  admitted while another one runs, they read its stored prefix instead of storing their own,
  and give what they give with the prefix cache off (sampled, forks included)."""
  rng = np.random.default_rng(8)
  system = [tf.BOS] + tf.plain(rng, 23, 24)
  reqs = []
  for i in range(5):
    p, sc = tf.random_trajectory("multiverse", rng, blocks=1)
    script = {(): sc[()][:sc[()].index(tf.FORK) + 1]}
    reqs.append(Request(system + p[1:], seed=i, script=script, max_threads=8,
                        max_thread_tokens=60 if i in (0, 3) else 30))
  on = engine("multiverse", requests=2, threads=16)
  off = TreeEngine(MODEL, None, on.spec, segment_steps=8, prefix_cache=0)
  got, want = on.run(reqs), off.run(reqs)
  assert on.stats["prefix_tokens"] >= 2 * 24 and off.stats["prefix_tokens"] == 0
  for a, b in zip(got, want):
    same(a, b)
  assert sum(r.forks for r in got) == 5
  with pytest.raises(UserError, match="prefix_cache"):
    TreeEngine(MODEL, None, on.spec, prefix_cache=-1)
