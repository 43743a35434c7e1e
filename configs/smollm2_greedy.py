"""Greedy decoding with the embedded SmolLM2 (what the README's first command runs)."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model = ""
  c.max_new_tokens = 128
  c.temperature = 0.0
  return c
