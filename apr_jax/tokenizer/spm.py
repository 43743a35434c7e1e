"""Sentencepiece `.model` files behind the common interface."""
from __future__ import annotations

import os

from apr_jax.errors import UserError
from apr_jax.tokenizer.base import Tokenizer


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
