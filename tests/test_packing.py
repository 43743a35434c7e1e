"""The packed-tree training forward equals the engine's exactness reference: every sampled
token's logits, computed in one packed sequence with the id-based tree mask, equal a full
forward over that thread's context (which the engine tests tie to the engine's own logits)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apr_jax.model import ops
from apr_jax.protocols import reference
from apr_jax.training import packing
from tests import tree_fixtures as tf


@jax.jit
def _packed_logits(graph_state, rows_tokens, rows_pos, groups, vis):
  """(blockwise, dense): the training path (causal blocks of 64 over a `TreeMask`) and the
  plain attention over the full mask."""
  from flax import nnx
  model = nnx.merge(*graph_state)
  tm = packing.TreeMask(groups, vis, block=64)
  return model.train_logits(rows_tokens, rows_pos, tm), model(rows_tokens, rows_pos, tm.dense())


@pytest.mark.parametrize("name", sorted(tf.PROTOCOLS))
def test_packed_tree_forward_matches_reference(name):
  from flax import nnx
  model = tf.tiny_model()
  rng = np.random.default_rng(11)
  pr = tf.PROTOCOLS[name]
  cases = [tf.random_trajectory(name, rng, blocks=b) for b in (2, 1, 0)]
  traces = [reference.simulate(pr, p, s, eos_ids=(tf.EOS,)) for p, s in cases]
  packed = [packing.pack_trace(t) for t in traces]
  # the id-based mask reproduces every token's visible set
  for t, pk in zip(traces, packed):
    order = sorted(u for th in t.threads.values() for _, _, u in th.written)
    ctx = [(0, 0, u) for u in order]
    m = np.asarray(packing.tree_mask(jnp.asarray(pk.groups[None]), jnp.asarray(pk.vis[None])))[0]
    np.testing.assert_array_equal(m, t.mask(ctx))
    assert not np.triu(m, 1).any()  # no token sees a later one: blockwise attention may skip them
    assert (pk.labels >= 0).sum() == t.total_tokens
  rows, skipped = packing.pack_rows(packed, seq_len=512, max_groups=64)
  assert skipped == 0 and rows.tokens.shape[0] == 1  # all three share one row
  # fresh-context threads (APR) split into independent sequences; shared ones do not
  parts = packing.split_components(packed[0])
  assert (len(parts) > 1) == (pr.context == "fresh")
  assert sum(len(x) for x in parts) == len(packed[0])
  assert sum((x.labels >= 0).sum() for x in parts) == (packed[0].labels >= 0).sum()
  # two copies of the row: 1024 rows take `linear`'s many-rows GEMM (x @ W^T, as training
  # does), while the reference forwards below take the few-rows one (W @ x^T)
  assert 2 * rows.tokens.shape[1] >= ops.ROWS_MAJOR_MIN
  twice = [jnp.asarray(np.concatenate([a, a])) for a in (rows.tokens, rows.positions, rows.groups, rows.vis)]
  blocks, dense = _packed_logits(nnx.split(model), *twice)
  logits = np.asarray(blocks)[0]
  np.testing.assert_allclose(np.asarray(blocks)[1], logits, atol=1e-6)
  # equal up to float32 rounding (summation order): a few ulps of the largest logit
  np.testing.assert_allclose(logits, np.asarray(dense)[0], atol=3e-6 * np.abs(logits).max())
  offset, worst, span = 0, 0.0, 0.0
  for t, pk in zip(traces, packed):
    for th in t.threads.values():
      for ctx in th.contexts:
        ref = tf.reference_logits(model, t, ctx)
        got = logits[offset + ctx[-1][2]]
        worst = max(worst, float(np.abs(ref - got).max()))
        span = max(span, float(ref.max() - ref.min()))
    offset += len(pk)
  assert span > 1.0 and worst <= 1e-4 * span, (worst, span)


def _random_tree(rng, b, n, g):
  """Run ids [b, n] (runs in order, padding -1 at the end) and run tables [b, g, g] in which
  a run sees only earlier runs: every visible token precedes its reader."""
  groups = np.full((b, n), -1, np.int32)
  for r in range(b):
    cuts = np.sort(rng.choice(np.arange(1, n - 8), size=g - 1, replace=False))
    runs = np.split(np.arange(n - int(rng.integers(0, 8))), cuts)
    for i, idx in enumerate(runs):
      groups[r, idx] = i
  vis = np.tril(rng.random((b, g, g)) < 0.5, -1)
  return groups, vis


class _MaskedOut(packing.TreeMask):
  """A tree mask in which some queries see no key at all (not something packing makes):
  their softmax is uniform, in `attend` and in both backward modes."""

  @staticmethod
  def block_mask(arrays, q0, q1, k1):
    m = packing.tree_mask(*arrays, (q0, q1), k1)
    return m & (jnp.arange(q0, q1) % 7 != 3)[None, :, None]

  def dense(self):
    return self.block_mask(self.arrays, 0, self.groups.shape[1], self.groups.shape[1])


@pytest.mark.parametrize("dtype,rows,save,masked", [
    (jnp.float32, None, None, False), (jnp.float32, 2, True, False), (jnp.float32, 3, False, False),
    (jnp.float32, 1, False, True), (jnp.float32, 2, True, True),
    (jnp.bfloat16, None, None, False), (jnp.bfloat16, 2, False, False)])
def test_blockwise_attention_gradients_match_dense(dtype, rows, save, masked):
  """The training attention (query blocks, hand-written backward with saved or recomputed
  probabilities, rows in a loop, interleaved) against autodiff of the plain dense reference:
  values and gradients of q, k and v, with grouped heads, a length that is not a multiple of
  the block, and (masked) queries that see no key."""
  from apr_jax.model import attention, train_attention
  rng = np.random.default_rng(5)
  b, n, h, kh, d = 6, 200, 4, 2, 16
  groups, vis = _random_tree(rng, b, n, 6)
  tm = (_MaskedOut if masked else packing.TreeMask)(
      jnp.asarray(groups), jnp.asarray(vis), block=64, rows_per_iteration=rows, save_probs=save)
  q, k, v, w = (jnp.asarray(rng.normal(size=(b, n, x, d)), jnp.float32) for x in (h, kh, kh, h))
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  dense = tm.dense()
  assert (not masked) or not np.asarray(dense).any(-1).all()

  def loss(f):
    return lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * w)

  blocks = jax.jit(jax.value_and_grad(loss(lambda q, k, v: train_attention.attend_blocks(q, k, v, tm)), (0, 1, 2)))
  def plain(q, k, v):
    """Autodiff of the plain reference: `attend` over the full mask, or, where some queries
    see no key (uniform over the keys they are given), over each query block's keys."""
    if not masked:
      return attention.attend(q, k, v, dense, keys_major=False)
    return jnp.concatenate([
        attention.attend(q[:, q0:q0 + 64], k[:, :q0 + 64], v[:, :q0 + 64],
                  tm.block_mask(tm.arrays, q0, min(q0 + 64, n), min(q0 + 64, n)), keys_major=False)
        for q0 in range(0, n, 64)], axis=1)

  ref = jax.jit(jax.value_and_grad(loss(plain), (0, 1, 2)))
  (lb, gb), (lr, gr) = blocks(q, k, v), ref(q, k, v)
  tol = 2e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(float(lb), float(lr), rtol=tol)
  for got, want in zip(gb, gr):
    assert got.dtype == dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max())
  # the forward values themselves, row by row
  o = np.asarray(train_attention.attend_blocks(q, k, v, tm), np.float32)
  want = np.asarray(plain(q, k, v), np.float32)
  np.testing.assert_allclose(o, want, atol=(1e-5 if dtype == jnp.float32 else 2e-2) * np.abs(want).max())


def test_blockwise_attention_on_a_sharded_batch():
  """The accelerator defaults' shape of work on a batch sharded over 4 (fake) devices: 4 rows
  per iteration (one per device), probabilities recomputed; equal to the dense reference."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from apr_jax.model import attention, train_attention
  rng = np.random.default_rng(6)
  b, n, h, kh, d = 8, 160, 4, 2, 16
  groups, vis = _random_tree(rng, b, n, 5)
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  sh = NamedSharding(mesh, PartitionSpec("data"))
  q, k, v, w = (jax.device_put(jnp.asarray(rng.normal(size=(b, n, x, d)), jnp.float32), sh)
                for x in (h, kh, kh, h))
  g, vi = jax.device_put(jnp.asarray(groups), sh), jax.device_put(jnp.asarray(vis), sh)

  def loss(q, k, v, g, vi, blocks):
    tm = packing.TreeMask(g, vi, block=64, rows_per_iteration=4, save_probs=False)
    o = train_attention.attend_blocks(q, k, v, tm) if blocks else attention.attend(q, k, v, tm.dense(), keys_major=False)
    return jnp.sum(o * w)

  got = jax.jit(jax.value_and_grad(lambda *a: loss(*a, True), (0, 1, 2)))(q, k, v, g, vi)
  want = jax.jit(jax.value_and_grad(lambda *a: loss(*a, False), (0, 1, 2)))(q, k, v, g, vi)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=2e-5)
  for a, e in zip(got[1], want[1]):
    assert a.sharding.is_equivalent_to(sh, a.ndim)
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=2e-5 * np.abs(np.asarray(e)).max())


def test_rows_per_iteration_default_fits_the_budget():
  from apr_jax.model.train_attention import _rows_under
  assert jax.device_count() == 8  # the tests' fake devices
  assert _rows_under(64, 32 << 20, 256 << 20) == 64  # 8 rows of 32 MiB on each of 8 devices
  assert _rows_under(64, 64 << 20, 256 << 20) == 32  # 4 rows each
  assert _rows_under(64, 1 << 30, 256 << 20) == 8  # nothing fits: one row per device
  assert _rows_under(6, 1, 1 << 30) == 6  # 8 devices cannot share 6 rows: the most that fit
  assert _rows_under(6, 100, 250) == 2
  assert _rows_under(6, 1 << 30, 1) == 1  # nothing fits: one row at a time
