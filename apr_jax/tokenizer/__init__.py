"""Tokenizers behind one interface (`base.Tokenizer`).

Backends: a Hugging Face `tokenizer.json` (`hf`), the BPE embedded in a GGUF file (`gguf`)
and sentencepiece `.model` files (`spm`); chat templates in `chat`.
"""
from __future__ import annotations

import os

from apr_jax.errors import UserError
from apr_jax.tokenizer.base import Tokenizer
from apr_jax.tokenizer.gguf import from_gguf
from apr_jax.tokenizer.hf import HFTokenizer
from apr_jax.tokenizer.spm import SentencePieceTokenizer

__all__ = ["Tokenizer", "HFTokenizer", "SentencePieceTokenizer", "from_gguf", "load_tokenizer"]


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
