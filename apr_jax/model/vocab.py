"""Growing the vocabulary: new special tokens (the protocol tags) with embedding rows
initialised to the mean embedding of the tag word's pieces (as ThreadWeaver and Multiverse
do), so a pretrained model starts from a meaningful point."""
from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from apr_jax.model.sharding import ShardingRules
from apr_jax.model.transformer import Transformer


def tag_word(tag: str) -> str:
  """'</Outline>' -> 'Outline'; text without brackets is returned stripped."""
  w = re.sub(r"[<>/|]", " ", tag).strip()
  return w or tag


def add_tokens(model: Transformer, tokenizer, tags: Sequence[str],
               rules: ShardingRules | None = None) -> tuple[Transformer, list[int]]:
  """Adds `tags` to `tokenizer` (in place) and returns (model with grown vocab, their ids).

  Each new row of the input embedding (and of an untied output head, also [V, E]) is the
  mean of the rows of the pieces that spell the tag's word. Rows beyond the tokenizer
  (padding) stay as they were; the vocab only grows when the new ids do not fit. Grown
  tables are placed on the mesh the old ones were on, by their logical axes.
  """
  pieces = {t: tokenizer.encode(tag_word(t)) for t in tags}  # before the tags exist as tokens
  before = dict(tokenizer.added)
  ids = tokenizer.add_special_tokens(tags)
  fresh = {i: t for t, i in zip(tags, ids) if t in tokenizer.added and t not in before}
  cfg = model.cfg
  new_vocab = max(cfg.vocab_size, tokenizer.vocab_size)
  rules = rules or ShardingRules()

  def grow(var):
    old = var.get_value()
    w = np.array(jax.device_get(old))  # a writable host copy
    if w.shape[0] < new_vocab:
      w = np.concatenate([w, np.zeros((new_vocab - w.shape[0], w.shape[1]), w.dtype)], 0)
    for i, t in fresh.items():
      src = [p for p in pieces[t] if p < cfg.vocab_size] or [0]
      w[i] = w[np.asarray(src)].astype(np.float32).mean(0).astype(w.dtype)
    sharding = old.sharding
    if isinstance(sharding, NamedSharding):
      sharding = rules.sharding(sharding.mesh, var.get_metadata()["axes"], w.shape)
    # a new Variable: the caller's model keeps its own params
    return var.replace(jax.device_put(w, sharding))

  graphdef, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))
  for name in ("embed",) + (() if cfg.tie_embeddings else ("lm_head",)):
    flat[(name,)] = grow(flat[(name,)])
  m = nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))
  new_cfg = cfg.replace(vocab_size=new_vocab)
  for _, node in nnx.iter_graph(m):  # every module holds the config; the vocab size changed
    if hasattr(node, "cfg"):
      node.cfg = new_cfg
  return m, ids
