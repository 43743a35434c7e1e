"""Tiny random Llama / Qwen2 / Qwen3 checkpoints made with `transformers` (test-only)."""
from __future__ import annotations

import numpy as np

VARIANTS = {
    # name: (model_type, config kwargs)
    "llama_gqa_untied": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       tie_word_embeddings=False)),
    "llama_mha_tied_llama3rope": ("llama", dict(
        num_attention_heads=4, num_key_value_heads=4, head_dim=24, tie_word_embeddings=True,
        attention_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16})),
    "llama_linear_rope": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                         "factor": 2.0})),
    "qwen2": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            tie_word_embeddings=False)),
    "qwen3": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=48,
                            tie_word_embeddings=True)),
    "qwen3_gqa8": ("qwen3", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                                 tie_word_embeddings=False)),
}


def make_hf_model(name: str, seed: int = 0):
  import torch
  import transformers as tr
  arch, kw = VARIANTS[name]
  cls = {"llama": (tr.LlamaConfig, tr.LlamaForCausalLM), "qwen2": (tr.Qwen2Config, tr.Qwen2ForCausalLM),
         "qwen3": (tr.Qwen3Config, tr.Qwen3ForCausalLM)}[arch]
  cfg = cls[0](vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
               max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **kw)
  torch.manual_seed(seed)
  model = cls[1](cfg).eval()
  with torch.no_grad():  # larger-than-default weights, so differences are not hidden by tiny logits
    for n, p in model.named_parameters():
      if "norm" in n:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  return model


def save_tiny(name: str, path: str, max_shard_size: str | None = None):
  model = make_hf_model(name)
  # the llama3-rope variant is also saved sharded, to cover the safetensors index path
  shard = max_shard_size or ("40KB" if "llama3rope" in name else None)
  if shard:
    model.save_pretrained(path, max_shard_size=shard)
  else:
    model.save_pretrained(path)
  return model


def hf_logits(model, ids) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.float().numpy()
