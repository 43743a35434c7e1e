"""The same logits and tokens on a 2x4 (data x model) mesh of 8 fake CPU devices."""
import jax
import numpy as np
import pytest

from apr_jax import checkpoint
from apr_jax.checkpoint import build
from apr_jax.engine.generate import Generator
from apr_jax.model.sharding import ShardingRules, make_mesh
from tests.test_model_parity import forward


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) >= 8, "conftest sets 8 fake CPU devices"
  return make_mesh(2, 4)


def test_rules_replicate_undivisible_dims(mesh):
  r = ShardingRules()
  assert tuple(r.spec(("embed", "q_heads"), (64, 128), mesh)) == (None, "model")
  assert tuple(r.spec(("embed", "kv_heads"), (64, 3), mesh)) == (None, None)
  assert tuple(r.spec(("batch", "kv_heads", "sequence", "head_dim"), (4, 8, 16, 8), mesh)) == \
      ("data", "model", None, None)


@pytest.mark.parametrize("name", ["qwen3_gqa8", "llama_gqa_untied"])
def test_tiny_logits_and_tokens_on_mesh(name, tiny_dir, mesh):
  one, _ = checkpoint.load(tiny_dir(name))
  sharded, _ = checkpoint.load(tiny_dir(name), mesh=mesh)
  q = sharded.layers[0].attn.q[...]
  assert len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated
  ids = np.random.default_rng(0).integers(0, 96, (4, 24))
  np.testing.assert_allclose(forward(sharded, ids), forward(one, ids), atol=2e-5, rtol=1e-5)
  prompts = [[3, 4, 5], [6] * 9, [7, 8], [9, 10, 11, 12]]
  a, _, _ = Generator(one).generate_ids(prompts, max_new_tokens=8, stop_ids=[])
  b, _, _ = Generator(sharded, mesh=mesh).generate_ids(prompts, max_new_tokens=8, stop_ids=[])
  assert a.tolist() == b.tolist()


def test_smollm2_on_mesh(smollm2, mesh):
  model, tok = smollm2
  sharded = build.shard_model(model, mesh)
  ids = np.asarray([tok.encode("The capital of France is")[:5], tok.encode("1, 2, 3, 4, 5, 6,")[:5]])
  ref, got = forward(model, ids), forward(sharded, ids)
  assert np.abs(got - ref).max() <= 1e-4 * (ref.max() - ref.min())
