"""The GPT-2 style BPE vocab + merges embedded in a GGUF file, rebuilt as a `tokenizers` BPE
with llama.cpp's pre-tokenizer for that model (`tokenizer.ggml.pre`)."""
from __future__ import annotations

from apr_jax.errors import UserError
from apr_jax.tokenizer.hf import HFTokenizer

# llama.cpp pre-tokenizer regexes (llama-vocab.cpp), by `tokenizer.ggml.pre`.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGIT_FIRST = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")


def _gguf_pretokenizer(pre: str | None):
  from tokenizers import Regex, pre_tokenizers as pt
  byte = lambda rx: pt.ByteLevel(add_prefix_space=False, use_regex=rx)
  if pre in _DIGIT_FIRST:
    return pt.Sequence([pt.Digits(individual_digits=True), byte(True)])
  if pre in ("llama-bpe", "llama3", "smaug-bpe"):
    return pt.Sequence([pt.Split(Regex(_LLAMA3_RE), behavior="isolated"), byte(False)])
  if pre in ("qwen2", "deepseek-r1-qwen"):
    return pt.Sequence([pt.Split(Regex(_QWEN2_RE), behavior="isolated"), byte(False)])
  return byte(True)  # gpt2 default


def from_gguf(g) -> HFTokenizer:
  """Rebuilds the GGUF's embedded BPE (tokenizer.ggml.model == 'gpt2') as a `tokenizers` BPE."""
  from tokenizers import AddedToken, Tokenizer as _T, decoders, models
  model = g.get("tokenizer.ggml.model")
  if model != "gpt2":
    raise UserError(f"GGUF tokenizer model {model!r} is not supported (only BPE 'gpt2'); "
                    "pass a tokenizer.json or sentencepiece .model with --tokenizer")
  tokens = g.get("tokenizer.ggml.tokens")
  merges = g.get("tokenizer.ggml.merges")
  if not tokens or merges is None:
    raise UserError(f"GGUF file {g.path} has no embedded vocab/merges")
  vocab = {t: i for i, t in enumerate(tokens)}
  pairs = [tuple(m.split(" ", 1)) for m in merges]
  tok = _T(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
  tok.pre_tokenizer = _gguf_pretokenizer(g.get("tokenizer.ggml.pre"))
  tok.decoder = decoders.ByteLevel()
  types = g.get("tokenizer.ggml.token_type") or []
  special = [AddedToken(tokens[i], special=True, normalized=False)
             for i, ty in enumerate(types) if ty in (3, 4)]  # CONTROL, USER_DEFINED
  if special:
    tok.add_special_tokens(special)
  name = lambda key: tokens[g.get(key)] if g.get(key) is not None else None
  return HFTokenizer(tok, chat_template=g.get("tokenizer.chat_template"),
                     bos_token=name("tokenizer.ggml.bos_token_id"),
                     eos_token=name("tokenizer.ggml.eos_token_id"))
