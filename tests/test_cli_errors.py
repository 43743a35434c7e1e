"""Bad input gives one clear error line and a non-zero exit, never a traceback."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=300):
  env = dict(os.environ, APR_JAX_CACHE_DIR="off", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  p = subprocess.run([sys.executable, "-m", "apr_jax.run", *args], capture_output=True, text=True,
                     cwd=ROOT, env=env, timeout=timeout)
  return p.returncode, p.stdout, p.stderr


def assert_clean_error(rc, err, *needles):
  assert rc != 0
  assert "Traceback" not in err, err
  lines = [l for l in err.strip().splitlines() if l.strip()]
  msg = [l for l in lines if l.startswith(("error:", "FATAL Flags parsing error"))]
  assert len(msg) == 1, err
  for n in needles:
    assert n in msg[0], msg[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, smollm2_path, tiny_dir):
  d = tmp_path_factory.mktemp("bad")
  (d / "random.gguf").write_bytes(os.urandom(4096))
  with open(smollm2_path, "rb") as f:
    (d / "truncated.gguf").write_bytes(f.read(20_000_000))
  trunc = d / "trunc_st"
  shutil.copytree(tiny_dir("qwen2"), trunc)
  st = trunc / "model.safetensors"
  st.write_bytes(st.read_bytes()[:-1000])
  garbage = d / "garbage_st"
  shutil.copytree(tiny_dir("qwen2"), garbage)
  (garbage / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
  arch = d / "gpt2"
  shutil.copytree(tiny_dir("qwen2"), arch)
  cfg = json.loads((arch / "config.json").read_text())
  cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
  (arch / "config.json").write_text(json.dumps(cfg))
  pickle = d / "pickle_only"
  pickle.mkdir()
  (pickle / "config.json").write_text((arch / "config.json").read_text().replace("gpt2", "llama"))
  (pickle / "pytorch_model.bin").write_bytes(b"not unpickled")
  return d


@pytest.mark.parametrize("case,needles", [
    ("missing", ["not found"]),
    ("random.gguf", ["GGUF", "corrupt"]),
    ("truncated.gguf", ["GGUF"]),
    ("trunc_st", ["truncated"]),
    ("garbage_st", ["corrupt"]),
    ("gpt2", ["unsupported architecture", "GPT2LMHeadModel"]),
    ("pickle_only", ["never unpickles"]),
])
def test_bad_model_files(case, needles, bad_files):
  rc, out, err = run("--model", str(bad_files / case), "--max_new_tokens", "2")
  assert_clean_error(rc, err, *needles)


@pytest.mark.parametrize("flag,needle", [
    (["--top_p", "2"], "top_p"), (["--temperature", "-1"], "temperature"),
    (["--max_new_tokens", "0"], "max_new_tokens"), (["--dtype", "int8"], "dtype"),
    (["--mesh", "abc"], "--mesh"), (["--mesh", "3x3"], "devices"), (["--prompt", ""], "prompt"),
    (["stray", "words"], "unexpected arguments"),
])
def test_bad_flags(flag, needle):
  rc, out, err = run(*flag, "--model", "/nonexistent/but/checked/later")
  assert_clean_error(rc, err, needle)


def test_prompt_longer_than_context():
  rc, out, err = run("--prompt", "word " * 8300, "--max_new_tokens", "4")
  assert_clean_error(rc, err, "exceeds the model's context")


def test_json_output_is_one_object():
  rc, out, err = run("--json", "--max_new_tokens", "12")
  assert rc == 0, err
  d = json.loads(out)
  assert d["text"].startswith("2 + 3 = 5") and d["token_ids"][:1] == [34]
  assert d["stats"]["decode_tokens_per_s"] > 0 and d["stop_reason"] == "stop"
  import jax
  assert d["dtype"] == ("bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32")
  assert d["finish_reason"] == "stop"


def test_protocol_run_shows_the_thread_tree():
  prefix = "<Parallel>\n<Goal>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Goal>"
  rc, out, err = run("--json", "--protocol", "multiverse", "--max_new_tokens", "6",
                     "--assistant_prefix", prefix)
  assert rc == 0, err
  d = json.loads(out)
  assert d["forks"] == 1 and len(d["threads"]) == 3
  assert [t["parent"] for t in d["threads"]] == [-1, 0, 0]
  assert all(t["tokens"] <= 6 for t in d["threads"])
  assert d["total_tokens"] == sum(t["tokens"] for t in d["threads"])
  assert d["text"].startswith("\n<Path>\n1:") and "<Conclusion>" in d["text"]
  # the human-readable form (thread tree, critical path): test_original_checkpoints


@pytest.mark.parametrize("flags,needle", [
    (["--protocol", "bogus"], "protocol"),
    (["--assistant_prefix", "x"], "--assistant_prefix needs --protocol"),
    (["--protocol", "apr_tok", "--rows", "0"], "rows"),
    (["--protocol", "apr", "--assistant_prefix", "x"], "sends each prompt as plain text"),
    (["--protocol", "threadweaver", "--stop", "x"], "--stop applies to plain decoding"),
    (["--stop", ""], "--stop must not be empty"),
])
def test_bad_protocol_flags(flags, needle):
  rc, out, err = run(*flags, "--max_new_tokens", "2")
  assert_clean_error(rc, err, needle)


def _module(mod, *args, timeout=300):
  env = dict(os.environ, APR_JAX_CACHE_DIR="off", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  p = subprocess.run([sys.executable, "-m", mod, *args], capture_output=True, text=True,
                     cwd=ROOT, env=env, timeout=timeout)
  return p.returncode, p.stderr


@pytest.mark.parametrize("mod,args,needle", [
    ("apr_jax.train", ["--config", "configs/countdown_small_sos.py", "--config.train.remta=True"],
     "did you mean \"remat\""),
    ("apr_jax.train", ["--config", "configs/countdown_small_sos.py", "--config.train.steps=abc"],
     "invalid literal"),
    ("apr_jax.train", ["--config", "configs/no_such_config.py"], "no_such_config.py"),
    ("apr_jax.eval", ["--config", "configs/eval_countdown_small.py", "--config.nope=1"],
     "unknown config key 'nope'"),
])
def test_bad_config_overrides(mod, args, needle):
  rc, err = _module(mod, *args)
  assert rc == 2
  assert_clean_error(rc, err.replace("Did you", "did you"), needle)


@pytest.mark.parametrize("override,needle", [
    ("--config.train.batch_size=0", "batch_size must be >= 1"),
    ("--config.train.data_parallel=64", "there are 1 devices"),
    ("--config.train.compute_dtype=int8", "use float32 or bfloat16"),
])
def test_bad_train_settings(tmp_path, override, needle):
  rc, err = _module("apr_jax.train", "--config", "configs/countdown_small_sos.py",
                    f"--config.workdir={tmp_path}", "--config.n_train=20", "--config.n_test=4",
                    "--config.train.steps=1", override)
  assert_clean_error(rc, err, needle)


def test_base_checkpoint_runs_plain_text_and_chat_on_is_an_error(tiny_dir, spm_model):
  from apr_jax import tokenizer as toklib
  base = ["--model", tiny_dir("qwen2"), "--tokenizer", spm_model, "--prompt", "moving to node 42",
          "--max_new_tokens", "2"]
  rc, out, err = run(*base, "--json")
  assert rc == 0, err
  assert json.loads(out)["prompt_tokens"] == len(toklib.load_tokenizer(spm_model).encode("moving to node 42"))
  rc, out, err = run(*base, "--chat=on")
  assert_clean_error(rc, err, "no chat template", "--chat=off")
  rc, out, err = run(*base, "--chat=maybe")
  assert_clean_error(rc, err, "chat")


@pytest.mark.parametrize("mod,args,needle", [
    # a training config given to eval by mistake: found while the flags are parsed
    ("apr_jax.eval", ["--config", "configs/countdown_apr_paper.py", "--out", "x"],
     "is a training config"),
    ("apr_jax.train", ["--config", "configs/eval_countdown_small.py"], "expects a training config"),
    ("apr_jax.run", ["--config", "configs/countdown_small_apr.py"], "expects a config of run flag"),
    ("apr_jax.bench", ["train", "--train_config", "configs/eval_countdown_small.py"],
     "is an evaluation config"),
])
def test_config_of_the_wrong_kind(mod, args, needle):
  rc, err = _module(mod, *args, timeout=120)
  assert rc == 2
  assert_clean_error(rc, err, needle)


@pytest.mark.parametrize("flag,value", [("--scaling_blocks", "12x"), ("--scaling_lanes", "0"),
                                        ("--scaling_pools", "-4096")])
def test_bad_scaling_lists(flag, value):
  rc, err = _module("apr_jax.bench", "scaling", "--scaling_shape", "tiny", flag, value,
                    "--out", os.devnull, timeout=120)
  assert_clean_error(rc, err, f"{flag} must list positive integers")


def test_config_files_load_siblings_without_sys_path(tmp_path):
  import sys as _sys
  from apr_jax import config_files
  before = list(_sys.path)
  c = config_files.load(os.path.join(ROOT, "configs", "countdown_small_apr_long.py"), "train")
  assert c.format == "apr_tok" and c.train.stop_at == 2200 and c.workdir.endswith("apr_long")
  assert _sys.path == before
  (tmp_path / "broken.py").write_text("def get_config():\n  return 1 / 0\n")
  from apr_jax.errors import UserError
  with pytest.raises(UserError, match="ZeroDivisionError"):
    config_files.load(str(tmp_path / "broken.py"))


SHIPPED_APR = os.path.join(ROOT, "apr_jax", "shipped", "countdown_small_apr")


def test_protocol_names_listed_and_the_original_apr_refuses_single_token_tags():
  """`--protocol` lists every protocol; `apr` (the original, plain-text tags) refuses a model
  whose tokenizer holds APR's tags as single tokens instead of running it as something else."""
  rc, _, err = run("--protocol", "bogus")
  assert_clean_error(rc, err, "apr", "apr_tok", "threadweaver", "multiverse")
  rc, _, err = run("--model", SHIPPED_APR, "--protocol", "apr", "--prompt", "x",
                   "--max_new_tokens", "2")
  assert_clean_error(rc, err, "--protocol apr_tok")


def test_the_old_apr_format_name_is_read_as_apr_tok(tmp_path):
  """A checkpoint saved when the single-token variant was the only APR format records
  format "apr": it is read as apr_tok (the name apr now means the original); a training
  config that asks for format "apr" gets a clear error, not a silent switch."""
  from apr_jax.errors import UserError
  from apr_jax.tasks.countdown import data
  assert data.checkpoint_format({"format": "apr", "protocol": "apr"}) == ("apr_tok", "apr_tok")
  assert data.checkpoint_format({"format": "apr_original", "protocol": "none"}) == ("apr_original", "apr")
  assert data.checkpoint_format({}) == ("sos", "none")
  with pytest.raises(UserError, match="named 'apr_tok'"):
    data.check_format("apr")
  with pytest.raises(UserError, match="unknown Countdown format"):
    data.checkpoint_format({"format": "bogus"})
  old = tmp_path / "old_apr"
  shutil.copytree(SHIPPED_APR, old)
  cfg = json.loads((old / "apr_config.json").read_text())
  assert cfg["format"] == "apr_tok" and cfg["protocol"] == "apr_tok"
  cfg["format"] = cfg["protocol"] = "apr"
  (old / "apr_config.json").write_text(json.dumps(cfg))
  new = run("--task", "countdown", "--model", SHIPPED_APR, "--problem", "3,5,7:22", "--json")
  rc, out, err = run("--task", "countdown", "--model", str(old), "--problem", "3,5,7:22", "--json")
  assert rc == 0 and new[0] == 0, err
  a, b = json.loads(out), json.loads(new[1])
  assert a["text"] == b["text"] and a["threads"] == b["threads"] and a["forks"] >= 1
  rc, err = _module("apr_jax.train", "--config", "configs/countdown_small_apr.py",
                       "--config.format=apr", f"--config.workdir={tmp_path / 'w'}")
  assert_clean_error(rc, err, "named 'apr_tok'")
