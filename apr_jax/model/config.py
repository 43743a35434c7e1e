"""Model configuration: one frozen dataclass for the Llama / Qwen2 / Qwen3 family.

Built from a Hugging Face `config.json` dict (transformers 4.x and 5.x spellings) or
from GGUF metadata. Hashable, so it can be a static argument to `jax.jit`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from apr_jax.errors import UserError

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """`llama3` (piecewise frequency scaling) or `linear` (positions / factor)."""
  kind: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  arch: str                 # llama | qwen2 | qwen3
  vocab_size: int
  dim: int                  # hidden size
  ffn_dim: int              # SwiGLU inner size
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rope_freq_factors: tuple[float, ...] | None = None  # GGUF `rope_freqs`: inv_freq / factor
  tie_embeddings: bool = False
  qkv_bias: bool = False    # Qwen2 (always), Llama/Qwen3 with attention_bias
  o_bias: bool = False      # Llama/Qwen3 with attention_bias (Qwen2 never)
  qk_norm: bool = False     # Qwen3: RMSNorm over head_dim on q and k
  max_seq_len: int = 4096
  bos_id: int | None = None
  eos_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if self.arch not in SUPPORTED_ARCHS:
      raise UserError(f"unsupported architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
    for name in ("vocab_size", "dim", "ffn_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
      if int(getattr(self, name)) <= 0:
        raise UserError(f"model config: {name} must be positive, got {getattr(self, name)}")
    if self.n_heads % self.n_kv_heads:
      raise UserError(f"model config: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise UserError(f"model config: head_dim={self.head_dim} must be even for RoPE")

  @property
  def q_per_kv(self) -> int:
    return self.n_heads // self.n_kv_heads

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    d = dict(d)
    if d.get("rope_scaling"):
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    d["eos_ids"] = tuple(d.get("eos_ids") or ())
    if d.get("rope_freq_factors") is not None:
      d["rope_freq_factors"] = tuple(d["rope_freq_factors"])
    return cls(**d)

  def num_params(self, include_embeddings: bool = True) -> int:
    attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
    if self.qkv_bias:
      attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
    if self.o_bias:
      attn += self.dim
    if self.qk_norm:
      attn += 2 * self.head_dim
    layer = attn + 3 * self.dim * self.ffn_dim + 2 * self.dim
    n = self.n_layers * layer + self.dim
    if include_embeddings:
      n += self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
    return n


def _as_int_tuple(x) -> tuple[int, ...]:
  if x is None:
    return ()
  if isinstance(x, (list, tuple)):
    return tuple(int(i) for i in x)
  return (int(x),)


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  # transformers 5 writes `rope_parameters`; 4.x writes `rope_theta` + `rope_scaling`.
  params = d.get("rope_parameters") or {}
  scaling = d.get("rope_scaling") or None
  theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
  if scaling is None and params.get("rope_type", "default") != "default":
    scaling = params
  if not scaling:
    return theta, None
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return theta, None
  if kind == "llama3":
    return theta, RopeScaling(
        kind="llama3", factor=float(scaling["factor"]),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position=int(scaling.get("original_max_position_embeddings", 8192)))
  if kind == "linear":
    return theta, RopeScaling(kind="linear", factor=float(scaling["factor"]))
  raise UserError(f"unsupported rope scaling type {kind!r} (supported: default, llama3, linear)")


def from_hf_config(d: dict[str, Any]) -> ModelConfig:
  """ModelConfig from a Hugging Face config.json dict."""
  arch = d.get("model_type")
  if arch not in SUPPORTED_ARCHS:
    archs = d.get("architectures") or [arch]
    raise UserError(f"unsupported architecture {archs[0]!r} (model_type={arch!r}); "
                    f"supported model types: {', '.join(SUPPORTED_ARCHS)}")
  act = d.get("hidden_act", "silu")
  if act != "silu":
    raise UserError(f"unsupported activation {act!r} (only silu/SwiGLU)")
  if d.get("mlp_bias"):
    raise UserError("unsupported: mlp_bias=true")
  if d.get("use_sliding_window"):
    raise UserError("unsupported: sliding-window attention (use_sliding_window=true)")
  try:
    n_heads = int(d["num_attention_heads"])
    dim = int(d["hidden_size"])
    theta, scaling = _rope_from_hf(d)
    return ModelConfig(
        arch=arch,
        vocab_size=int(d["vocab_size"]),
        dim=dim,
        ffn_dim=int(d["intermediate_size"]),
        n_layers=int(d["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
        head_dim=int(d.get("head_dim") or dim // n_heads),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(d.get("tie_word_embeddings", arch != "llama")),
        qkv_bias=arch == "qwen2" or bool(d.get("attention_bias", False)),
        o_bias=arch != "qwen2" and bool(d.get("attention_bias", False)),
        qk_norm=arch == "qwen3",
        max_seq_len=int(d.get("max_position_embeddings", 4096)),
        bos_id=d.get("bos_token_id"),
        eos_ids=_as_int_tuple(d.get("eos_token_id")),
    )
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(f"invalid model config: missing or bad field {e}") from None


def load_hf_config(path: str) -> ModelConfig:
  try:
    with open(path) as f:
      d = json.load(f)
  except FileNotFoundError:
    raise UserError(f"no config.json in {os.path.dirname(path) or '.'}") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"corrupt config.json at {path}: {e}") from None
  if not isinstance(d, dict):
    raise UserError(f"corrupt config.json at {path}: not a JSON object")
  return from_hf_config(d)


DTYPES = ("auto", "float32", "bfloat16")


def resolve_dtype(name=None):
  """Parameter and KV dtype: "auto" (or None) is bfloat16 on GPU and TPU (half the bytes,
  one MXU pass per matmul) and float32 on CPU (where bfloat16 matmuls are emulated and no
  faster); "float32" / "bfloat16" (or a dtype) as given."""
  import jax
  import jax.numpy as jnp
  if name is None or (isinstance(name, str) and name == "auto"):
    return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32)
  if isinstance(name, str) and name not in DTYPES:
    raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
  return jnp.dtype(name)
