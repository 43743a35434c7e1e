"""Token counts and critical paths as the originals count them, next to apr_jax's own
(`TreeResult.total_tokens`: sampled tokens, shared prefix once; `critical_path`: sampled
tokens along the longest chain; REFERENCE.md §3).

- APR (`calculate_token_counts` in the original repository): every call the orchestrator
  makes counts its whole sequence, BOS and EOS included: the root's prompt, each child's
  prompt, the results blocks. Consecutive root calls (call k+1 repeats call k up to its
  spawn block) count their common prefix once. The longest sequence (the largest context any
  call holds) is APR's latency measure. The original deducts one token too few per pair of
  root calls and counts a second BOS with the Llama-2 tokenizer; the definition is used here.
- ThreadWeaver (`get_parallel_stats`): on the joined token stream, outside `<Parallel>`
  blocks every token is sequential (the block tags included); inside a block its
  non-thread tokens and every thread's `<Thread>` / `</Thread>` are sequential, plus the
  longest thread's content.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

SPAWN_OPEN, SPAWN_CLOSE = "<Calling Sub Searches>", "<End Calling Sub Searches>"


def apr_root_calls(root_text: str, spawn_open: str = SPAWN_OPEN,
                   spawn_close: str = SPAWN_CLOSE) -> list[str]:
  """The root's calls, as an orchestrator would have made them, from the root's whole text
  as apr_jax renders it (each spawn block followed by the results block that replaced it):
  call k ends with spawn block k; later calls no longer hold it."""
  calls, kept, rest = [], "", root_text
  while (i := rest.find(spawn_open)) >= 0 and (j := rest.find(spawn_close, i)) >= 0:
    j += len(spawn_close)
    if rest[j:j + 1] == "\n":  # the original's spawn block ends with a newline
      j += 1
    calls.append(kept + rest[:j])
    kept, rest = kept + rest[:i], rest[j:]
  return calls + [kept + rest]


def apr_token_counts(root_calls: Sequence[str], child_calls: Sequence[str],
                     n_tokens: Callable[[str], int]) -> dict:
  """{"token_count", "longest_seq_token_count"} of APR's accounting: each call counts
  n_tokens(text) + 2 (BOS, EOS); root calls sorted by length count the common prefix of each
  consecutive pair once."""
  lens = [n_tokens(s) + 2 for s in [*root_calls, *child_calls]]
  roots = sorted(root_calls, key=len)
  shared = sum(n_tokens(os.path.commonprefix([a, b])) for a, b in zip(roots, roots[1:]))
  return {"token_count": sum(lens) - shared, "longest_seq_token_count": max(lens, default=0)}


def threadweaver_stats(ids: Sequence[int], parallel: int, end_parallel: int, thread: int,
                       end_thread: int) -> dict:
  """{"total_tokens", "critical_path"} of ThreadWeaver's accounting over a joined token
  stream, given the ids of its four block tags."""
  seq = total = 0
  in_block = in_thread = False
  block_seq, threads, cur = 0, [], 0
  for t in ids:
    total += 1
    if not in_block:
      seq += 1
      if t == parallel:
        in_block, block_seq, threads = True, 0, []
    elif in_thread:
      if t == end_thread:
        in_thread, block_seq = False, block_seq + 1
        threads.append(cur)
      else:
        cur += 1
    elif t == thread:
      in_thread, cur, block_seq = True, 0, block_seq + 1
    elif t == end_parallel:
      seq += block_seq + max(threads, default=0) + 1
      in_block = False
    else:
      block_seq += 1
  if in_block:  # an unfinished block counts as if closed there
    seq += block_seq + max(threads + ([cur] if in_thread else []), default=0)
  return {"total_tokens": total, "critical_path": seq}
