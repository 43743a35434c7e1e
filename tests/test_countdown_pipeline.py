"""The shipped Countdown models end to end: `run --task countdown`, `eval`, and the host
baseline producing exactly what the engine produces."""
import json
import os
import subprocess
import sys

import pytest

from apr_jax import checkpoint
from apr_jax.engine.host import HostAPR
from apr_jax.engine.runner import Request
from apr_jax.evaluation import countdown as ev
from apr_jax.shipped import resolve
from apr_jax.tasks import countdown as cd
from apr_jax.tasks.countdown import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(module, *args, timeout=600):
  env = dict(os.environ, APR_JAX_CACHE_DIR="off", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=timeout)


@pytest.mark.parametrize("method", ["parallel", "sequential"])
def test_run_task_countdown(method):
  p = _cli("apr_jax.run", "--task", "countdown", "--method", method, "--problem", "3,12,27:31", "--json")
  assert p.returncode == 0, p.stderr
  d = json.loads(p.stdout)
  assert d["problem"] == {"nums": [3, 12, 27], "target": 31} and isinstance(d["correct"], bool)
  assert d["total_tokens"] > 20 and d["threads"][0]["parent"] == -1
  if method == "parallel":  # the human-readable form: the threads, the verdict, the summary
    p = _cli("apr_jax.run", "--task", "countdown", "--method", method, "--problem", "3,12,27:31")
    assert p.returncode == 0 and "verdict:" in p.stdout and "critical path" in p.stderr, p.stderr
    assert p.stdout.count("--- thread ") == len(d["threads"]) - 1, p.stdout
  else:
    bad = _cli("apr_jax.run", "--task", "countdown", "--problem", "3,x:31")
    assert bad.returncode != 0 and "error: --problem" in bad.stderr and "Traceback" not in bad.stderr


def test_host_baseline_equals_engine():
  model, tok = checkpoint.load(resolve("countdown_small_apr"))
  pr = data.protocol_for("apr_tok", tok)
  test = cd.test_split(cd.SMALL, 1000, seed=0)
  prompts = [[tok.bos_id] + tok.encode(cd.prompt_text(p)) for p in test[:3]]
  host = HostAPR(model, tok, pr).solve(prompts)
  eng = ev.make_engine(model, tok, "apr_tok", lanes=1, slots=2048)
  res = eng.run([Request(p, max_thread_tokens=1536, max_total_tokens=6000) for p in prompts])
  assert sum(r.forks for r in res) >= 1
  for h, r in zip(host, res):
    assert h["total_tokens"] == r.total_tokens
    assert [c for c in h["children"]] == [t["token_ids"][1:] for t in r.threads[1:]]  # minus BOS
    assert h["rendered"] == r.token_ids  # the root with its results blocks, as the engine renders it
    # so both report the same APR accounting (every call's sequence, results blocks included)
  for p, h, r in zip(test, host, res):
    texts = ev.thread_texts(r, tok, "apr_tok", cd.prompt_text(p))
    eng_counts = ev.original_counts(tok, "apr_tok", texts)
    host_texts = [cd.prompt_text(p) + tok.decode(h["rendered"])] + texts[1:]
    assert ev.original_counts(tok, "apr_tok", host_texts) == eng_counts
    assert eng_counts["apr_tokens"] > r.total_tokens + r.prompt_tokens


def test_eval_writes_results_and_plots(tmp_path):
  """--methods picks a subset of the config's methods (the sequential model's engine path is
  `run --task countdown --method sequential`'s)."""
  p = _cli("apr_jax.eval", "--config", "configs/eval_countdown_small.py", "--num_problems", "3",
           "--out", str(tmp_path), "--config.max_thread_tokens=600", "--methods",
           "parallel,parallel_host")
  assert p.returncode == 0, p.stderr
  d = json.load(open(tmp_path / "results.json"))
  assert set(d["methods"]) == {"parallel", "parallel_host"}
  for m in ("parallel", "parallel_host"):
    assert 0.0 <= d["methods"][m]["accuracy"] <= 1.0 and d["methods"][m]["problems"] == 3
  assert set(d["curves"]) == {"context_window", "total_tokens", "latency_s"}
  for f in d["plots"]:
    assert (tmp_path / f).stat().st_size > 1000
  assert "| parallel |" in open(tmp_path / "results.md").read()


def test_eval_unknown_method_is_a_clean_error(tmp_path):
  p = _cli("apr_jax.eval", "--config", "configs/eval_countdown_small.py", "--methods", "nope",
           "--out", str(tmp_path / "x"))
  assert p.returncode != 0 and "Traceback" not in p.stderr and "nope" in p.stderr
