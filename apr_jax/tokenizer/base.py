"""The tokenizer interface shared by every backend, and tokens added on top of a backend.

Tokens added later (the protocol tags) live in this wrapper, not in the backend: text is
split on them first, so every backend gets them as single ids, and `save_extra()` records
them (with the chat template and BOS/EOS) in `apr_tokenizer.json`.
"""
from __future__ import annotations

import json
import os
import re
from typing import Sequence

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

  def token_texts(self) -> list[str]:
    """The text of every token as it reads inside a sequence (a sentencepiece piece's leading
    space kept: each is decoded after an anchor token, whose text is then removed)."""
    cache = getattr(self, "_texts", None)
    if cache is not None and len(cache) == self.vocab_size:
      return cache
    anchor = self._encode("a")[-1:]
    head = self.decode(anchor)
    texts = []
    for i in range(self.vocab_size):
      t = self.decode(anchor + [i])
      texts.append(t[len(head):] if t.startswith(head) else t)
    self._texts = texts
    return texts

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
