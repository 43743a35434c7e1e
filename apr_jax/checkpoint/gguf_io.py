"""GGUF checkpoints (llama.cpp format): metadata -> ModelConfig, tensors -> HF layout.

Tensors are dequantised to float32 with the `gguf` package, one at a time, when the model
builder asks for them. llama.cpp's converter permutes the rows of Q and K (per head,
interleaving the two rotary halves) for the llama architecture; we undo that so the HF
`rotate_half` RoPE applies unchanged.
"""
from __future__ import annotations

import os

import numpy as np

from apr_jax.checkpoint.build import TensorSource
from apr_jax.errors import UserError
from apr_jax.model.config import SUPPORTED_ARCHS, ModelConfig, RopeScaling


class GGUFFile:
  """A parsed GGUF file: `.meta` (plain Python values) and lazy `.tensors` (HF names)."""

  def __init__(self, path: str):
    import gguf  # imported here: only GGUF users pay for it
    if not os.path.isfile(path):
      raise UserError(f"model file not found: {path}")
    try:
      self.reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct/numpy errors, ...
      raise UserError(f"cannot read GGUF file {path} (corrupt or truncated?): "
                      f"{type(e).__name__}: {e}") from None
    self.path = path
    self.meta = {}
    for key, field in self.reader.fields.items():
      try:
        self.meta[key] = field.contents()
      except Exception:  # an unreadable field we do not need must not stop loading
        continue
    self._gguf = gguf

  def get(self, key, default=None):
    return self.meta.get(key, default)

  def config(self) -> ModelConfig:
    arch = self.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
      raise UserError(f"unsupported architecture {arch!r} in {self.path}; supported: "
                      f"{', '.join(SUPPORTED_ARCHS)}")
    a = lambda k, d=None: self.get(f"{arch}.{k}", d)
    try:
      dim = int(a("embedding_length"))
      n_heads = int(a("attention.head_count"))
      n_kv = a("attention.head_count_kv", n_heads)
      head_dim = int(a("attention.key_length", dim // n_heads))
      tokens = self.get("tokenizer.ggml.tokens")
      vocab = int(a("vocab_size", len(tokens) if tokens else 0))
      eos = self.get("tokenizer.ggml.eos_token_id")
      scaling = None
      kind = a("rope.scaling.type")
      if kind == "linear":
        scaling = RopeScaling("linear", float(a("rope.scaling.factor")))
      elif kind not in (None, "none"):
        raise UserError(f"unsupported rope scaling {kind!r} in {self.path}")
      by_name = {t.name: t for t in self.reader.tensors}
      names = set(by_name)
      factors = None
      if "rope_freqs.weight" in by_name:  # llama3 rope scaling, precomputed by llama.cpp
        f = np.asarray(by_name["rope_freqs.weight"].data, np.float32).reshape(-1)
        if f.shape != (head_dim // 2,):
          raise UserError(f"{self.path}: rope_freqs has {f.size} entries, expected {head_dim // 2}")
        factors = tuple(float(x) for x in f)
      return ModelConfig(
          arch=arch, vocab_size=vocab, dim=dim, ffn_dim=int(a("feed_forward_length")),
          n_layers=int(a("block_count")), n_heads=n_heads, n_kv_heads=int(n_kv),
          head_dim=head_dim, norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
          rope_theta=float(a("rope.freq_base", 10000.0)), rope_scaling=scaling,
          rope_freq_factors=factors,
          tie_embeddings="output.weight" not in names,
          qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in names,
          o_bias="blk.0.attn_output.bias" in names,
          qk_norm=arch == "qwen3",
          max_seq_len=int(a("context_length", 4096)),
          bos_id=self.get("tokenizer.ggml.bos_token_id"),
          eos_ids=(int(eos),) if eos is not None else ())
    except (TypeError, ValueError) as e:
      raise UserError(f"GGUF metadata in {self.path} is incomplete or invalid: {e}") from None

  def tensors(self, cfg: ModelConfig) -> dict[str, TensorSource]:
    gg = self._gguf
    out = {}
    for t in self.reader.tensors:
      hf = _hf_name(t.name)
      if hf is None:
        continue
      shape = tuple(int(s) for s in reversed(t.shape.tolist()))
      permute_heads = None
      if cfg.arch == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
        permute_heads = cfg.n_heads
      elif cfg.arch == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
        permute_heads = cfg.n_kv_heads

      def load(t=t, shape=shape, permute_heads=permute_heads):
        try:
          a = gg.quants.dequantize(t.data, t.tensor_type)
          a = np.asarray(a, dtype=np.float32).reshape(shape)
        except Exception as e:
          raise UserError(f"cannot decode tensor {t.name} ({t.tensor_type.name}) in "
                          f"{self.path}: {e}") from None
        if permute_heads:
          a = _unpermute(a, permute_heads)
        return a
      out[hf] = TensorSource(shape, load)
    return out


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute`: rows (head, pair, 2) -> (head, 2, pair)."""
  rows = w.shape[0]
  rest = w.shape[1:]
  return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _hf_name(name: str) -> str | None:
  if name in _GLOBAL:
    return _GLOBAL[name]
  if name.startswith("blk."):
    _, i, rest = name.split(".", 2)
    if rest in _BLOCK:
      return f"model.layers.{i}.{_BLOCK[rest]}"
  return None
