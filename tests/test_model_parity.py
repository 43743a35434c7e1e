"""Logits parity with `transformers` for tiny random Llama / Qwen2 / Qwen3 checkpoints."""
import jax.numpy as jnp
from flax import nnx
import numpy as np
import pytest

from apr_jax import checkpoint
from apr_jax.model.transformer import causal_mask
from tests import hf_fixtures


@nnx.jit
def _forward(model, ids):
  b, t = ids.shape
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  return model(ids, pos, jnp.broadcast_to(causal_mask(t), (b, t, t)))


def forward(model, ids):
  """Plain full forward (no cache): float32 logits [B, T, V] as numpy."""
  return np.asarray(_forward(model, jnp.asarray(ids, jnp.int32)))


@pytest.mark.parametrize("name", sorted(hf_fixtures.VARIANTS))
def test_hf_parity(name, tiny_dir):
  path = tiny_dir(name)
  hf = hf_fixtures.make_hf_model(name)  # same seed -> same weights as the saved checkpoint
  model, _ = checkpoint.load(path)
  ids = np.random.default_rng(0).integers(0, 96, (2, 40))
  ref = hf_fixtures.hf_logits(hf, ids)
  got = forward(model, ids)
  rng = ref.max() - ref.min()
  assert rng > 1.0, "test model too weak to detect differences"
  np.testing.assert_array_less(np.abs(got - ref).max(), 1e-3 * rng)
  # and the predictions agree
  assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.99


def test_config_variants_are_distinct(tiny_dir):
  cfgs = {n: checkpoint.load(tiny_dir(n))[0].cfg for n in hf_fixtures.VARIANTS}
  assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].o_bias
  assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 48 and cfgs["qwen3"].tie_embeddings
  assert cfgs["llama_mha_tied_llama3rope"].rope_scaling.kind == "llama3"
  assert cfgs["llama_mha_tied_llama3rope"].o_bias
  assert cfgs["llama_linear_rope"].rope_scaling.kind == "linear"
  assert not cfgs["llama_gqa_untied"].tie_embeddings


@pytest.mark.parametrize("name", ["llama_gqa_untied", "llama_mha_tied_llama3rope", "qwen2", "qwen3"])
def test_gguf_parity(name, tmp_path):
  # the same tiny models written as llama.cpp would (Q/K permuted, llama3 rope as rope_freqs)
  from tests import gguf_fixtures
  hf = hf_fixtures.make_hf_model(name)
  path = str(tmp_path / f"{name}.gguf")
  gguf_fixtures.write_gguf(hf, path)
  model, tok = checkpoint.load(path)
  assert tok.vocab_size == 96
  ids = np.random.default_rng(3).integers(0, 96, (2, 40))
  ref = hf_fixtures.hf_logits(hf, ids)
  got = forward(model, ids)
  assert np.abs(got - ref).max() < 1e-3 * (ref.max() - ref.min())
  if "llama3" in name:
    assert model.cfg.rope_freq_factors is not None
