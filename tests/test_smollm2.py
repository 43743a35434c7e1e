"""The embedded SmolLM2-135M-Instruct GGUF against `transformers` loading the same file."""
import os

import numpy as np
import pytest

from apr_jax.engine.generate import Generator
from tests.test_model_parity import forward

PROMPTS = ["What is 2+3?", "Write one sentence about the sea.",
           "List three colors: red, green and", "def fibonacci(n):\n    return"]


@pytest.fixture(scope="module")
def hf(smollm2_path):
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  d, f = os.path.split(smollm2_path)
  tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
  model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
  return model, tok


def chat_ids(tok, text):
  return tok.encode(tok.apply_chat([{"role": "user", "content": text}]))


def test_logits_parity(smollm2, hf):
  model, tok = smollm2
  for p in PROMPTS:
    ids = np.asarray([chat_ids(tok, p)])
    ref = hf[0](__import__("torch").tensor(ids)).logits.detach().numpy()
    got = forward(model, ids)
    rng = ref.max() - ref.min()
    assert np.abs(got - ref).max() <= 1e-3 * rng, p


def test_tokenizer_matches_transformers(smollm2, hf):
  tok, ref = smollm2[1], hf[1]
  for p in PROMPTS + ["Hello, world! Ünïcödé — ok?", "  spaces\tand\nnewlines  "]:
    text = tok.apply_chat([{"role": "user", "content": p}])
    assert text == ref.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True)
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False), p
    assert tok.decode(tok.encode(p)) == p


def test_digits_split_like_llama_cpp(smollm2):
  # SmolLM2's pre-tokenizer (llama.cpp 'smollm') isolates every digit.
  tok = smollm2[1]
  ids = tok.encode("12345")
  assert len(ids) == 5 and tok.decode(ids) == "12345"


def test_greedy_64_tokens_identical(smollm2, hf):
  import torch
  model, tok = smollm2
  ids = chat_ids(tok, "What is 2+3?")
  x = torch.tensor([ids])  # explicit mask: the prompt contains the pad id (<|im_end|>)
  ref = hf[0].generate(x, attention_mask=torch.ones_like(x), max_new_tokens=64, do_sample=False,
                       eos_token_id=None, pad_token_id=2)[0, len(ids):].tolist()
  gen = Generator(model, tok)
  tokens, n, _ = gen.generate_ids([ids], max_new_tokens=64, stop_ids=[])
  assert tokens[0].tolist() == ref
  assert tok.decode(ref).startswith("2 + 3 = 5")
