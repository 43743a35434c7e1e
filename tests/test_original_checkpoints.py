"""Tiny checkpoints in the originals' own setups, made here with `transformers` and
`tokenizers`, run end to end from `python -m apr_jax.run --protocol ...`:

- ThreadWeaver: a Qwen3 model whose byte-level BPE tokenizer has ThreadWeaver's tags as
  added special tokens and a Qwen3 chat template that opens `<think>`;
- Multiverse: a Qwen2 model with Multiverse's tags added the same way;
- APR: a Llama model with a Llama-2-style sentencepiece tokenizer (BPE, digits split, byte
  fallback, nothing added: the tags are plain text), run by the host orchestration of the
  original's evaluation (`--protocol apr`).

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


def make_apr_checkpoint(path, seed=0):
  """A Llama-2-style sentencepiece model trained on original APR traces, and a random Llama."""
  import random
  import zlib

  import sentencepiece as spm
  import torch
  import transformers as tr

  from apr_jax.tasks import countdown as cd
  from apr_jax.tasks.countdown import original as orig
  os.makedirs(path, exist_ok=True)
  rng = random.Random(zlib.crc32(b"apr_checkpoint"))
  lines = []
  for p in cd.generate(cd.APR, 40, seed=3):
    t = orig.solve_apr_original(p, rng)
    lines += [x for c in t.calls + [k for spawn in t.children for k in spawn] for x in c.split("\n")]
  corpus = os.path.join(path, "corpus.txt")
  with open(corpus, "w") as f:
    f.write("\n".join(lines))
  spm.SentencePieceTrainer.train(
      input=corpus, model_prefix=os.path.join(path, "tokenizer"), vocab_size=400, model_type="bpe",
      split_digits=True, byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
      normalization_rule_name="identity", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
  os.remove(corpus)
  os.remove(os.path.join(path, "tokenizer.vocab"))
  cfg = tr.LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                       rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
  torch.manual_seed(seed)
  tr.LlamaForCausalLM(cfg).eval().save_pretrained(path)
  return path


def run(*args):
  """`python -m apr_jax.run ARGS`: its JSON object with --json, else (stdout, stderr)."""
  env = dict(os.environ, APR_JAX_CACHE_DIR="off", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  p = subprocess.run([sys.executable, "-m", "apr_jax.run", *args], capture_output=True, text=True,
                     cwd=ROOT, env=env, timeout=300)
  assert p.returncode == 0, p.stderr
  return json.loads(p.stdout) if "--json" in args else (p.stdout, p.stderr)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  d = tmp_path_factory.mktemp("originals")
  return {"threadweaver": make_checkpoint(str(d / "qwen3_tw"), "qwen3", THREADWEAVER_TAGS),
          "multiverse": make_checkpoint(str(d / "qwen2_mv"), "qwen2", MULTIVERSE_TAGS),
          "apr": make_apr_checkpoint(str(d / "llama_apr"))}


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
  # without --json: the text on stdout, the thread tree and the summary line on stderr
  out, err = run("--model", path, "--protocol", "multiverse", "--prompt", "What is 12+30?",
                 "--assistant_prefix", prefix, "--max_new_tokens", "4")
  assert "<Path>\n2.1:" in out and "thread tree [0]:" in err, err
  tree = err.split("thread tree [0]:")[1].splitlines()[1:4]
  assert [l.split()[:4] for l in tree] == [["T0", "root", "parent", "-1"], ["T1", "1", "parent", "0"],
                                           ["T2", "2", "parent", "0"]], err
  assert "critical path" in err and "forks" in err, err


APR_PROMPT = "Moving to Node #0\nCurrent State: 39:[51, 49, 25, 36], Operations: []"


def test_apr_original_on_a_llama_sentencepiece_checkpoint(checkpoints):
  """From `run`, on device and with the host's orchestration (`--apr_host`): every tag is
  plain text, several pieces; a random model writes no spawn block, so the search is one
  call that runs to its budget."""
  from apr_jax.tokenizer import load_tokenizer
  tok = load_tokenizer(checkpoints["apr"])
  assert len(tok.encode("<End Calling Sub Searches>")) > 3 and tok.bos_id == 1
  d = run("--model", checkpoints["apr"], "--protocol", "apr", "--prompt", APR_PROMPT,
          "--max_new_tokens", "12", "--json", "--apr_host")
  assert d["protocol"] == "apr" and d["error"] == "" and d["stats"]["calls"] == 1
  assert len(d["calls"]) == 1 and d["calls"][0].startswith(APR_PROMPT) and d["children"] == 0
  # on device (the default): the same one call, to its budget
  e = run("--model", checkpoints["apr"], "--protocol", "apr", "--prompt", APR_PROMPT,
          "--max_new_tokens", "12", "--json")
  assert e["protocol"] == "apr" and e["error"] == "" and e["result"] is None
  assert e["stop_reason"] == "length" and e["total_tokens"] == 12 and e["forks"] == 0
  assert APR_PROMPT + e["text"] == d["calls"][0]  # greedy: the host's call, token for token


def test_apr_original_host_spawns_and_joins_through_the_tokenizer(checkpoints):
  """The host orchestration with a scripted model behind the Generator's interface (its
  tokens are the tokenizer's own spelling of the original solver's text): the same search
  as the text-level reference, calls batched per round, every call's text tokenized afresh
  after BOS."""
  import random
  import zlib

  from apr_jax import checkpoint
  from apr_jax.engine.host_original import AprOriginalHost
  from apr_jax.protocols import reference as ref
  from apr_jax.tasks import countdown as cd
  from apr_jax.tasks.countdown import original as orig
  model, tok = checkpoint.load(checkpoints["apr"])
  rng = random.Random(zlib.crc32(b"apr_host"))
  traces = [orig.solve_apr_original(p, rng) for p in cd.generate(cd.APR, 6, seed=7)]
  assert sum(len(t.children) for t in traces) >= 2
  texts = [x for t in traces for x in t.calls + [k for spawn in t.children for k in spawn]]

  def script(prefix):  # the text-level model: the rest of the one text that goes on from here
    hits = {t[len(prefix):] for t in texts if t.startswith(prefix) and "<End Sub Searches>" not in t[len(prefix):]}
    assert len(hits) == 1, prefix
    return hits.pop()

  host = AprOriginalHost(model, tok, max_tokens=4096, batch=4, log=lambda s: None)
  sizes = []

  def generate_ids(rows, max_new_tokens, **kw):
    import numpy as np
    sizes.append(len(rows))
    out = np.zeros((len(rows), max_new_tokens), np.int32)
    n, done = np.zeros(len(rows), np.int32), np.ones(len(rows), bool)
    for r, ids in enumerate(rows):
      assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
      text = tok.decode(ids[1:])
      full = tok.encode(text + script(text))
      gen = full[len(ids) - 1:] + [tok.eos_id]
      assert full[:len(ids) - 1] == ids[1:]  # the text's own tokens come first
      out[r, :len(gen)], n[r] = gen, len(gen)
    return out, n, done

  host.gen.generate_ids = generate_ids
  got = host.solve([t.prompt for t in traces])
  want = [ref.apr_search(t.prompt, script) for t in traces]
  assert got == want
  assert all(s <= 4 and s & (s - 1) == 0 for s in sizes)  # batches of at most 4, powers of two
  assert host.calls == sum(len(s.calls) + sum(len(k) for k in s.sub_calls) for s in want)
  # the evaluation scores them as the original does, with the original's accounting
  from apr_jax.evaluation import accounting
  from apr_jax.evaluation import countdown as ev
  rs = ev.evaluate_apr_original(host, tok, [cd.generate(cd.APR, 6, seed=7)[i] for i in range(6)],
                                log=lambda s: None)
  n = lambda x: len(tok.encode(x))
  for t, s, r in zip(traces, want, rs):
    assert r.correct == t.solved and r.forks == len(t.children)
    subs = [k for spawn in s.sub_calls for k in spawn]
    assert r.apr_tokens == accounting.apr_token_counts(s.calls, subs, n)["token_count"]
    assert 0 < r.critical_path <= r.total_tokens < r.apr_tokens
  assert sum(r.correct for r in rs) >= 2


def test_apr_original_evaluation_from_the_cli(checkpoints, tmp_path):
  env = dict(os.environ, APR_JAX_CACHE_DIR="off", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  p = subprocess.run([sys.executable, "-m", "apr_jax.eval", "--config", "configs/eval_apr_original.py",
                      f"--config.methods.apr.path={checkpoints['apr']}", "--config.max_call_tokens=8",
                      "--num_problems", "2", "--out", str(tmp_path / "d"), "--config.lanes=1",
                      "--config.slots=1024"],
                     capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert p.returncode == 0, p.stderr
  m = json.load(open(tmp_path / "d" / "results.json"))["methods"]["apr"]
  # on device (the config's default): one call each, to its budget (a random model)
  assert m["engine"] == "apr_device" and m["problems"] == 2 and m["accuracy"] == 0.0
  assert 0 < m["total_tokens_mean"] <= 8 < m["apr_tokens_mean"]
  p = subprocess.run([sys.executable, "-m", "apr_jax.eval", "--config", "configs/eval_apr_original.py",
                      f"--config.methods.apr.path={checkpoints['apr']}", "--config.max_call_tokens=8",
                      "--config.methods.apr.engine=apr_original",
                      "--num_problems", "2", "--out", str(tmp_path)],
                     capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert p.returncode == 0, p.stderr
  m = json.load(open(tmp_path / "results.json"))["methods"]["apr"]
  assert m["engine"] == "apr_original" and m["problems"] == 2 and m["accuracy"] == 0.0
  assert m["model_calls"] == 2 and m["apr_tokens_mean"] > m["total_tokens_mean"] > 0


def test_apr_original_calls_near_the_context_end(checkpoints):
  """A call whose text leaves less context than its budget gets what is left (in the same
  batch as a call with the whole budget); a call whose text fills the context ends at once."""
  from apr_jax import checkpoint
  from apr_jax.engine.host_original import AprOriginalHost
  model, tok = checkpoint.load(checkpoints["apr"])
  ctx = model.cfg.max_seq_len
  piece = "Moving to Node #0\n"
  per = len(tok.encode(piece * 50)) / 50
  k = int(ctx / per) + 2
  while len(tok.encode(piece * k)) > ctx - 2:  # the most copies that leave a token after BOS
    k -= 1
  near = piece * k
  left = ctx - 1 - len(tok.encode(near))
  assert 0 < left < 16
  full = piece * int(ctx / per + 5)
  host = AprOriginalHost(model, tok, max_tokens=16, log=lambda s: None)
  out = host.complete_batch([near, "Moving to", full])
  assert out[2] == "" and host.cut == 2 and host.calls == 2
  assert len(tok.encode(near + out[0])) <= ctx - 1
  assert len(tok.encode("Moving to" + out[1])) > len(tok.encode("Moving to"))


def test_apr_original_batch_stops_at_the_stop_string(checkpoints, monkeypatch):
  """A batch stops decoding once every row has written the stop string (checked every
  `segment` steps), not at its budget; the text up to it is what a full run gives."""
  from apr_jax import checkpoint
  from apr_jax.engine.host_original import AprOriginalHost
  from apr_jax.protocols import reference as ref
  model, tok = checkpoint.load(checkpoints["apr"])
  host = AprOriginalHost(model, tok, max_tokens=64, segment=4, log=lambda s: None)
  full = host.complete_batch([APR_PROMPT])[0]
  assert host.gen.stats["decode_steps"] >= 60
  stop = full[2:5]  # something the random model writes early (the real one: `<Sub Searches>`)
  assert len(stop) == 3
  monkeypatch.setattr(ref, "APR_STOP", stop)
  early = host.complete_batch([APR_PROMPT])[0]
  assert host.gen.stats["decode_steps"] < 20
  cut = full.index(stop) + len(stop)
  assert early[:cut] == full[:cut]


def test_generator_stop_strings_end_each_row_where_its_text_holds_one(checkpoints):
  """Stop strings matched on device (sentencepiece pieces, leading spaces, strings split
  across pieces) end each row in the token whose text completes one, against a host search
  of the decoded text of every prefix of the same greedy run without stop strings."""
  from apr_jax import checkpoint
  from apr_jax.engine.generate import Generator
  model, tok = checkpoint.load(checkpoints["apr"])
  gen = Generator(model, tok)
  prompts = [APR_PROMPT, "Moving to Node #0,1\nCurrent State: 12:[3, 4]"]
  full = gen.generate(prompts, chat="off", max_new_tokens=40)
  texts = [r.text for r in full]
  assert all(len(t) > 30 for t in texts), texts
  # strings each row writes late, one spanning a piece boundary (decoded text, not pieces)
  stops = [texts[0][20:24], texts[1][25:28], "no such text \x01"]
  out = gen.generate(prompts, chat="off", max_new_tokens=40, stop_strings=stops)
  for r, (f, o) in enumerate(zip(full, out)):
    ids = f.token_ids
    end = next((k + 1 for k in range(len(ids))
                if any(s in tok.decode(ids[:k + 1]) for s in stops)), None)
    assert end is not None
    assert o.token_ids == ids[:end], r
    assert o.stop_reason == "stop"
    first = min(texts[r].find(s) for s in stops if s in texts[r])
    assert o.text == texts[r][:first]
    assert not any(s in o.text for s in stops)
  # no stop string written: the run is unchanged
  same = gen.generate(prompts, chat="off", max_new_tokens=40, stop_strings=["no such text \x01"])
  assert [r.token_ids for r in same] == [r.token_ids for r in full]
  assert [r.stop_reason for r in same] == [r.stop_reason for r in full]


def test_run_stop_strings_cut_the_text_before_them(checkpoints):
  """`run --stop` (repeatable): the text ends before the first stop string written, the
  tokens end with the one that completed it, stop reason "stop"; text mode prints the same."""
  base = ["--model", checkpoints["apr"], "--prompt", APR_PROMPT, "--chat=off",
          "--max_new_tokens", "40"]
  full = run(*base, "--json")
  text = full["text"]
  assert len(text) > 30
  a, b = text[22:26], text[12:15]
  out = run(*base, "--json", "--stop", a, "--stop", b)
  assert out["text"] == text[:text.find(b)] and out["stop_reason"] == "stop"
  assert out["token_ids"] == full["token_ids"][:len(out["token_ids"])]
  assert len(out["token_ids"]) < len(full["token_ids"])
  stdout, _ = run(*base, "--stop", a, "--stop", b)
  assert stdout.rstrip("\n") == out["text"].rstrip("\n")


def test_bench_apr_device_and_host_agree(checkpoints, tmp_path):
  """`bench apr`: the original protocol on device and by the host's orchestration, greedy,
  give the same calls on the same problems (a random model: one call each, to its budget)."""
  env = dict(os.environ, APR_JAX_CACHE_DIR="off", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  out = tmp_path / "b.json"
  p = subprocess.run([sys.executable, "-m", "apr_jax.bench", "apr", "--model", checkpoints["apr"],
                      "--problems", "3", "--repeats", "1", "--apr_call_tokens", "10",
                      "--apr_slots", "512", "--lanes", "2", "--out", str(out)],
                     capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert p.returncode == 0, p.stderr
  recs = json.load(open(out))
  assert [r["system"] for r in recs] == ["apr_jax", "host"]
  assert all(r["problems"] == 3 and r["same_as_other"] == 3 and r["problems_per_s"] > 0 for r in recs)
