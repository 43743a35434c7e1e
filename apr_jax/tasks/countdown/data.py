"""Countdown trajectories as token ids: a sentencepiece tokenizer trained on the traces, and
each format turned into (prompt ids, per-thread sampled ids, protocol) - exactly the token
stream the engine's protocol expects, so training packs what inference will run."""
from __future__ import annotations

import os
import random
import tempfile
import zlib
from typing import Sequence

from apr_jax.errors import UserError
from apr_jax.protocols import TAGS, Protocol, build
from apr_jax.tasks import countdown as cd
from apr_jax.tasks.countdown import original

FORMATS = ("sos", "apr_tok", "threadweaver", "multiverse", "sos_original", "apr_original")
# the protocol a model trained on each format runs with (`run --protocol`): "apr" is the
# original APR, "apr_tok" its single-token variant
PROTOCOL_OF = {"sos": "none", "apr_tok": "apr_tok", "threadweaver": "threadweaver",
               "multiverse": "multiverse", "sos_original": "none", "apr_original": "apr"}
SEQUENTIAL = ("sos", "sos_original")
ALL_TAGS = tuple(dict.fromkeys(TAGS["apr_tok"] + TAGS["threadweaver"] + TAGS["multiverse"]))
# "apr_original": the original's calls, each one plain sequence in the tokenizer's own
# vocabulary (its tags are text, nothing is added), run by the original's orchestration
# (`engine.host_original`); every call is trained as it is sent (`sequences`).
CALLS = ("apr_original",)


def tags_for(fmt: str) -> tuple:
  """The tags a format's tokenizer holds as single tokens."""
  return () if check_format(fmt) in CALLS else ALL_TAGS


def train_tokenizer(texts: Sequence[str], out_dir: str, vocab_size: int = 320, tags=ALL_TAGS):
  """BPE sentencepiece on the trace lines: the protocol `tags` and newline as user-defined
  symbols, digits split, no normalisation (text round-trips exactly). Saved as
  out_dir/tokenizer.model; returns the loaded tokenizer."""
  import sentencepiece as spm
  from apr_jax.tokenizer import SentencePieceTokenizer
  os.makedirs(out_dir, exist_ok=True)
  lines = [l for t in texts for l in t.split("\n") if l]
  with tempfile.TemporaryDirectory() as tmp:
    prefix = os.path.join(tmp, "sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        user_defined_symbols=list(tags) + ["\n"], split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, num_threads=2,
        minloglevel=2, hard_vocab_limit=False)
    with open(prefix + ".model", "rb") as f:
      data = f.read()
  path = os.path.join(out_dir, "tokenizer.model")
  with open(path, "wb") as f:
    f.write(data)
  tok = SentencePieceTokenizer(path)
  if tags:
    tok.add_special_tokens(tags)  # multi-word tags: text is split at them before sentencepiece
  tok.save(out_dir)
  return tok


def check_format(fmt: str) -> str:
  if fmt == "apr":
    raise UserError("the Countdown format 'apr' is named 'apr_tok' (single-token tags, the "
                    "apr_tok protocol); the original APR format is 'apr_original'")
  if fmt not in FORMATS:
    raise UserError(f"unknown Countdown format {fmt!r}; choose from {', '.join(FORMATS)}")
  return fmt


def protocol_for(fmt: str, tok) -> Protocol:
  """The tree-engine protocol a format's sequences are trained and decoded with: a calls
  format's every call is one plain sequence (Protocol "none"; the original's orchestration,
  `PROTOCOL_OF[fmt]`, joins them)."""
  return build("none" if check_format(fmt) in CALLS else PROTOCOL_OF[fmt], tok)


def checkpoint_format(extra: dict) -> tuple[str, str]:
  """(format, protocol) an apr_jax checkpoint's `apr_config.json` records. Checkpoints saved
  before the single-token APR variant was named apr_tok record format "apr" (then the only
  APR format); they mean apr_tok, so they are read as such (the name "apr" now means the
  original protocol)."""
  fmt = extra.get("format", "sos")
  if fmt == "apr":
    return "apr_tok", "apr_tok"
  if fmt not in FORMATS:
    raise UserError(f"the checkpoint records an unknown Countdown format {fmt!r} "
                    f"(known: {', '.join(FORMATS)})")
  return fmt, PROTOCOL_OF[fmt]


def read_checkpoint(path: str) -> dict:
  """An apr_jax Countdown checkpoint's `apr_config.json`, its format and protocol read by
  `checkpoint_format`; a clear error for a directory without one."""
  import json
  try:
    with open(os.path.join(path, "apr_config.json")) as f:
      extra = json.load(f)
  except (OSError, ValueError):
    raise UserError(f"{path} is not an apr_jax Countdown checkpoint (it has no readable "
                    "apr_config.json)") from None
  extra["format"], extra["protocol"] = checkpoint_format(extra)
  return extra


def prompt_text(fmt: str, p: cd.Problem) -> str:
  """The prompt a model trained on `fmt` reads: the original SoS+ prompt (numbers as drawn,
  no newline) for `sos_original`, the original APR root prompt for `apr_original`, else
  `Current State: ...` with sorted numbers."""
  if fmt == "sos_original":
    return original.sos_prompt(p)
  return original.apr_prompt(p) if fmt == "apr_original" else cd.prompt_text(p)


def original_rng(p: cd.Problem) -> random.Random:
  """The random stream of the original solver for one problem (beam width, child order):
  fixed by the problem, so a problem's trace is the same in every run."""
  return random.Random(zlib.crc32(repr((p.nums, p.target)).encode()))


def encode(tok, fmt: str, problem: cd.Problem, setting: cd.Setting = cd.SMALL):
  """(prompt ids, scripts {thread path: sampled ids}, solved) for one problem."""
  bos, eos = tok.bos_id, tok.eos_id
  if check_format(fmt) in CALLS:
    raise UserError(f"the {fmt} format is one sequence per call, not one trajectory: use "
                    "data.sequences")
  if fmt in SEQUENTIAL:
    prompt, completion, solved = (cd.solve_sos(problem, setting) if fmt == "sos" else
                                  original.solve_sos_original(problem, original_rng(problem)))
    return [bos] + tok.encode(prompt), {(): tok.encode(completion) + [eos]}, solved
  tr = cd.solve_parallel(problem, fmt, setting)
  scripts = {(): tok.encode(tr.threads[()]) + [eos]}
  for path, text in tr.threads.items():
    if path:
      scripts[path] = tok.encode(text) + ([eos] if fmt == "apr_tok" else [])
  return [bos] + tok.encode(tr.prompt), scripts, tr.solved


def sequences(tok, fmt: str, problem: cd.Problem, setting: cd.Setting = cd.SMALL):
  """([(prompt ids, scripts)], solved): every sequence one problem trains on. One for a
  trajectory format (`encode`); for `apr_original` one per call of the original's search
  (the root's calls, then every child), each BOS + the text the call was given as its
  prompt, and the text the model wrote + EOS as its only thread, tokenized as the original
  orchestration sends and reads it (`engine.host_original`)."""
  if check_format(fmt) not in CALLS:
    prompt, scripts, solved = encode(tok, fmt, problem, setting)
    return [(prompt, scripts)], solved
  t = original.solve_apr_original(problem, original_rng(problem))
  bos = [] if tok.bos_id is None else [tok.bos_id]
  return [(bos + tok.encode(ctx), {(): tok.encode(text[len(ctx):]) + [tok.eos_id]})
          for ctx, text in t.sequences()], t.solved


def texts_for_tokenizer(problems, setting: cd.Setting = cd.SMALL, fmt: str = "") -> list[str]:
  """Traces of every apr_jax format (and of `fmt`, an original one) to train a tokenizer on;
  for `apr_original` its calls only (a tokenizer of the original's plain text)."""
  out = []
  if fmt == "apr_original":
    return [text for p in problems
            for _, text in original.solve_apr_original(p, original_rng(p)).sequences()]
  for p in problems:
    if fmt == "sos_original":
      out.append("".join(original.solve_sos_original(p, original_rng(p))[:2]))
    prompt, completion, _ = cd.solve_sos(p, setting)
    out.append(prompt + completion)
    for parallel in ("apr_tok", "threadweaver"):
      out.extend(cd.solve_parallel(p, parallel, setting).threads.values())
  return out
