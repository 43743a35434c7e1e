"""Tree attention (`attend_visible`: only the slots some query sees, in blocks, online
softmax) against the dense reference (`attend_split` over every slot), float32 and bfloat16."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apr_jax.engine.tree.packing import visible_slots
from apr_jax.model.attention import attend_split, attend_visible


def _case(seed, b=3, t=5, h=4, kh=2, s=96, d=8, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, h, d)) * 2, dtype)
  k = jnp.asarray(rng.normal(size=(b, kh, s, d)) * 2, dtype)
  v = jnp.asarray(rng.normal(size=(b, kh, s, d)), dtype)
  kn = jnp.asarray(rng.normal(size=(b, kh, t, d)) * 2, dtype)
  vn = jnp.asarray(rng.normal(size=(b, kh, t, d)), dtype)
  # ragged visibility: row 0 sees a few scattered slots, row 1 most, row 2 none of the cache
  dens = np.array([0.1, 0.8, 0.0])[:b]
  mask = rng.random((b, t, s)) < dens[:, None, None]
  mask_new = np.tril(np.ones((t, t), bool))[None].repeat(b, 0)
  return q, k, v, jnp.asarray(mask), kn, vn, jnp.asarray(mask_new)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("block", [1, 16, 64, 128])
def test_visible_attention_equals_dense(dtype, tol, block):
  q, k, v, mask, kn, vn, mn = _case(block, dtype=dtype)
  ref = attend_split(q, k, v, mask, kn, vn, mn)
  idx, count = jax.vmap(visible_slots)(mask)
  n_blocks = (jnp.max(count) + block - 1) // block
  got = attend_visible(q, k, v, mask, idx, count, n_blocks, kn, vn, mn, block)
  assert got.dtype == ref.dtype
  ref32, got32 = np.asarray(ref, np.float32), np.asarray(got, np.float32)
  scale = np.abs(ref32).max()
  assert scale > 0.1
  assert np.abs(got32 - ref32).max() <= tol * scale


def test_visible_attention_reads_only_listed_slots():
  """Slots nobody sees are never read: NaN there leaves the output as it was (a masked
  read, as in the dense path, would give NaN), while changing a visible slot changes it."""
  q, k, v, mask, kn, vn, mn = _case(7)
  idx, count = jax.vmap(visible_slots)(mask)
  nb = (jnp.max(count) + 15) // 16
  out = attend_visible(q, k, v, mask, idx, count, nb, kn, vn, mn, 16)
  seen = np.asarray(jnp.any(mask, axis=1))                                 # [B, S]
  poison = jnp.where(jnp.asarray(~seen)[:, None, :, None], jnp.nan, v)
  same = attend_visible(q, k, poison, mask, idx, count, nb, kn, vn, mn, 16)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(same))
  assert np.isnan(np.asarray(attend_split(q, k, poison, mask, kn, vn, mn))).any()
  first = int(np.nonzero(seen[1])[0][0])
  hit = v.at[1, :, first].set(1e3)
  assert not np.allclose(np.asarray(attend_visible(q, k, hit, mask, idx, count, nb, kn, vn, mn, 16)),
                         np.asarray(out))


def test_engine_tree_attention_equals_dense_in_bfloat16():
  """The whole engine in bfloat16 (params and KV): tree attention gives the dense path's
  trajectories and, at every teacher-forced sample, its logits within 3% of their range
  (bfloat16 sums in another order); float32 tolerances are in the exactness tests."""
  import zlib
  from flax import nnx
  from apr_jax.engine.runner import Request, TreeEngine
  from apr_jax.engine.tree import TreeSpec
  from tests import tree_fixtures as tf
  graphdef, state = nnx.split(tf.tiny_model())
  model = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.bfloat16), state))
  rng = np.random.default_rng(zlib.crc32(b"bf16"))
  cases = [tf.random_trajectory("multiverse", rng, blocks=b) for b in (1, 2)]
  out = {}
  for att in ("dense", "tree"):
    spec = TreeSpec(protocol=tf.PROTOCOLS["multiverse"], root_stop=(tf.EOS,), lanes=2, rows=3,
                    threads=16, slots=256, log=2048, chunk=8, script=64, script_rows=16,
                    record_logits=True, attention=att, block=16)
    eng = TreeEngine(model, None, spec, segment_steps=16)
    assert eng.cache_dtype == jnp.bfloat16
    out[att] = eng.run([Request(p, script=s) for p, s in cases])
  for d, t in zip(out["dense"], out["tree"]):
    assert d.token_ids == t.token_ids and d.total_tokens == t.total_tokens
    for path, ref in d.logits.items():
      span = float(ref.max() - ref.min())
      assert span > 1.0 and np.abs(t.logits[path] - ref).max() <= 0.03 * span


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("block", [8, 32])
def test_pallas_page_kernel_equals_dense(dtype, tol, block):
  """The Pallas TPU kernel (`model/pallas_attention.py`, interpret mode here) over the
  visible pages equals the dense reference; rows that see no cache slot included."""
  from apr_jax.model.pallas_attention import attend_pages
  q, k, v, mask, kn, vn, mn = _case(block + 1, dtype=dtype)
  ref = attend_split(q, k, v, mask, kn, vn, mn)
  got = attend_pages(q, k, v, mask, kn, vn, mn, block, interpret=True)
  assert got.dtype == ref.dtype and got.shape == ref.shape
  ref32, got32 = np.asarray(ref, np.float32), np.asarray(got, np.float32)
  assert np.abs(got32 - ref32).max() <= tol * np.abs(ref32).max()


def test_pallas_page_kernel_reads_only_visible_pages():
  """Pages nobody sees are never fetched, and slots nobody sees never count: NaN in every
  slot no query sees leaves the output unchanged; a visible slot changes it. The page list
  is exactly the pages holding a visible slot."""
  from apr_jax.model.pallas_attention import attend_pages, visible_pages
  q, k, v, mask, kn, vn, mn = _case(9)
  out = attend_pages(q, k, v, mask, kn, vn, mn, 16, interpret=True)
  seen = np.asarray(jnp.any(mask, axis=1))                                 # [B, S]
  poison = lambda x: jnp.where(jnp.asarray(~seen)[:, None, :, None], jnp.nan, x)
  same = attend_pages(q, poison(k), poison(v), mask, kn, vn, mn, 16, interpret=True)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(same))
  first = int(np.nonzero(seen[1])[0][0])
  hit = v.at[1, :, first].set(1e3)
  assert not np.allclose(np.asarray(attend_pages(q, k, hit, mask, kn, vn, mn, 16, interpret=True)),
                         np.asarray(out))
  pages, n = visible_pages(mask, 16)
  for b in range(mask.shape[0]):
    want = sorted({s // 16 for s in np.nonzero(seen[b])[0]})
    assert list(np.asarray(pages[b, :int(n[b])])) == want


def test_scaling_benchmark_records(tmp_path):
  """`bench scaling` on a tiny shape: a record per path and configuration; the tree path
  reads the visible KV in whole blocks (128 slots, or 32 as tree@32), whatever the pool, and
  agrees with dense."""
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "s.json"
  env = dict(os.environ, APR_JAX_CACHE_DIR="off", PYTHONPATH=root)
  env.pop("XLA_FLAGS", None)
  p = subprocess.run([sys.executable, "-m", "apr_jax.bench", "scaling", "--scaling_shape", "tiny",
                      "--scaling_pools", "256,512", "--scaling_threads", "2", "--scaling_lanes", "1",
                      "--scaling_blocks", "128,32", "--prompt_tokens", "64", "--own_tokens", "8",
                      "--repeats", "1", "--out", str(out)],
                     capture_output=True, text=True, cwd=root, env=env, timeout=300)
  assert p.returncode == 0, p.stderr
  recs = json.loads(out.read_text())
  assert sorted((r["attention"], r["slots"]) for r in recs) == [
      ("dense", 256), ("dense", 512), ("tree", 256), ("tree", 512), ("tree@32", 256),
      ("tree@32", 512)]
  per_slot = 2 * 2 * 16 * 4 / 2**20  # K and V, 2 KV heads, head_dim 16, float32
  for r in recs:
    assert r["max_abs_diff_vs_dense"] < 1e-5
    assert r["kv_visible_mb"] == pytest.approx(80 * per_slot, abs=1e-3)  # prompt + 2 x 8
    want = {"tree": 128, "tree@32": 96}.get(r["attention"], r["slots"]) * per_slot
    assert r["kv_read_mb"] == pytest.approx(want, abs=1e-3)


def test_step_benchmark_records(tmp_path):
  """`bench step` on 2 lanes: a record per part, all of the same step (at or past
  --step_at), the whole step's share exactly 1."""
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, APR_JAX_CACHE_DIR="off", PYTHONPATH=root)
  env.pop("XLA_FLAGS", None)

  def bench(*args):
    return subprocess.run([sys.executable, "-m", "apr_jax.bench", "step", "--lanes", "2",
                           "--repeats", "1", "--step_calls", "1", *args],
                          capture_output=True, text=True, cwd=root, env=env, timeout=300)

  out = tmp_path / "s.json"
  p = bench("--step_at", "8", "--out", str(out))
  assert p.returncode == 0, p.stderr
  recs = json.loads(out.read_text())
  assert [r["part"] for r in recs] == ["assign_rows", "pack", "pack+model", "whole step",
                                       "model, 1 key"]
  assert len({r["step"] for r in recs}) == 1 and recs[0]["step"] >= 8
  assert all(r["ms_median"] > 0 and r["lanes"] == 2 for r in recs)
  assert recs[3]["share_of_step"] == 1.0
