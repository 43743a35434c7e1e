"""apr_jax's own checkpoints: `apr_config.json` + orbax `params/` + tokenizer files.

Restoring places every array straight onto its sharding on the given mesh.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from apr_jax.errors import UserError
from apr_jax.model.config import ModelConfig
from apr_jax.model.sharding import ShardingRules, single_device_mesh
from apr_jax.model.transformer import Transformer, abstract_model


def save(path: str, model: Transformer, tokenizer=None, extra: dict | None = None):
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "apr_config.json"), "w") as f:
    json.dump({"model": model.cfg.to_dict(), **(extra or {})}, f, indent=1)
  params = os.path.join(path, "params")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(params, nnx.state(model, nnx.Param), force=True)
  ckptr.wait_until_finished()
  if tokenizer is not None:
    tokenizer.save(path)


def read_config(path: str) -> ModelConfig:
  try:
    with open(os.path.join(path, "apr_config.json")) as f:
      return ModelConfig.from_dict(json.load(f)["model"])
  except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise UserError(f"corrupt apr_jax checkpoint config in {path}: {e}") from None


def restore(path: str, *, dtype=jnp.float32, mesh: Mesh | None = None,
            rules: ShardingRules | None = None) -> Transformer:
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  cfg = read_config(path)
  mesh = mesh or single_device_mesh()
  rules = rules or ShardingRules()
  graphdef, state = nnx.split(abstract_model(cfg, dtype))
  params = nnx.state(nnx.merge(graphdef, state), nnx.Param)

  def target(var):
    v = var.get_value()
    var.set_value(jax.ShapeDtypeStruct(v.shape, v.dtype,
                                       sharding=rules.sharding(mesh, var.get_metadata()["axes"], v.shape)))
    return var

  flat = [(p, target(v)) for p, v in nnx.to_flat_state(params)]
  abstract = nnx.from_flat_state(flat)
  try:
    restored = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), abstract)
  except Exception as e:  # orbax raises many types for missing/corrupt files
    raise UserError(f"cannot restore params from {path}/params: {type(e).__name__}: {e}") from None
  return nnx.merge(graphdef, restored)
