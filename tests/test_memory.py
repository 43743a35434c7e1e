"""The engine's memory estimate against what it allocates, a pool that cannot fit refused
at start-up, and slots="auto" (the most that fit, at most what the budgets can use)."""
import jax
import numpy as np
import pytest

from tests import tree_fixtures as tf
from apr_jax import checkpoint
from apr_jax.cache import memory
from apr_jax.engine import runner, tree
from apr_jax.engine.tree import TreeSpec
from apr_jax.errors import UserError
from apr_jax.evaluation import countdown as ev
from apr_jax.shipped import resolve

MiB = 1024 ** 2


def _nbytes(tree_):
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree_))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_estimate_counts_what_the_engine_allocates(dtype):
  model = tf.tiny_model()
  cfg = model.cfg
  spec = TreeSpec(protocol=tf.PROTOCOLS["apr_tok"], lanes=3, requests=2, rows=4, threads=10, slots=320)
  need = memory.need(spec, cfg, dtype)
  st = jax.eval_shape(lambda: tree.init(spec, cfg, dtype))
  assert need.kv == _nbytes(st.cache)
  assert need.tables == _nbytes(st.lanes)
  # lanes split over the data axis, KV heads over the model axis
  split = memory.need(spec, cfg, dtype, data=3, model=2)
  assert split.kv * 6 == need.kv and split.tables * 3 == need.tables
  assert 0 < split.activations < need.activations


def test_a_pool_that_cannot_fit_is_an_error_before_anything_is_allocated(monkeypatch):
  model = tf.tiny_model()
  monkeypatch.setattr(memory, "free_bytes", lambda devices: 64 * MiB)
  built = []
  monkeypatch.setattr(runner.TreeEngine, "_build", lambda self: built.append(1))
  spec = TreeSpec(protocol=tf.PROTOCOLS["apr_tok"], lanes=2, rows=4, threads=8, slots=1 << 20)
  with pytest.raises(UserError, match=r"does not fit in device memory.*KV pool .*2 lane\(s\) x 1048576 slots"):
    runner.TreeEngine(model, None, spec)
  assert not built
  small = runner.TreeEngine(model, None, TreeSpec(protocol=tf.PROTOCOLS["apr_tok"], lanes=2, rows=4,
                                                  threads=8, slots=1024))
  assert built and small.memory.total < 64 * MiB


def test_auto_slots_is_the_most_that_fit(monkeypatch):
  cfg = tf.tiny_model().cfg
  make = lambda n: TreeSpec(protocol=tf.PROTOCOLS["apr_tok"], lanes=4, rows=4, threads=8, slots=n)
  free = 96 * MiB
  n = memory.auto_slots(make, cfg, "float32", None, cap=10 ** 7, free=free)
  fits = lambda k: memory.need(make(k), cfg, "float32").total <= (1 - memory.MARGIN) * free
  assert n % 64 == 0 and fits(n) and not fits(n + 64)
  # a large device gets no more than the budgets can use (rounded up to a block)
  assert memory.auto_slots(make, cfg, "float32", None, cap=1000, free=1 << 40) == 1024
  with pytest.raises(UserError, match="not even 64 KV slots"):
    memory.auto_slots(make, cfg, "float32", None, cap=1000, free=64 * 1024)
  # a platform that does not tell its free memory: the cap
  monkeypatch.setattr(memory, "free_bytes", lambda devices: None)
  assert memory.auto_slots(make, cfg, "float32", None, cap=100) == 128


def test_make_engine_slots_auto(monkeypatch):
  model, tok = checkpoint.load(resolve("countdown_small_apr"))
  monkeypatch.setattr(runner.TreeEngine, "_build", lambda self: None)
  monkeypatch.setattr(memory, "free_bytes", lambda devices: 256 * MiB)
  eng = ev.make_engine(model, tok, "apr_tok", lanes=8, slots="auto", max_total_tokens=6000)
  cap = tree.log_bound(eng.spec.protocol, ev.PROMPT_TOKENS, 16, 1, 6000)
  assert eng.spec.slots % 64 == 0 and 64 <= eng.spec.slots <= -(-cap // 64) * 64
  assert eng.memory.total <= (1 - memory.MARGIN) * 256 * MiB
  for bad in ("many", 0, -5, 2.5):
    with pytest.raises(UserError, match="slots must be"):
      ev.make_engine(model, tok, "apr_tok", slots=bad)
  # requests sharing a lane: the thread table and the log hold each one's budgets
  two = ev.make_engine(model, tok, "apr_tok", lanes=8, slots=1024, requests_per_lane=2)
  assert (two.spec.requests, two.spec.threads) == (2, 32) and two.spec.n_log >= 2 * cap
  with pytest.raises(UserError, match="requests_per_lane must be"):
    ev.make_engine(model, tok, "apr_tok", requests_per_lane=0)


def test_generator_refuses_a_batch_that_cannot_fit(monkeypatch):
  from apr_jax.engine.generate import Generator
  from apr_jax.engine.sampling import SamplingConfig
  gen = Generator(tf.tiny_model())
  spec = gen.spec_for([10, 20], 100, SamplingConfig(), None)  # fits
  assert spec.batch == 2
  monkeypatch.setattr(memory, "free_bytes", lambda devices: 256 * 1024)
  with pytest.raises(UserError, match=r"generating 64 prompt\(s\).*does not fit in device memory"):
    gen.spec_for([900] * 64, 100, SamplingConfig(), None)
