"""Tokenizers behind one interface.

Backends: a Hugging Face `tokenizer.json` (the `tokenizers` library), the GPT-2 style BPE
vocab + merges embedded in a GGUF file (rebuilt as a `tokenizers` BPE with llama.cpp's
pre-tokenizer for that model), and sentencepiece `.model` files.

Tokens added later (the protocol tags) live in this wrapper, not in the backend: text is
split on them first, so every backend gets them as single ids, and `save()` records them.
"""
from __future__ import annotations

import json
import os
import re
from typing import Sequence

from apr_jax.errors import UserError
from apr_jax.tokenizer import chat as chatlib


class Tokenizer:
  """Common interface. Subclasses implement `_encode`, `_decode`, `_vocab_size`, `_piece_id`."""

  chat_template: str | None = None
  bos_token: str | None = None
  eos_token: str | None = None

  def __init__(self):
    self.added: dict[str, int] = {}  # text -> id, tokens added on top of the backend
    self._added_re = None

  # ---- backend hooks
  def _encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def _decode(self, ids: Sequence[int], skip_special: bool) -> str:
    raise NotImplementedError

  def _vocab_size(self) -> int:
    raise NotImplementedError

  def _piece_id(self, piece: str) -> int | None:
    raise NotImplementedError

  # ---- public API
  @property
  def vocab_size(self) -> int:
    return self._vocab_size() + len(self.added)

  def token_id(self, piece: str) -> int | None:
    """Id of a single token given its text (added tokens first), or None."""
    if piece in self.added:
      return self.added[piece]
    return self._piece_id(piece)

  @property
  def bos_id(self) -> int | None:
    return self.token_id(self.bos_token) if self.bos_token else None

  @property
  def eos_id(self) -> int | None:
    return self.token_id(self.eos_token) if self.eos_token else None

  def stop_ids(self) -> list[int]:
    """Ids that end a generation: EOS plus the chat end-of-turn token if there is one."""
    ids = []
    for t in (self.eos_token, "<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
      i = self.token_id(t) if t else None
      if i is not None and i not in ids:
        ids.append(i)
    return ids

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = [self.bos_id] if add_bos and self.bos_id is not None else []
    if not self.added:
      return ids + self._encode(text)
    pos = 0
    for m in self._added_re.finditer(text):
      if m.start() > pos:
        ids += self._encode(text[pos:m.start()])
      ids.append(self.added[m.group(0)])
      pos = m.end()
    if pos < len(text):
      ids += self._encode(text[pos:])
    return ids

  def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
    base = self._vocab_size()
    rev = {v: k for k, v in self.added.items()}
    out, run = [], []
    for i in ids:
      i = int(i)
      if i >= base:
        if run:
          out.append(self._decode(run, skip_special))
          run = []
        if i in rev and not skip_special:
          out.append(rev[i])
      else:
        run.append(i)
    if run:
      out.append(self._decode(run, skip_special))
    return "".join(out)

  def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
    """Adds `tokens` (if new) as single ids after the current vocab. Returns their ids."""
    ids = []
    for t in tokens:
      if t in self.added:
        ids.append(self.added[t])
        continue
      pid = self._piece_id(t)
      if pid is not None and self._encode(t) == [pid]:  # already one token of the backend
        ids.append(pid)
        continue
      if pid is not None:  # a backend piece its encoder cannot produce from text (e.g. a
        self.added[t] = pid  # sentencepiece user symbol with a space): route text to it
        ids.append(pid)
        continue
      self.added[t] = self.vocab_size
      ids.append(self.added[t])
    if self.added:
      alts = sorted(self.added, key=len, reverse=True)
      self._added_re = re.compile("|".join(re.escape(a) for a in alts))
    return ids

  def apply_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    return chatlib.render(self.chat_template, messages, add_generation_prompt,
                          bos_token=self.bos_token or "", eos_token=self.eos_token or "")

  def save_extra(self, path: str):
    with open(os.path.join(path, "apr_tokenizer.json"), "w") as f:
      json.dump({"added": self.added, "chat_template": self.chat_template,
                 "bos_token": self.bos_token, "eos_token": self.eos_token}, f, indent=1)

  def load_extra(self, path: str):
    p = os.path.join(path, "apr_tokenizer.json")
    if os.path.exists(p):
      with open(p) as f:
        d = json.load(f)
      self.chat_template = d.get("chat_template", self.chat_template)
      self.bos_token = d.get("bos_token", self.bos_token)
      self.eos_token = d.get("eos_token", self.eos_token)
      added = d.get("added") or {}
      for t in sorted(added, key=added.get):
        self.add_special_tokens([t])


class HFTokenizer(Tokenizer):
  """A `tokenizers.Tokenizer` (from tokenizer.json or rebuilt from GGUF)."""

  def __init__(self, tok, *, chat_template=None, bos_token=None, eos_token=None):
    super().__init__()
    self.tok = tok
    self.chat_template = chat_template
    self.bos_token = bos_token
    self.eos_token = eos_token

  def _encode(self, text):
    return self.tok.encode(text, add_special_tokens=False).ids

  def _decode(self, ids, skip_special):
    return self.tok.decode(list(ids), skip_special_tokens=skip_special)

  def _vocab_size(self):
    return self.tok.get_vocab_size(with_added_tokens=True)

  def _piece_id(self, piece):
    return self.tok.token_to_id(piece)

  def save(self, path: str):
    os.makedirs(path, exist_ok=True)
    self.tok.save(os.path.join(path, "tokenizer.json"))
    self.save_extra(path)

  @classmethod
  def from_dir(cls, path: str) -> "HFTokenizer":
    from tokenizers import Tokenizer as _T
    tj = os.path.join(path, "tokenizer.json")
    try:
      tok = _T.from_file(tj)
    except Exception as e:
      raise UserError(f"cannot read tokenizer {tj}: {e}") from None
    cfg = {}
    tc = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(tc):
      try:
        with open(tc) as f:
          cfg = json.load(f)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"corrupt {tc}: {e}") from None
    template = cfg.get("chat_template")
    jt = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.exists(jt):
      with open(jt) as f:
        template = f.read()
    tok_text = lambda x: x.get("content") if isinstance(x, dict) else x
    out = cls(tok, chat_template=template, bos_token=tok_text(cfg.get("bos_token")),
              eos_token=tok_text(cfg.get("eos_token")))
    out.load_extra(path)
    return out


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


class SentencePieceTokenizer(Tokenizer):

  def __init__(self, model_file: str):
    super().__init__()
    import sentencepiece as spm
    self.model_file = model_file
    try:
      self.sp = spm.SentencePieceProcessor(model_file=model_file)
    except (OSError, RuntimeError) as e:
      raise UserError(f"cannot read sentencepiece model {model_file}: {e}") from None
    piece = lambda i: self.sp.id_to_piece(i) if i >= 0 else None
    self.bos_token = piece(self.sp.bos_id())
    self.eos_token = piece(self.sp.eos_id())

  def _encode(self, text):
    return self.sp.encode(text)

  def _decode(self, ids, skip_special):
    return self.sp.decode(list(ids))

  def _vocab_size(self):
    return self.sp.get_piece_size()

  def _piece_id(self, piece):
    i = self.sp.piece_to_id(piece)
    return i if i != self.sp.unk_id() or piece == self.sp.id_to_piece(self.sp.unk_id()) else None

  def save(self, path: str):
    import shutil
    os.makedirs(path, exist_ok=True)
    dst = os.path.join(path, "tokenizer.model")
    if os.path.abspath(self.model_file) != os.path.abspath(dst):
      shutil.copy(self.model_file, dst)
    self.save_extra(path)


def load_tokenizer(path: str) -> Tokenizer:
  """A tokenizer from a directory (tokenizer.json or tokenizer.model), a .model or a .gguf file."""
  if path.endswith(".gguf"):
    from apr_jax.checkpoint.gguf_io import GGUFFile
    return from_gguf(GGUFFile(path))
  if path.endswith(".model"):
    return SentencePieceTokenizer(path)
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, "tokenizer.json")):
      return HFTokenizer.from_dir(path)
    if os.path.exists(os.path.join(path, "tokenizer.model")):
      t = SentencePieceTokenizer(os.path.join(path, "tokenizer.model"))
      t.load_extra(path)
      return t
    raise UserError(f"no tokenizer.json or tokenizer.model in {path}")
  raise UserError(f"tokenizer not found: {path}")
