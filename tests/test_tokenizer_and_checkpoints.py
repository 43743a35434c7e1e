"""Tokenizer backends, added protocol tokens with mean-initialised embeddings, orbax round trip."""
import jax
import numpy as np
import pytest

from apr_jax import checkpoint, tokenizer as toklib
from apr_jax.checkpoint import orbax_io
from apr_jax.model import vocab
from apr_jax.model.sharding import make_mesh
from tests.test_model_parity import forward

TAGS = ["<Parallel>", "</Parallel>", "<Outline>", "</Outline>", "<Thread>", "</Thread>"]


def test_sentencepiece_roundtrip_and_added_tokens(spm_model, tmp_path):
  tok = toklib.load_tokenizer(spm_model)
  text = "moving to node 42 goal reached"
  assert tok.decode(tok.encode(text)) == text
  ids = tok.add_special_tokens(TAGS)
  assert ids == list(range(60, 60 + len(TAGS))) and tok.vocab_size == 60 + len(TAGS)
  enc = tok.encode("search<Parallel>thread</Parallel>")
  assert ids[0] in enc and ids[1] in enc
  assert tok.decode(enc) == "search<Parallel>thread</Parallel>"
  tok.save(str(tmp_path))
  again = toklib.load_tokenizer(str(tmp_path))
  assert again.encode("a<Thread>b") == tok.encode("a<Thread>b")


def test_hf_tokenizer_chat_and_added_tokens(smollm2):
  _, tok = smollm2
  text = tok.apply_chat([{"role": "user", "content": "hi"}])
  assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
  assert tok.token_id("<|im_end|>") in tok.stop_ids()


def test_chat_modes(smollm2, spm_model):
  from apr_jax.errors import UserError
  from apr_jax.tokenizer import chat
  _, tok = smollm2
  base = toklib.load_tokenizer(spm_model)  # a base tokenizer: no chat template
  assert tok.chat_template and base.chat_template is None
  assert chat.use_chat("auto", tok.chat_template) and not chat.use_chat("auto", None)
  assert chat.use_chat("on", tok.chat_template) and chat.use_chat(True, tok.chat_template)
  assert not chat.use_chat("off", tok.chat_template) and not chat.use_chat(False, None)
  for bad in [("on", None), (True, None), ("yes", tok.chat_template)]:
    with pytest.raises(UserError):
      chat.use_chat(*bad)
  with pytest.raises(UserError, match="no chat template"):
    base.apply_chat([{"role": "user", "content": "x"}])  # never a silent ChatML wrap


def test_base_checkpoint_prompt_is_plain_text_by_default(tiny_dir, spm_model):
  from apr_jax.engine.generate import Generator
  model, _ = checkpoint.load(tiny_dir("qwen2"))
  tok = toklib.load_tokenizer(spm_model)
  gen = Generator(model, tok)
  text = "moving to node 42"
  r = gen.generate([text], max_new_tokens=2)[0]
  assert r.prompt_tokens == len(tok.encode(text))
  assert gen.generate([tok.encode(text)], max_new_tokens=2)[0].token_ids == r.token_ids


def test_added_tags_get_mean_embeddings(tiny_dir, spm_model):
  model, _ = checkpoint.load(tiny_dir("qwen2"))  # untied: the output head grows too
  tok = toklib.load_tokenizer(spm_model)  # 60 pieces; the model has 96 rows
  emb0 = np.asarray(model.embed[...])
  grown, ids = vocab.add_tokens(model, tok, TAGS)
  emb = np.asarray(grown.embed[...])
  assert grown.cfg.vocab_size == 96 and emb.shape == emb0.shape
  pieces = tok.encode("Parallel")  # existing pieces, resolved after the tags were added
  np.testing.assert_allclose(emb[ids[0]], emb0[pieces].mean(0), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(emb[ids[1]], emb0[pieces].mean(0), rtol=1e-6, atol=1e-7)
  head = np.asarray(grown.lm_head[...])
  np.testing.assert_allclose(head[ids[0]], np.asarray(model.lm_head[...])[pieces].mean(0),
                             rtol=1e-6, atol=1e-7)
  untouched = [i for i in range(96) if i not in ids]
  np.testing.assert_array_equal(emb[untouched], emb0[untouched])


def test_vocab_grows_when_needed(tiny_dir):
  from tokenizers import Tokenizer, models, pre_tokenizers
  model, _ = checkpoint.load(tiny_dir("qwen3"))  # tied embeddings
  t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(95)} | {"[UNK]": 95}, unk_token="[UNK]"))
  t.pre_tokenizer = pre_tokenizers.Whitespace()
  tok = toklib.HFTokenizer(t)
  grown, ids = vocab.add_tokens(model, tok, ["<Goal>", "</Goal>"])
  assert ids == [96, 97] and grown.cfg.vocab_size == 98
  logits = forward(grown, np.asarray([[1, 96, 2, 97]]))
  assert logits.shape == (1, 4, 98) and np.isfinite(logits).all()


def test_orbax_roundtrip_onto_a_mesh(tiny_dir, spm_model, tmp_path):
  model, _ = checkpoint.load(tiny_dir("qwen3_gqa8"))
  tok = toklib.load_tokenizer(spm_model)
  tok.add_special_tokens(["<Goal>"])
  orbax_io.save(str(tmp_path / "ck"), model, tok)
  assert len(jax.devices()) >= 8
  mesh = make_mesh(2, 4)
  back, tok2 = checkpoint.load(str(tmp_path / "ck"), mesh=mesh)
  assert back.cfg == model.cfg
  assert not back.layers[0].mlp.gate[...].sharding.is_fully_replicated
  ids = np.asarray([[1, 5, 9, 20], [3, 3, 3, 3]])
  np.testing.assert_allclose(forward(back, ids), forward(model, ids), atol=1e-5)
  assert tok2.encode("x<Goal>") == tok.encode("x<Goal>")


def test_transforms_do_not_mutate_their_input(tiny_dir, spm_model):
  from apr_jax.checkpoint import build
  model, _ = checkpoint.load(tiny_dir("qwen2"))
  before = np.asarray(model.embed[...]).copy()
  vocab.add_tokens(model, toklib.load_tokenizer(spm_model), ["<Goal>"])
  build.shard_model(model, make_mesh(2, 4))
  assert model.embed[...].sharding.is_fully_replicated and len(model.embed[...].sharding.device_set) == 1
  np.testing.assert_array_equal(np.asarray(model.embed[...]), before)


def test_added_tokens_keep_the_model_sharded(tiny_dir, spm_model):
  mesh = make_mesh(2, 4)
  model, _ = checkpoint.load(tiny_dir("qwen3_gqa8"), mesh=mesh)  # vocab 96 -> 96 + 2 rows
  from tokenizers import Tokenizer, models
  tok = toklib.HFTokenizer(Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0")))
  grown, ids = vocab.add_tokens(model, tok, ["<Goal>", "</Goal>"])
  assert grown.cfg.vocab_size == 98
  for w in (grown.embed[...], grown.lm_head[...]):
    assert len(w.sharding.device_set) == 8  # 98 rows do not split 4 ways: replicated on the mesh


def test_dtype_per_platform(tiny_dir):
  """auto: float32 on CPU (bfloat16 on GPU/TPU); an explicit dtype is kept; a bad one is a
  clear error."""
  import jax
  import jax.numpy as jnp
  from apr_jax import checkpoint
  from apr_jax.errors import UserError
  from apr_jax.model.config import resolve_dtype
  want = jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
  assert resolve_dtype("auto") == want and resolve_dtype(None) == want
  assert resolve_dtype("bfloat16") == jnp.bfloat16 and resolve_dtype(jnp.float32) == jnp.float32
  with pytest.raises(UserError, match="dtype"):
    resolve_dtype("fp8")
  model, _ = checkpoint.load(tiny_dir("qwen2"))
  assert {x.dtype for x in jax.tree.leaves(model)} == {jnp.dtype(want)}
  model, _ = checkpoint.load(tiny_dir("qwen2"), dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(model)} == {jnp.dtype(jnp.bfloat16)}
