"""Write a tiny HF model as a GGUF file the way llama.cpp's converter lays it out (test-only):
llama Q/K rows permuted, llama3 rope as precomputed `rope_freqs`, a small BPE vocab."""
from __future__ import annotations

import math

import numpy as np

# Written out again on purpose (not inverted from gguf_io._BLOCK): an independent spelling of
# llama.cpp's tensor names, so a typo in the loader's table cannot hide in a shared table.
BLOCK = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _permute(w, n_head):  # llama.cpp convert_hf_to_gguf.LlamaModel.permute
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(c, head_dim):
  rp = c.rope_parameters
  base = rp["rope_theta"]
  factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
  old = rp["original_max_position_embeddings"]
  out = []
  for i in range(0, head_dim, 2):
    freq = 1.0 / base ** (i / head_dim)
    wl = 2 * math.pi / freq
    if wl < old / hi:
      out.append(1.0)
    elif wl > old / lo:
      out.append(factor)
    else:
      smooth = (old / wl - lo) / (hi - lo)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(out, np.float32)


def write_gguf(hf_model, path: str):
  import gguf
  c = hf_model.config
  arch = c.model_type
  head_dim = c.head_dim
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_vocab_size(c.vocab_size)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("gpt2")
  pieces = [chr(0x100 + i) for i in range(c.vocab_size - 1)] + [chr(0x100) + chr(0x101)]
  w.add_token_list(pieces)  # byte-level-safe pieces, one merge
  w.add_token_types([1] * c.vocab_size)
  w.add_token_merges([f"{chr(0x100)} {chr(0x101)}"])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
  if c.rope_parameters.get("rope_type") == "llama3":
    w.add_tensor("rope_freqs.weight", _llama3_factors(c, head_dim))
  for name, t in sd.items():
    if name == "model.embed_tokens.weight":
      g = "token_embd.weight"
    elif name == "model.norm.weight":
      g = "output_norm.weight"
    elif name == "lm_head.weight":
      if c.tie_word_embeddings:
        continue
      g = "output.weight"
    else:
      _, _, i, rest = name.split(".", 3)
      g = f"blk.{i}.{BLOCK[rest]}"
      if arch == "llama" and rest.startswith("self_attn.q_proj"):
        t = _permute(t, c.num_attention_heads)
      elif arch == "llama" and rest.startswith("self_attn.k_proj"):
        t = _permute(t, c.num_key_value_heads)
    w.add_tensor(g, np.ascontiguousarray(t, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
