"""Checkpoints: GGUF files, Hugging Face safetensors directories, and our own orbax format.

`load(path)` looks at what `path` is and returns (model, tokenizer). Our own checkpoints are
directories with `apr_config.json` (model config) + `params/` (orbax) + tokenizer files.
"""
from __future__ import annotations

import os

from jax.sharding import Mesh

from apr_jax.errors import UserError
from apr_jax.model.sharding import ShardingRules


def load(path: str, *, dtype=None, mesh: Mesh | None = None,
         rules: ShardingRules | None = None, tokenizer: str | None = None):
  """(model, tokenizer) from a .gguf file, an HF directory, or an apr_jax checkpoint dir.
  dtype: of the parameters (and so of the engines' KV); None or "auto": bfloat16 on GPU and
  TPU, float32 on CPU (`model.config.resolve_dtype`)."""
  from apr_jax import tokenizer as toklib
  from apr_jax.model.config import resolve_dtype
  dtype = resolve_dtype(dtype)
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise UserError(f"model path not found: {path}")
  if os.path.isfile(path):
    if not path.endswith(".gguf"):
      raise UserError(f"{path}: expected a .gguf file or a model directory")
    from apr_jax.checkpoint.build import build_model
    from apr_jax.checkpoint.gguf_io import GGUFFile
    g = GGUFFile(path)
    cfg = g.config()
    model = build_model(cfg, g.tensors(cfg), dtype=dtype, mesh=mesh, rules=rules, source=path)
    tok = toklib.load_tokenizer(tokenizer) if tokenizer else toklib.from_gguf(g)
    return model, tok
  if os.path.exists(os.path.join(path, "apr_config.json")):
    from apr_jax.checkpoint.orbax_io import restore
    model = restore(path, dtype=dtype, mesh=mesh, rules=rules)
    tok = toklib.load_tokenizer(tokenizer or path)
    return model, tok
  from apr_jax.checkpoint.build import build_model
  from apr_jax.checkpoint.safetensors_io import read_hf_dir
  from apr_jax.model.config import load_hf_config
  cfg = load_hf_config(os.path.join(path, "config.json"))
  model = build_model(cfg, read_hf_dir(path), dtype=dtype, mesh=mesh, rules=rules, source=path)
  tok = toklib.load_tokenizer(tokenizer or path) if (tokenizer or _has_tokenizer(path)) else None
  return model, tok


def _has_tokenizer(path: str) -> bool:
  return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))
