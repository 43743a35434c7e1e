"""A Hugging Face `tokenizer.json` (the `tokenizers` library) behind the common interface."""
from __future__ import annotations

import json
import os

from apr_jax.errors import UserError
from apr_jax.tokenizer.base import Tokenizer


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
