"""Training: a resumed run continues the same loss curve; the configs build and train."""
import json
import os
import subprocess
import sys

import numpy as np

from apr_jax.protocols import reference
from apr_jax.training import packing
from apr_jax.training.trainer import TrainConfig, train
from tests import tree_fixtures as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows():
  rng = np.random.default_rng(0)
  pr = tf.PROTOCOLS["multiverse"]
  items = []
  for _ in range(12):
    p, s = tf.random_trajectory("multiverse", rng, blocks=1)
    items.append(packing.pack_trace(reference.simulate(pr, p, s, eos_ids=(tf.EOS,))))
  return packing.pack_rows(items, seq_len=256, max_groups=32)[0]


def test_resume_continues_the_same_loss_curve(tmp_path):
  rows = _rows()
  tc = dict(steps=6, batch_size=2, lr=3e-3, warmup=2, log_every=1, ckpt_every=1, keep=2)
  _, full = train(tf.tiny_model(), rows, TrainConfig(**tc), str(tmp_path / "a"))
  _, first = train(tf.tiny_model(), rows, TrainConfig(**dict(tc, steps=3)), str(tmp_path / "b"))
  _, rest = train(tf.tiny_model(1), rows, TrainConfig(**tc), str(tmp_path / "b"))  # resumes at 3
  assert [s for s, _ in rest] == [4, 5, 6]
  np.testing.assert_allclose([l for _, l in first + rest], [l for _, l in full], rtol=1e-5)
  assert full[-1][1] < full[0][1]
  lines = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [1, 2, 3, 4, 5, 6]
  assert len(os.listdir(tmp_path / "b" / "ckpt")) <= 2  # keep the last N


def test_data_parallel_and_remat_continue_the_same_loss_curve(tmp_path):
  """The batch split over 4 (fake CPU) devices with replicated params, and layer remat,
  train exactly as one device does; a data-parallel run resumes from its checkpoint."""
  import jax
  assert jax.device_count() >= 4
  rows = _rows()
  tc = dict(steps=4, batch_size=4, lr=3e-3, warmup=2, log_every=1, ckpt_every=1, keep=2)
  _, one = train(tf.tiny_model(), rows, TrainConfig(**tc), str(tmp_path / "one"))
  model, dp = train(tf.tiny_model(), rows, TrainConfig(**dict(tc, steps=2, data_parallel=4, remat=True)),
                    str(tmp_path / "dp"))
  _, dp_rest = train(tf.tiny_model(1), rows, TrainConfig(**dict(tc, data_parallel=4)), str(tmp_path / "dp"))
  assert [s for s, _ in dp + dp_rest] == [1, 2, 3, 4]
  np.testing.assert_allclose([l for _, l in dp + dp_rest], [l for _, l in one], rtol=2e-5)
  assert len(model.embed[...].sharding.device_set) == 4  # replicated over the data devices
  import pytest
  from apr_jax.errors import UserError
  with pytest.raises(UserError, match="not divisible"):
    train(tf.tiny_model(), rows, TrainConfig(**dict(tc, batch_size=3, data_parallel=2)), str(tmp_path / "x"))


def test_bfloat16_mixed_precision_follows_the_float32_curve(tmp_path):
  rows = _rows()
  tc = dict(steps=5, batch_size=2, lr=3e-3, warmup=2, log_every=1, ckpt_every=5, keep=1)
  _, f32 = train(tf.tiny_model(), rows, TrainConfig(**tc), str(tmp_path / "f32"))
  model, bf16 = train(tf.tiny_model(), rows, TrainConfig(**dict(tc, compute_dtype="bfloat16")),
                      str(tmp_path / "bf16"))
  assert model.embed[...].dtype == np.float32  # float32 master weights
  a, b = np.array([l for _, l in bf16]), np.array([l for _, l in f32])
  assert not np.array_equal(a, b)  # the forward really ran in bfloat16
  np.testing.assert_allclose(a, b, rtol=3e-2)
  assert a[-1] < a[0]
  import pytest
  from apr_jax.errors import UserError
  with pytest.raises(UserError, match="use float32 or bfloat16"):
    train(tf.tiny_model(), rows, TrainConfig(**dict(tc, compute_dtype="float16")), str(tmp_path / "x"))


def _train_cli(*args, timeout=900):
  env = dict(os.environ, APR_JAX_CACHE_DIR="off", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "apr_jax.train", *args], capture_output=True,
                        text=True, cwd=ROOT, env=env, timeout=timeout)


def test_countdown_apr_config_trains_and_saves(tmp_path):
  p = _train_cli("--config", "configs/countdown_small_apr.py", f"--config.workdir={tmp_path}",
                 "--config.n_train=40", "--config.train.steps=3", "--config.train.log_every=1")
  assert p.returncode == 0, p.stderr
  assert "loss" in p.stderr and "ETA" in p.stderr
  from apr_jax import checkpoint
  model, tok = checkpoint.load(str(tmp_path / "model"))
  assert tok.token_id("<End Calling Sub Searches>") is not None
  assert json.load(open(tmp_path / "model" / "apr_config.json"))["format"] == "apr_tok"


def test_smollm2_threadweaver_finetune_runs(tmp_path):
  p = _train_cli("--config", "configs/smollm2_threadweaver_sft.py", f"--config.workdir={tmp_path}",
                 "--config.n_train=2", "--config.train.steps=2", "--config.train.batch_size=1",
                 "--config.train.log_every=1", "--config.seq_len=1024")
  assert p.returncode == 0, p.stderr
  losses = [float(l.split("loss ")[1].split()[0]) for l in p.stderr.splitlines() if "loss " in l]
  assert len(losses) == 2 and all(np.isfinite(losses))


def test_paper_config_builds_and_steps_on_cpu(tmp_path):
  p = _train_cli("--config", "configs/countdown_apr_paper.py", f"--config.workdir={tmp_path}",
                 "--config.n_train=4", "--config.n_test=4", "--config.seq_len=1024", "--config.beam=2",
                 "--config.train.steps=2", "--config.train.batch_size=1", "--config.train.log_every=1",
                 "--config.vocab_size=400")
  assert p.returncode == 0, p.stderr
  assert "model: " in p.stderr and "18 layers, dim 1024" in p.stderr
