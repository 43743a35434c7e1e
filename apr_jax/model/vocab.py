"""Growing the vocabulary: new special tokens (the protocol tags) with embedding rows
initialised to the mean embedding of the tag word's pieces (as ThreadWeaver and Multiverse
do), so a pretrained model starts from a meaningful point."""
from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apr_jax.model.transformer import Transformer


def tag_word(tag: str) -> str:
  """'</Outline>' -> 'Outline'; text without brackets is returned stripped."""
  w = re.sub(r"[<>/|]", " ", tag).strip()
  return w or tag


def add_tokens(model: Transformer, tokenizer, tags: Sequence[str]) -> tuple[Transformer, list[int]]:
  """Adds `tags` to `tokenizer` (in place) and returns (model with grown vocab, their ids).

  Each new row of the input embedding (and of an untied output head) is the mean of the rows
  of the pieces that spell the tag's word. Rows beyond the tokenizer (padding) stay as they
  were; the vocab only grows when the new ids do not fit.
  """
  pieces = {t: tokenizer.encode(tag_word(t)) for t in tags}  # before the tags exist as tokens
  before = dict(tokenizer.added)
  ids = tokenizer.add_special_tokens(tags)
  fresh = {i: t for t, i in zip(tags, ids) if t in tokenizer.added and t not in before}
  cfg = model.cfg
  new_vocab = max(cfg.vocab_size, tokenizer.vocab_size)
  graphdef, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))

  def grow(var, rows_axis):
    w = np.array(jax.device_get(var.get_value()))  # writable copy
    w = np.moveaxis(w, rows_axis, 0)
    if w.shape[0] < new_vocab:
      pad = np.zeros((new_vocab - w.shape[0],) + w.shape[1:], w.dtype)
      w = np.concatenate([w, pad], 0)
    for i, t in fresh.items():
      src = [p for p in pieces[t] if p < model_vocab_before] or [0]
      w[i] = w[np.asarray(src)].astype(np.float32).mean(0).astype(w.dtype)
    w = np.moveaxis(w, 0, rows_axis)
    old = var.get_value()
    # a new Variable: the caller's model keeps its own params
    return var.replace(jax.device_put(jnp.asarray(w, old.dtype),
                                      old.sharding if old.shape == w.shape else None))

  model_vocab_before = cfg.vocab_size
  flat[("embed",)] = grow(flat[("embed",)], 0)
  if not cfg.tie_embeddings:
    flat[("lm_head",)] = grow(flat[("lm_head",)], 0)
  new_cfg = cfg.replace(vocab_size=new_vocab)
  new_state = nnx.from_flat_state(list(flat.items()))
  m = nnx.merge(graphdef, new_state)
  for _, node in nnx.iter_graph(m):  # every module holds the config; the vocab size changed
    if hasattr(node, "cfg"):
      node.cfg = new_cfg
  return m, ids
