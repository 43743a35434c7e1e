"""`python -m apr_jax.run --config configs/smollm2_chat.py`: the default chat model, sampled.

Any flag given on the command line wins over the values here.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model = ""              # "" = the embedded SmolLM2-135M-Instruct GGUF
  c.prompt = ["Write a haiku about parallel threads."]
  c.max_new_tokens = 96
  c.temperature = 0.7
  c.top_p = 0.9
  c.top_k = 50
  c.seed = 0
  return c
