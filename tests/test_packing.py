"""The packed-tree training forward equals the engine's exactness reference: every sampled
token's logits, computed in one packed sequence with the id-based tree mask, equal a full
forward over that thread's context (which the engine tests tie to the engine's own logits)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apr_jax.model import transformer
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
  return model(rows_tokens, rows_pos, tm)[0], model(rows_tokens, rows_pos, tm.dense())[0]


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
  assert 2 * rows.tokens.shape[1] >= transformer.ROWS_MAJOR_MIN
  twice = [jnp.asarray(np.concatenate([a, a])) for a in (rows.tokens, rows.positions, rows.groups, rows.vis)]
  blocks, dense = _packed_logits(nnx.split(model), *twice)
  logits = np.asarray(blocks)[0]
  np.testing.assert_allclose(np.asarray(blocks)[1], logits, atol=1e-6)
  np.testing.assert_allclose(logits, np.asarray(dense)[0], atol=1e-5)
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
