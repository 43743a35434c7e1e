"""Text tags found in the token stream on device, whatever the tokens that spell them.

The originals' plain-text tags (APR's `<End Calling Sub Searches>`, a stop string) are
several tokens each, and a tokenizer can spell the same text in many ways: `<` alone after
a newline but `▁<` after a space, the tag split across pieces or merged with the text next
to it. Matching a token sequence would miss every spelling but one. The matcher reads what
the tokens decode to instead: a Knuth-Morris-Pratt automaton over the tag's bytes, moved
on by a whole token at a time through tables precomputed on the host:

  nxt[state, token]  the automaton's state after the token's bytes
  hit[state, token]  the tag's last byte fell inside the token (the tag ends in it)

`state` is how many of the tag's bytes the text read so far ends with (0..len). On device a
step is one gather per tag (`advance`), so a thread's text is matched as the originals'
stop strings match decoded text: at every occurrence, overlapping ones included, inside a
token or across tokens. What "a token's bytes" means: its text as it reads inside a
sequence (`Tokenizer.token_texts`: a sentencepiece piece keeps its leading space), UTF-8
encoded; a piece holding part of a multi-byte character reads as U+FFFD, so tags are exact
for ASCII text (the originals' tags are). The tables hold (len + 1) x vocab entries per tag
(int32: 5 MB for a 27-byte tag over a 49k vocabulary).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from apr_jax.errors import UserError


def _byte_automaton(tag: bytes) -> np.ndarray:
  """delta[state, byte] of the KMP automaton of `tag` (states 0..len; state len: a match)."""
  n = len(tag)
  fail = [0] * (n + 1)
  k = 0
  for i in range(1, n):
    while k and tag[i] != tag[k]:
      k = fail[k]
    k += tag[i] == tag[k]
    fail[i + 1] = k
  delta = np.zeros((n + 1, 256), np.int32)
  delta[0, tag[0]] = 1
  for s in range(1, n + 1):
    delta[s] = delta[fail[s]]
    if s < n:
      delta[s, tag[s]] = s + 1
  return delta


def token_tables(tag: str, token_texts: Sequence[str], offsets: bool = False):
  """(nxt [len+1, V] int32, hit [len+1, V] bool) of one tag over a vocabulary; with
  `offsets`, also at [len+1, V] int32: the token's bytes up to the tag's first end in it (0:
  it ends in none)."""
  b = tag.encode("utf-8")
  if not b:
    raise UserError("a text tag must not be empty")
  delta = _byte_automaton(b)
  data = [t.encode("utf-8") for t in token_texts]
  lens = np.array([len(d) for d in data], np.int64)
  width = max(int(lens.max(initial=0)), 1)
  mat = np.zeros((len(data), width), np.int64)
  for i, d in enumerate(data):
    mat[i, :len(d)] = np.frombuffer(d, np.uint8)
  state = np.broadcast_to(np.arange(len(b) + 1)[:, None], (len(b) + 1, len(data))).copy()
  hit = np.zeros(state.shape, bool)
  at = np.zeros(state.shape, np.int32)
  for j in range(width):  # every token's j-th byte at once, from every start state
    live = (j < lens)[None, :]
    moved = delta[state, mat[None, :, j]]
    state = np.where(live, moved, state)
    done = live & (moved == len(b))
    at = np.where(done & ~hit, j + 1, at)
    hit |= done
  if offsets:
    return state.astype(np.int32), hit, at
  return state.astype(np.int32), hit


@dataclasses.dataclass(frozen=True, eq=False)
class TextMatcher:
  """Tags as text; `init(shape)` the start state, `advance(state, tokens)` on device."""
  tags: tuple
  nxt: np.ndarray      # [n_tags, max_len + 1, V] int32 (rows past a tag's length unused)
  hit: np.ndarray      # [n_tags, max_len + 1, V] bool

  @classmethod
  def build(cls, tags: Sequence[str], token_texts: Sequence[str]) -> "TextMatcher":
    if not tags:
      raise UserError("a text matcher needs at least one tag")
    tabs = [token_tables(t, token_texts) for t in tags]
    rows = max(n.shape[0] for n, _ in tabs)
    nxt = np.zeros((len(tags), rows, len(token_texts)), np.int32)
    hit = np.zeros(nxt.shape, bool)
    for i, (n, h) in enumerate(tabs):
      nxt[i, :n.shape[0]], hit[i, :h.shape[0]] = n, h
    return cls(tuple(tags), nxt, hit)

  def init(self, shape=()):
    import jax.numpy as jnp
    return jnp.zeros(tuple(shape) + (len(self.tags),), jnp.int32)

  def advance(self, state, tokens, valid=None):
    """state [..., n_tags], tokens [...] -> (state, hit [..., n_tags]): each tag's state
    after the token and whether the tag ends in it. Rows with `valid` False keep their
    state and hit nothing (a row that wrote no token this step)."""
    import jax.numpy as jnp
    nxt, hit = jnp.asarray(self.nxt), jnp.asarray(self.hit)
    tag = jnp.arange(len(self.tags))
    tok = jnp.clip(tokens, 0, nxt.shape[2] - 1)[..., None]
    new, h = nxt[tag, state, tok], hit[tag, state, tok]
    if valid is not None:
      new = jnp.where(valid[..., None], new, state)
      h = h & valid[..., None]
    return new, h


def reference_hits(tag: str, token_texts: Sequence[str], ids: Sequence[int]) -> list[bool]:
  """Per token of `ids`: does an occurrence of `tag` in the decoded text end inside it?
  Plain string search over the concatenated texts (the reference for `TextMatcher`)."""
  pieces = [token_texts[i].encode("utf-8") for i in ids]
  text, ends = b"".join(pieces), np.cumsum([len(p) for p in pieces])
  b, out, at = tag.encode("utf-8"), [False] * len(ids), text.find(tag.encode("utf-8"))
  while at >= 0:
    out[int(np.searchsorted(ends, at + len(b), side="left"))] = True
    at = text.find(b, at + 1)
  return out
