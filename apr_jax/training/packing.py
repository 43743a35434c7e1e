"""Packing fork/join trajectories for training: a whole thread tree as one sequence.

Every token any thread writes appears once, in the order the plain reference
(`apr_jax.protocols.reference`) writes them (depth-first), at the position the protocol
gives it. Tokens are grouped into runs (a thread's tokens between two forks or joins); a
token attends to the earlier tokens of its own run, and to whole other runs as listed in a
small `[G, G]` table. The attention mask is computed from these ids on the device, never
stored as a dense N x N array (`tree_mask`); it reproduces exactly what each token saw when
the engine wrote it (ThreadWeaver's trie, Multiverse's sibling-masked paths, APR's separate
thread contexts). Loss is on sampled tokens only (prompts, forced prefixes, re-prefills and
results blocks are context).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from apr_jax.protocols import reference


@dataclasses.dataclass
class Packed:
  tokens: np.ndarray      # [n] int32
  positions: np.ndarray   # [n] int32
  groups: np.ndarray      # [n] int32 run ids 0..G-1
  vis: np.ndarray         # [G, G] bool: run g attends every token of run h
  labels: np.ndarray      # [n] int32: the token sampled after this one, or -1

  def __len__(self):
    return len(self.tokens)


def pack_trace(trace: reference.Trace) -> Packed:
  """One trajectory (a reference trace) as a packed sequence."""
  entries = {}  # uid -> (token, position, thread path)
  for path, th in trace.threads.items():
    for t, p, u in th.written:
      entries[u] = (t, p, path)
  n = len(entries)
  assert sorted(entries) == list(range(n))
  tokens = np.array([entries[u][0] for u in range(n)], np.int32)
  positions = np.array([entries[u][1] for u in range(n)], np.int32)
  groups = np.zeros((n,), np.int32)
  last_of_thread, g = {}, -1
  for u in range(n):
    path = entries[u][2]
    prev = last_of_thread.get(path)
    same = prev == u - 1 and trace.visible[u] == trace.visible[prev] | {u}
    if not same:
      g += 1
    groups[u] = g
    last_of_thread[path] = u
  # refine: a run that another run sees only in part (APR's dropped spawn block) is split
  while True:
    ng = int(groups.max()) + 1
    members = [np.nonzero(groups == k)[0] for k in range(ng)]
    firsts = [int(m[0]) for m in members]
    split = None
    for k in range(ng):
      base = trace.visible[firsts[k]]
      for h in range(ng):
        if h == k:
          continue
        inside = np.array([u in base for u in members[h]])
        if inside.any() and not inside.all():
          split = (h, members[h][~inside])
          break
      if split:
        break
    if split is None:
      break
    groups[split[1]] = ng
    groups = _renumber(groups)
  vis = np.zeros((ng, ng), bool)
  for k in range(ng):
    base = trace.visible[firsts[k]]
    for h in range(ng):
      vis[k, h] = h != k and int(members[h][0]) in base
  labels = np.full((n,), -1, np.int32)
  for th in trace.threads.values():
    for ctx, x in zip(th.contexts, th.samples):
      labels[ctx[-1][2]] = x
  return Packed(tokens, positions, groups, vis, labels)


def split_components(pk: Packed) -> list[Packed]:
  """Splits a packed tree into independent sequences where runs never see each other (APR's
  children start from fresh contexts: each thread its own sequence, as APR trains)."""
  ng = pk.vis.shape[0]
  parent = list(range(ng))

  def find(a):
    while parent[a] != a:
      parent[a] = parent[parent[a]]
      a = parent[a]
    return a
  for a, b in zip(*np.nonzero(pk.vis)):
    parent[find(int(a))] = find(int(b))
  roots = sorted({find(g) for g in range(ng)}, key=lambda r: min(g for g in range(ng) if find(g) == r))
  if len(roots) == 1:
    return [pk]
  out = []
  for r in roots:
    gs = [g for g in range(ng) if find(g) == r]
    sel = np.isin(pk.groups, gs)
    remap = {g: i for i, g in enumerate(gs)}
    out.append(Packed(tokens=pk.tokens[sel], positions=pk.positions[sel],
                      groups=np.array([remap[int(g)] for g in pk.groups[sel]], np.int32),
                      vis=pk.vis[np.ix_(gs, gs)], labels=pk.labels[sel]))
  return out


def _renumber(groups):
  """Run ids in order of first appearance."""
  order, out = {}, np.empty_like(groups)
  for i, g in enumerate(groups):
    out[i] = order.setdefault(int(g), len(order))
  return out


@dataclasses.dataclass
class Rows:
  """A batch of packed rows: [R, N] ids and [R, G, G] run tables."""
  tokens: np.ndarray
  positions: np.ndarray
  groups: np.ndarray      # -1 = padding
  vis: np.ndarray
  labels: np.ndarray


def pack_rows(items: Sequence[Packed], seq_len: int, max_groups: int,
              open_rows: int = 64) -> tuple[Rows, int]:
  """Best-fit packing of trajectories into rows of `seq_len` tokens and at most `max_groups`
  runs: each item goes to the open row (of the last `open_rows`) it fills best; when none
  fits, the fullest open row is closed. Deterministic. Returns (rows, number of trajectories
  skipped as too long)."""
  rows, open_, skipped = [], [], 0   # open_: [used tokens, used runs, items]
  for it in items:
    n, ng = len(it), it.vis.shape[0]
    if n > seq_len or ng > max_groups:
      skipped += 1
      continue
    fits = [k for k, (t, g, _) in enumerate(open_) if t + n <= seq_len and g + ng <= max_groups]
    if not fits:
      if len(open_) >= open_rows:
        full = max(range(len(open_)), key=lambda k: open_[k][0])
        rows.append(open_.pop(full)[2])
      open_.append([0, 0, []])
      fits = [len(open_) - 1]
    k = max(fits, key=lambda k: open_[k][0])
    open_[k][0] += n
    open_[k][1] += ng
    open_[k][2].append(it)
  rows += [o[2] for o in open_]
  r = len(rows)
  out = Rows(tokens=np.zeros((r, seq_len), np.int32), positions=np.zeros((r, seq_len), np.int32),
             groups=np.full((r, seq_len), -1, np.int32), vis=np.zeros((r, max_groups, max_groups), bool),
             labels=np.full((r, seq_len), -1, np.int32))
  for i, row in enumerate(rows):
    t = g = 0
    for it in row:
      n, ng = len(it), it.vis.shape[0]
      out.tokens[i, t:t + n] = it.tokens
      out.positions[i, t:t + n] = it.positions
      out.groups[i, t:t + n] = it.groups + g
      out.labels[i, t:t + n] = it.labels
      out.vis[i, g:g + ng, g:g + ng] = it.vis
      t += n
      g += ng
  return out, skipped


class TreeMask:
  """The tree attention mask as a function of blocks, for causal blockwise attention
  (`model.train_attention.attend_blocks`): the model asks for the [B, q1-q0, k1] mask of query
  block [q0, q1) over keys [0, k1) and never materialises the [B, N, N] mask; keys after a
  query block are skipped (every visible token precedes its reader in a packed row -
  `pack_trace` writes runs in order). `rows_per_iteration` (rows of the batch attended at a
  time) and `save_probs` (keep the probabilities for the backward, or recompute them): None
  for the attention's default on the backend."""

  def __init__(self, groups, vis, block: int = 128, rows_per_iteration: int | None = None,
               save_probs: bool | None = None):
    self.groups, self.vis, self.block = groups, vis, block
    self.rows_per_iteration, self.save_probs = rows_per_iteration, save_probs

  @property
  def arrays(self):
    return (self.groups, self.vis)

  @staticmethod
  def block_mask(arrays, q0: int, q1: int, k1: int):
    return tree_mask(*arrays, (q0, q1), k1)

  def __call__(self, q0: int, q1: int, k1: int):
    return self.block_mask(self.arrays, q0, q1, k1)

  def dense(self):
    return tree_mask(self.groups, self.vis)


def tree_mask(groups, vis, rows: tuple | None = None, k1: int | None = None):
  """The attention mask [B, N, N] from run ids [B, N] and run tables [B, G, G] (inside jit):
  i attends j iff same run and j <= i, or run(i) attends run(j). Padding attends itself.
  `rows=(q0, q1)` and `k1`: only the block of queries [q0, q1) over keys [0, k1)."""
  import jax.numpy as jnp
  n = groups.shape[1]
  q0, q1 = rows or (0, n)
  k1 = n if k1 is None else k1
  gq, gk = groups[:, q0:q1], groups[:, :k1]
  gi, gj = gq[:, :, None], gk[:, None, :]
  qi, kj = jnp.arange(q0, q1)[None, :, None], jnp.arange(k1)[None, None, :]
  causal = qi >= kj
  cross = jnp.take_along_axis(
      jnp.take_along_axis(vis, jnp.maximum(gq, 0)[:, :, None], axis=1),  # [B, Q, G]: run rows
      jnp.broadcast_to(jnp.maximum(gk, 0)[:, None, :], (groups.shape[0], q1 - q0, k1)), axis=2)
  real = (gi >= 0) & (gj >= 0)
  pad_self = (gi < 0) & (qi == kj)
  return ((gi == gj) & causal & real) | (cross & real) | pad_self
