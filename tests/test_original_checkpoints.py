"""Tiny checkpoints in the originals' own setups, made here with `transformers` and
`tokenizers`, run end to end from `python -m apr_jax.run --protocol ...`:

- ThreadWeaver: a Qwen3 model whose byte-level BPE tokenizer has ThreadWeaver's tags as
  added special tokens and a Qwen3 chat template that opens `<think>`;
- Multiverse: a Qwen2 model with Multiverse's tags added the same way.

The weights are random, so the threads run to their budget: the run shows the originals'
handling of that case (ThreadWeaver: each thread closed with `\\n</Thread>`, threads
adjacent, the block closed with `\\n</Parallel>`, the request ends)."""
import json
import os
import subprocess
import sys

import pytest

from apr_jax.protocols import MULTIVERSE_TAGS, THREADWEAVER_TAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
CORPUS = ["Let me think about the problem step by step.", "First, 12 plus 30 is 42.",
          "Second, check the answer: 42 minus 30 is 12.", "The answer is 42."] * 20


def make_checkpoint(path, arch: str, tags, seed=0):
  """A tokenizer (Qwen-style: digits split, byte-level) and a random model of its size."""
  import torch
  import transformers as tr
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  tok.add_special_tokens([t for t in tags if t not in specials])
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"chat_template": QWEN3_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": None}, f)
  cls = {"qwen3": (tr.Qwen3Config, tr.Qwen3ForCausalLM), "qwen2": (tr.Qwen2Config, tr.Qwen2ForCausalLM)}[arch]
  eos = tok.token_to_id("<|im_end|>")
  cfg = cls[0](vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=112,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               max_position_embeddings=512, rms_norm_eps=1e-6, eos_token_id=eos,
               tie_word_embeddings=True)
  torch.manual_seed(seed)
  cls[1](cfg).eval().save_pretrained(path)
  return path


def run(*args):
  env = dict(os.environ, APR_JAX_CACHE_DIR="off", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  p = subprocess.run([sys.executable, "-m", "apr_jax.run", *args], capture_output=True, text=True,
                     cwd=ROOT, env=env, timeout=300)
  assert p.returncode == 0, p.stderr
  return json.loads(p.stdout)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  d = tmp_path_factory.mktemp("originals")
  return {"threadweaver": make_checkpoint(str(d / "qwen3_tw"), "qwen3", THREADWEAVER_TAGS),
          "multiverse": make_checkpoint(str(d / "qwen2_mv"), "qwen2", MULTIVERSE_TAGS)}


def test_threadweaver_on_a_qwen3_checkpoint(checkpoints):
  """The model's own outline numbers label the threads (a duplicate and an unnumbered
  outline make none); threads join adjacent; cut threads close the block and end it."""
  from apr_jax.tokenizer import load_tokenizer
  path = checkpoints["threadweaver"]
  tok = load_tokenizer(path)
  assert tok.token_id("<Outline>") is not None and tok.encode("<Thread>") == [tok.token_id("<Thread>")]
  assert tok.apply_chat([{"role": "user", "content": "hi"}]).endswith("<think>\n")
  prefix = ("<Parallel>\n<Outlines>\n<Outline>1: add</Outline>\n<Outline>3: check</Outline>\n"
            "<Outline>1: again</Outline>\n<Outline>later</Outline>\n</Outlines>")
  d = run("--model", path, "--protocol", "threadweaver", "--prompt", "What is 12+30?",
          "--assistant_prefix", prefix, "--max_new_tokens", "5", "--json")
  assert d["forks"] == 1 and len(d["threads"]) == 3, d["threads"]
  text = d["text"]
  assert text.startswith("\n<Thread>\n1:"), text
  assert "\n</Thread><Thread>\n3:" in text and text.endswith("\n</Thread>\n</Parallel>"), text
  assert d["stop_reason"] == "length"


def test_multiverse_on_a_qwen2_checkpoint(checkpoints):
  path = checkpoints["multiverse"]
  prefix = "<Parallel>\n<Goal>\n<Outline>1: a</Outline>\n<Outline>2.1: b</Outline>\n</Goal>"
  d = run("--model", path, "--protocol", "multiverse", "--prompt", "What is 12+30?",
          "--assistant_prefix", prefix, "--max_new_tokens", "4", "--json")
  assert d["forks"] == 1 and len(d["threads"]) == 3
  text = d["text"]
  assert text.startswith("\n<Path>\n1:") and "\n<Path>\n2.1:" in text and "<Conclusion>\n" in text, text
