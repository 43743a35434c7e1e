"""The KV-cache decode path against a plain full forward over the same tokens."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apr_jax import checkpoint
from apr_jax.cache import kv as kvlib
from apr_jax.engine import generate as G
from apr_jax.errors import UserError
from tests.test_model_parity import forward


def test_cached_decode_equals_full_forward(tiny_dir):
  model, _ = checkpoint.load(tiny_dir("qwen2"))
  rng = np.random.default_rng(1)
  lens, new, p, slots = [5, 11], 7, 16, 32
  seqs = [rng.integers(3, 96, n + new) for n in lens]
  pad = jnp.asarray([p - n for n in lens], jnp.int32)
  toks = np.zeros((2, p), np.int32)
  for r, n in enumerate(lens):
    toks[r, p - n:] = seqs[r][:n]
  pos = jnp.maximum(jnp.arange(p)[None] - pad[:, None], 0)
  cache = kvlib.init_cache(model.cfg, 2, slots)  # eager, unsharded
  h, cache = model.decode(jnp.asarray(toks), pos, G.prefill_mask(pad, p, slots), cache, 0)
  logits = model.logits(h)
  steps = [np.asarray(logits[:, -1])]
  for t in range(new - 1):
    x = jnp.asarray([[seqs[r][lens[r] + t]] for r in range(2)], jnp.int32)
    pos_t = jnp.asarray([[lens[r] + t] for r in range(2)], jnp.int32)
    h, cache = model.decode(x, pos_t, G.decode_mask(pad, p + t, slots), cache, p + t)
    logits = model.logits(h)
    steps.append(np.asarray(logits[:, 0]))
  for r in range(2):
    full = forward(model, seqs[r][None, :lens[r] + new - 1])[0]
    ref = full[lens[r] - 1:]
    got = np.stack([s[r] for s in steps])
    np.testing.assert_allclose(got, ref, atol=2e-4 * (ref.max() - ref.min()))


def greedy_reference(model, prompt, n):
  ids = list(prompt)
  for _ in range(n):
    ids.append(int(forward(model, np.asarray([ids]))[0, -1].argmax()))
  return ids[len(prompt):]


def test_generator_batch_of_different_lengths(tiny_dir):
  model, _ = checkpoint.load(tiny_dir("llama_gqa_untied"))
  gen = G.Generator(model)
  prompts = [[5, 6, 7], list(range(10, 31)), [40]]
  tokens, n_gen, done = gen.generate_ids(prompts, max_new_tokens=12, stop_ids=[])
  for r, p in enumerate(prompts):
    assert tokens[r].tolist() == greedy_reference(model, p, 12)
  # each row alone gives the same tokens (batch invariance of the sequential path)
  alone, _, _ = gen.generate_ids([prompts[1]], max_new_tokens=12, stop_ids=[])
  assert alone[0].tolist() == tokens[1].tolist()
  # per-row limits: each row keeps the tokens a run with its own budget gives; a row's
  # limit only needs its own prompt to fit the context
  lim, n, d = gen.generate_ids(prompts, max_new_tokens=12, stop_ids=[], row_limits=[3, 12, 7])
  assert n.tolist() == [3, 12, 7] and not d.any()
  for r, k in enumerate([3, 12, 7]):
    assert lim[r, :k].tolist() == tokens[r, :k].tolist() and (lim[r, k:] == lim[0, -1]).all()
  ctx = model.cfg.max_seq_len
  long = [5] * (ctx - 4)  # 4 tokens of context left
  _, n, _ = gen.generate_ids([long, [5]], max_new_tokens=12, stop_ids=[], row_limits=[4, 12])
  assert n.tolist() == [4, 12]
  with pytest.raises(UserError, match="exceeds the model's context"):
    gen.generate_ids([long, [5]], max_new_tokens=12, stop_ids=[], row_limits=[5, 12])
  # a segment callback that returns True stops decoding there, with the tokens so far
  part, n, _ = gen.generate_ids(prompts, max_new_tokens=12, stop_ids=[], segment=3,
                                on_segment=lambda st: int(st.step) >= 4)
  assert n.tolist() == [4, 4, 4] and part[:, :4].tolist() == tokens[:, :4].tolist()


def test_stop_tokens_end_rows_independently(tiny_dir):
  model, _ = checkpoint.load(tiny_dir("llama_gqa_untied"))
  gen = G.Generator(model)
  free, _, _ = gen.generate_ids([[5, 6, 7], [9, 9]], max_new_tokens=10, stop_ids=[])
  stop = int(free[0, 3])
  tokens, n_gen, done = gen.generate_ids([[5, 6, 7], [9, 9]], max_new_tokens=10, stop_ids=[stop])
  first = free[0].tolist().index(stop)
  assert done[0] and n_gen[0] == first + 1
  assert tokens[0, :first + 1].tolist() == free[0, :first + 1].tolist()
  if stop not in free[1].tolist():
    assert not done[1] and n_gen[1] == 10 and tokens[1].tolist() == free[1].tolist()


def test_prompt_bucketing_reuses_programs(tiny_dir):
  model, _ = checkpoint.load(tiny_dir("qwen3"))
  gen = G.Generator(model)
  for n in (3, 5, 9, 16):
    gen.generate_ids([list(range(1, n + 1))], max_new_tokens=8)
  assert len(gen._compiled) == 1  # all four prompt lengths share the 16-token bucket
  gen.generate_ids([list(range(1, 20))], max_new_tokens=8)
  assert len(gen._compiled) == 2


def test_donated_cache_is_consumed(tiny_dir):
  model, _ = checkpoint.load(tiny_dir("qwen3"))
  gen = G.Generator(model)
  spec = gen.spec_for([4], 8, G.SamplingConfig(), [])
  state = gen.start([[1, 2, 3, 4]], spec, [0])
  old = state.cache[0].k
  state2 = gen.advance(state, spec, 8)
  jax.block_until_ready(state2.tokens)
  assert old.is_deleted()  # the decode loop updated the cache in place


def test_bfloat16_params_and_cache(tiny_dir):
  # the accelerator dtype: same greedy path, logits close to float32
  f32, _ = checkpoint.load(tiny_dir("qwen3_gqa8"))
  bf16, _ = checkpoint.load(tiny_dir("qwen3_gqa8"), dtype=jnp.bfloat16)
  assert bf16.layers[0].attn.q[...].dtype == jnp.bfloat16
  ids = np.random.default_rng(2).integers(0, 96, (2, 16))
  a, b = forward(f32, ids), forward(bf16, ids)
  assert b.dtype == np.float32 and np.abs(a - b).max() < 0.05 * (a.max() - a.min())
  gen = G.Generator(bf16)
  assert gen.cache_dtype == jnp.bfloat16
  tokens, n_gen, _ = gen.generate_ids([[1, 2, 3], [4, 5]], max_new_tokens=6, stop_ids=[])
  assert tokens.shape == (2, 6) and (n_gen == 6).all()
