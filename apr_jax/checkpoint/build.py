"""Assemble a Transformer from named host tensors, placing each straight onto its sharding.

Loaders (GGUF, safetensors) produce `{hf_name: TensorSource}` in the Hugging Face layout;
this module maps HF names onto our parameter paths (with the transposes/reshapes our einsum
layouts need) and puts every tensor on the mesh. A TensorSource reads lazily, so for a
memory-mapped safetensors file each device only reads its own shard.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from apr_jax.errors import UserError
from apr_jax.model.config import ModelConfig
from apr_jax.model.sharding import ShardingRules, single_device_mesh
from apr_jax.processes import put
from apr_jax.model.transformer import Transformer, abstract_model


@dataclasses.dataclass
class TensorSource:
  """A host tensor in HF layout, materialised on demand (memmap view, dequantisation...)."""
  shape: tuple[int, ...]
  load: Callable[[], np.ndarray]


def hf_name_map(cfg: ModelConfig) -> dict[tuple, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
  """Our param path -> (HF tensor name, HF-layout -> our-layout transform).

  Kernels keep the HF [out, in] layout (see model.ops.linear); only biases are reshaped.
  """
  h, k, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  ident = lambda a: a
  m: dict[tuple, tuple[str, Callable]] = {
      ("embed",): ("model.embed_tokens.weight", ident),
      ("final_norm",): ("model.norm.weight", ident),
  }
  if not cfg.tie_embeddings:
    m[("lm_head",)] = ("lm_head.weight", ident)
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}."
    L = ("layers", i)
    m[L + ("attn_norm",)] = (p + "input_layernorm.weight", ident)
    m[L + ("mlp_norm",)] = (p + "post_attention_layernorm.weight", ident)
    m[L + ("attn", "q")] = (p + "self_attn.q_proj.weight", ident)
    m[L + ("attn", "k")] = (p + "self_attn.k_proj.weight", ident)
    m[L + ("attn", "v")] = (p + "self_attn.v_proj.weight", ident)
    m[L + ("attn", "o")] = (p + "self_attn.o_proj.weight", ident)
    if cfg.qkv_bias:
      m[L + ("attn", "q_bias")] = (p + "self_attn.q_proj.bias", lambda a: a.reshape(h, d))
      m[L + ("attn", "k_bias")] = (p + "self_attn.k_proj.bias", lambda a: a.reshape(k, d))
      m[L + ("attn", "v_bias")] = (p + "self_attn.v_proj.bias", lambda a: a.reshape(k, d))
    if cfg.o_bias:
      m[L + ("attn", "o_bias")] = (p + "self_attn.o_proj.bias", ident)
    if cfg.qk_norm:
      m[L + ("attn", "q_norm")] = (p + "self_attn.q_norm.weight", ident)
      m[L + ("attn", "k_norm")] = (p + "self_attn.k_norm.weight", ident)
    m[L + ("mlp", "gate")] = (p + "mlp.gate_proj.weight", ident)
    m[L + ("mlp", "up")] = (p + "mlp.up_proj.weight", ident)
    m[L + ("mlp", "down")] = (p + "mlp.down_proj.weight", ident)
  return m


def build_model(cfg: ModelConfig, tensors: Mapping[str, TensorSource], *, dtype=jnp.float32,
                mesh: Mesh | None = None, rules: ShardingRules | None = None,
                source: str = "checkpoint") -> Transformer:
  """Transformer whose params are the HF-named `tensors`, each placed on its sharding."""
  mesh = mesh or single_device_mesh()
  rules = rules or ShardingRules()
  graphdef, state = nnx.split(abstract_model(cfg, dtype))
  names = hf_name_map(cfg)
  flat = nnx.to_flat_state(state)
  for path, var in flat:
    name, fn = names[path]
    src = tensors.get(name)
    if src is None:
      raise UserError(f"{source}: missing tensor {name!r}")
    want = var.get_value().shape
    try:
      host = np.asarray(fn(src.load()))
    except ValueError as e:  # reshape of a tensor whose size does not match the config
      raise UserError(f"{source}: tensor {name!r} has shape {src.shape}, which does not fit the "
                      f"model config ({e})") from None
    if host.shape != want:
      raise UserError(f"{source}: tensor {name!r} has shape {src.shape}; the config needs "
                      f"{want} in our layout")
    if not np.all(np.isfinite(host.astype(np.float32))):
      raise UserError(f"{source}: tensor {name!r} contains NaN or Inf (corrupt file?)")
    sharding = rules.sharding(mesh, var.get_metadata()["axes"], want)
    var.set_value(put(host.astype(jnp.dtype(dtype)), sharding))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def shard_model(model: Transformer, mesh: Mesh, rules: ShardingRules | None = None) -> Transformer:
  """A copy of `model` with every param placed on `mesh` by its logical axes (`model` untouched)."""
  rules = rules or ShardingRules()
  graphdef, state = nnx.split(model)

  def place(var):
    axes = var.get_metadata().get("axes")
    if axes is None:
      return var
    val = var.get_value()
    return var.replace(put(val, rules.sharding(mesh, axes, val.shape)))

  flat = [(p, place(v)) for p, v in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))

