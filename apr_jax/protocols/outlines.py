"""Outline numbers, read as the originals read them: `<Outline>\\s*([0-9]+(?:\\.[0-9]+)*)\\s*:`
on the decoded text of the block, duplicates dropped, the number itself the thread's label.

The engine cannot run a regex over text on device, so the regex is compiled, per tokenizer,
into an automaton over tokens: five states (`IDLE`, `LEAD` after `<Outline>`, `NUM` in the
number, `DOT` after a '.', `TRAIL` after the number), and for every token whose text moves
some state elsewhere than to `IDLE` (digits, '.', ':', whitespace and tokens mixing them:
a few hundred ids) its next state per state, the label characters it adds (as the digit and
separator tokens that spell the label) and whether it completes a header. Every other token
sends every state to `IDLE`. The transitions run the characters of the token's text, so a
header is found however the model's tokens split it (`' :'`, `'1:'`, `'12'` as one token).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

OUTLINE_RE = re.compile(r"<Outline>\s*([0-9]+(?:\.[0-9]+)*)\s*:")
IDLE, LEAD, NUM, DOT, TRAIL = range(5)
N_STATES = 5


def numbers(text: str) -> list[str]:
  """The outline numbers of `text` in order, duplicates dropped (the originals' rule)."""
  return list(dict.fromkeys(OUTLINE_RE.findall(text)))


def _space(c: str) -> bool:
  return re.fullmatch(r"\s", c) is not None


def _run(text: str, state: int):
  """The automaton over one token's characters: (state, label characters added, header done)."""
  out = []
  for c in text:
    digit = "0" <= c <= "9"
    if state == LEAD:
      state = LEAD if _space(c) else NUM if digit else IDLE
    elif state == NUM:
      if c == ":":
        return IDLE, out, True
      state = NUM if digit else DOT if c == "." else TRAIL if _space(c) else IDLE
    elif state == DOT:
      state = NUM if digit else IDLE
    elif state == TRAIL:
      if c == ":":
        return IDLE, out, True
      state = TRAIL if _space(c) else IDLE
    else:
      return IDLE, out, False
    if state in (NUM, DOT):
      out.append(c)
  return state, out, False


@dataclasses.dataclass(frozen=True)
class OutlineReader:
  """The per-token automaton (hashable: it is part of the compiled program's protocol).

  ids: the tokens that matter, sorted; nxt[k][s]: next state of ids[k] from state s;
  emit[k][s]: the label tokens it adds (-1 padded to `width`); done[k][s]: it completes a
  header. `count`: the `<Outline>` id (any state -> LEAD, the label restarts)."""
  count: int
  ids: tuple
  nxt: tuple
  emit: tuple
  done: tuple
  width: int

  def arrays(self):
    """(ids [K], nxt [K, 5], emit [K, 5, width], done [K, 5]) as numpy arrays."""
    k = len(self.ids)
    return (np.asarray(self.ids, np.int32), np.asarray(self.nxt, np.int32).reshape(k, N_STATES),
            np.asarray(self.emit, np.int32).reshape(k, N_STATES, self.width),
            np.asarray(self.done, bool).reshape(k, N_STATES))

  def step(self, state: int, label: list, token: int):
    """One token on the host (prompts): (state, label tokens so far, completed label or None)."""
    if token == self.count:
      return LEAD, [], None
    try:
      k = self.ids.index(token)
    except ValueError:
      return IDLE, label, None
    label = label + [t for t in self.emit[k][state] if t >= 0]
    return self.nxt[k][state], label, (label if self.done[k][state] else None)


def reader(texts: Sequence[str], count: int, digits: Sequence[int], sep: Sequence[int]) -> OutlineReader:
  """The automaton for a vocabulary whose token i reads `texts[i]`; label characters are
  spelled with `digits` (ids of '0'..'9') and `sep` (the ids of '.')."""
  spell = lambda c: list(sep) if c == "." else [digits[int(c)]]
  rows = []
  for i, text in enumerate(texts):
    if i == count or not text:
      continue
    res = [_run(text, s) for s in range(N_STATES)]
    if all(r[0] == IDLE and not r[2] for r in res):
      continue
    rows.append((i, [(s, [t for c in out for t in spell(c)], d) for s, out, d in res]))
  width = max([len(e) for _, rs in rows for _, e, _ in rs] + [1])
  pad = lambda e: tuple(e) + (-1,) * (width - len(e))
  return OutlineReader(
      count=count, ids=tuple(i for i, _ in rows),
      nxt=tuple(tuple(s for s, _, _ in rs) for _, rs in rows),
      emit=tuple(tuple(pad(e) for _, e, _ in rs) for _, rs in rows),
      done=tuple(tuple(d for _, _, d in rs) for _, rs in rows), width=width)
