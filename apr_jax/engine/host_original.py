"""APR's released checkpoints run the way the original evaluation runs them, on our model
code: the host orchestrates text-level calls (`protocols.reference.apr_search_many`: the
original's stop string, spawn, child prompts and results block) and each round of calls is
one batch through `Generator`. Every call's text is tokenized afresh after one BOS (the
original sends `<s>` + the text to its server), and its continuation is decoded from the tokens
sampled after it (EOS left out). Host round trips at every call: this is the faithful
baseline, not the fast path (the fork/join engine runs the single-token APR protocol on
device).
"""
from __future__ import annotations

import sys
from typing import Sequence

from apr_jax.engine.generate import Generator
from apr_jax.engine.sampling import SamplingConfig, derive
from apr_jax.errors import UserError
from apr_jax.protocols import reference


class AprOriginalHost:
  """`solve(prompts)` -> one `reference.AprSearch` per root prompt.

  max_tokens: the token budget of one call (the original's `--max_tokens`, 4096), cut to
  what the model's context leaves after the call's text (per row: calls of any budgets share
  a batch); batch: calls per Generator batch
  (batches are padded to a power of two and to the mesh's data axis, so few programs are
  compiled); segment: decode steps per device call (0: one). A row ends at EOS or in the token that
  completes the original's stop string (`<Sub Searches>`, matched on device over the row's
  decoded text, `protocols.textmatch`); the text past it is cut by the reference anyway."""

  def __init__(self, model, tokenizer, *, max_tokens: int = 4096,
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0, batch: int = 64,
               max_spawns: int = 64, mesh=None, segment: int = 0, log=None):
    if tokenizer is None:
      raise UserError("the APR original protocol needs the model's tokenizer")
    if max_tokens < 1 or batch < 1:
      raise UserError(f"max_tokens and batch must be >= 1, got {max_tokens} and {batch}")
    self.gen = Generator(model, tokenizer, mesh=mesh)
    self.stop_ids = set(int(i) for i in tokenizer.stop_ids())
    self.rows_multiple = self.gen.mesh.shape.get("data", 1)  # batches split over the data axis
    self.tok = tokenizer
    self.max_tokens = max_tokens
    self.sampling = sampling
    self.seed = seed
    self.batch = batch
    self.max_spawns = max_spawns
    self.segment = segment  # decode steps per device call (0: one call to the end)
    self.calls = 0          # model calls so far (each is one sequence of the original)
    self.cut = 0            # calls whose budget the model's context cut below max_tokens
    self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))

  def _ids(self, text: str) -> list:
    bos = [] if self.tok.bos_id is None else [self.tok.bos_id]
    return bos + self.tok.encode(text)

  def complete_batch(self, texts: Sequence[str]) -> list[str]:
    """Each text's continuation: the model from the text to EOS or the call's budget."""
    ids = [self._ids(t) for t in texts]
    ctx = self.gen.cfg.max_seq_len
    budgets = [min(self.max_tokens, ctx - len(i)) for i in ids]
    out = [""] * len(texts)
    live = []
    for k, b in enumerate(budgets):
      if b < 1:
        self.cut += 1  # the context is full: the call ends at once, as at its budget
        continue
      self.cut += b < self.max_tokens
      live.append(k)
    for s in range(0, len(live), self.batch):
      part = live[s:s + self.batch]
      size = 1 << (len(part) - 1).bit_length()
      size = -(-size // self.rows_multiple) * self.rows_multiple
      rows = part + [part[0]] * (size - len(part))
      toks, n, done = self.gen.generate_ids(
          [ids[k] for k in rows], max_new_tokens=max(budgets[k] for k in part),
          row_limits=[budgets[k] for k in rows], sampling=self.sampling,
          seed=derive(self.seed, self.calls), segment=self.segment,
          stop_strings=(reference.APR_STOP,))
      for r, k in enumerate(part):
        gen = [int(t) for t in toks[r, :n[r]]]
        if done[r] and gen and gen[-1] in self.stop_ids:
          gen = gen[:-1]  # EOS is not text (a row that wrote the stop string keeps its token)
        out[k] = self._continuation(ids[k], gen)
      self.calls += len(part)
    return out

  def _continuation(self, prompt: list, gen: list) -> str:
    """The text the sampled tokens add after the prompt (decoded together, so a piece's
    leading space is kept)."""
    body = prompt[1:] if self.tok.bos_id is not None and prompt[:1] == [self.tok.bos_id] else prompt
    before = self.tok.decode(body)
    both = self.tok.decode(body + gen)
    return both[len(before):] if both.startswith(before) else self.tok.decode(gen)

  def solve(self, prompts: Sequence[str]) -> list:
    self.log(f"APR original: {len(prompts)} search(es), calls batched per round")
    return reference.apr_search_many(list(prompts), self.complete_batch, self.max_spawns)
