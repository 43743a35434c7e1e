"""Evaluation: `python -m apr_jax.eval --config configs/eval_countdown_small.py --num_problems N
--seed S --out DIR`.

Pushes held-out problems through the fork/join engine (continuous batching, progress line)
for every method of the config (e.g. the shipped sequential and parallel models) and writes
DIR/results.json (per method: accuracy, total tokens, critical path, context, forks, wall
clock, problems/s; APR's three curves), DIR/results.md and the curves as PNG plots.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from apr_jax import config_files
from apr_jax.errors import UserError, cli_main, parse_flags

FLAGS = flags.FLAGS
config_files.DEFINE_config_file("config", "eval", "An evaluation config from configs/, e.g. "
                                "configs/eval_countdown_small.py.")
flags.DEFINE_integer("num_problems", 100, "Held-out problems to evaluate.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Which held-out problems (a permutation of the test split).")
flags.DEFINE_string("out", "", "Output directory (created).")
flags.DEFINE_list("methods", [], "Only these methods of the config (default: all).")


def _log(*a):
  print(*a, file=sys.stderr, flush=True)


def _format_of(path: str) -> str:
  """The training format an apr_jax checkpoint records ("" for another checkpoint)."""
  from apr_jax.tasks.countdown import data
  try:
    return data.read_checkpoint(path)["format"]
  except UserError:
    return ""


@cli_main
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  c = FLAGS.config
  if c is None:
    raise UserError("--config is required, e.g. --config configs/eval_countdown_small.py")
  if not FLAGS.out:
    raise UserError("--out DIR is required")
  from apr_jax import utils
  utils.quiet_logs()
  utils.setup_jax()
  import jax
  import numpy as np
  from apr_jax import checkpoint
  from apr_jax.evaluation import countdown as ev
  from apr_jax.model.config import resolve_dtype
  from apr_jax.shipped import resolve
  from apr_jax.tasks import countdown as cd

  setting = cd.SETTINGS[c.setting]
  resolve_dtype(c.get("dtype", "auto"))  # a bad dtype is an error before any model runs
  test = cd.test_split(setting, c.n_test, seed=c.data_seed)
  if FLAGS.num_problems > len(test):
    raise UserError(f"--num_problems {FLAGS.num_problems} > the {len(test)} held-out problems")
  order = np.random.default_rng(FLAGS.seed).permutation(len(test))[:FLAGS.num_problems]
  problems = [test[i] for i in order]
  os.makedirs(FLAGS.out, exist_ok=True)
  results, summary = {}, {}
  unknown = sorted(set(FLAGS.methods) - set(c.methods.keys()))
  if unknown:
    raise UserError(f"--methods: {', '.join(unknown)} not in the config's methods "
                    f"({', '.join(c.methods.keys())})")
  for name, m in c.methods.items():
    if FLAGS.methods and name not in FLAGS.methods:
      continue
    engine = m.get("engine", "tree")
    if engine == "tree" and m.get("path") and _format_of(resolve(m.path)) == "apr_original":
      engine = "apr_device"  # a checkpoint trained on the original's calls runs as the original
    if engine in ("apr_original", "apr_device"):
      if not m.get("path"):
        raise UserError(f"method {name}: set its path to a checkpoint in the original APR format "
                        f"(--config.methods.{name}.path=DIR)")
      path = resolve(m.path)
      _log(f"{name}: {path} ({engine}, {resolve_dtype(c.get('dtype', 'auto'))})")
      model, tok = checkpoint.load(path, dtype=c.get("dtype", "auto"))
      dtype = str(jax.tree.leaves(model)[0].dtype)
      if engine == "apr_device":  # the original protocol in the on-device engine
        eng = ev.make_apr_engine(model, tok, lanes=c.get("lanes", 8), rows=c.get("rows", 8),
                                 slots=c.get("slots", 16384), max_threads=c.get("max_threads", 32),
                                 max_total_tokens=c.get("max_total_tokens", 16384))
        t0 = time.perf_counter()
        rs = ev.evaluate_apr_device(eng, tok, problems, max_call_tokens=c.get("max_call_tokens", 4096),
                                    max_total_tokens=c.get("max_total_tokens", 16384),
                                    batch=c.batch, log=_log)
        wall = time.perf_counter() - t0
        results[name] = rs
        summary[name] = dict(ev.summarize(rs, wall), format="apr_original", path=m.path,
                             engine="apr_device", dtype=dtype, slots=eng.spec.slots,
                             compile_s=round(eng.stats["compile_s"], 2))
        continue
      from apr_jax.engine.host_original import AprOriginalHost
      host = AprOriginalHost(model, tok, max_tokens=c.get("max_call_tokens", 4096), batch=c.batch,
                             log=_log)
      t0 = time.perf_counter()
      rs = ev.evaluate_apr_original(host, tok, problems, batch=c.batch, log=_log)
      wall = time.perf_counter() - t0
      results[name] = rs
      summary[name] = dict(ev.summarize(rs, wall), format="apr_original", path=m.path,
                           engine="apr_original", dtype=dtype,
                           model_calls=host.calls, context_cut_calls=host.cut)
      continue
    path = resolve(m.path)
    from apr_jax.tasks.countdown import data
    fmt = data.read_checkpoint(path)["format"]
    _log(f"{name}: {path} ({fmt}, {resolve_dtype(c.get('dtype', 'auto'))})")
    model, tok = checkpoint.load(path, dtype=c.get("dtype", "auto"))
    dtype = str(jax.tree.leaves(model)[0].dtype)
    if engine == "host":
      from apr_jax.engine.host import HostAPR
      if fmt != "apr_tok":
        raise UserError(f"method {name}: the host baseline runs apr_tok-format models (single-token APR), not {fmt}")
      host = HostAPR(model, tok, data.protocol_for(fmt, tok))
      host.solve([[tok.bos_id] + tok.encode(cd.prompt_text(problems[0]))], c.max_thread_tokens)  # compile
      t0 = time.perf_counter()
      rs = ev.evaluate_host(host, tok, problems, max_thread_tokens=c.max_thread_tokens, batch=c.batch)
      wall = time.perf_counter() - t0
      results[name] = rs
      summary[name] = dict(ev.summarize(rs, wall), format=fmt, path=m.path, engine="host", dtype=dtype)
      continue
    eng = ev.make_engine(model, tok, fmt, lanes=c.lanes, rows=c.rows, slots=c.slots,
                         step_cost=c.get("step_cost", None) or None,
                         max_total_tokens=c.max_total_tokens,
                         attention=c.get("attention", "tree"),
                         requests_per_lane=c.get("requests_per_lane", 1))
    t0 = time.perf_counter()
    rs = ev.evaluate(eng, tok, fmt, problems, max_thread_tokens=c.max_thread_tokens,
                     max_total_tokens=c.max_total_tokens, batch=c.batch)
    wall = time.perf_counter() - t0
    results[name] = rs
    summary[name] = dict(ev.summarize(rs, wall), format=fmt, path=m.path, engine="tree", dtype=dtype,
                         slots=eng.spec.slots, compile_s=round(eng.stats["compile_s"], 2),
                         step_cost=eng.stats.get("step_cost"))
    del eng  # its KV pool is freed before the next method sizes its own
  cs = ev.curves({k: v for k, v in results.items() if summary[k].get("engine") in ("tree", "apr_original", "apr_device")})
  plots = ev.plot(cs, FLAGS.out)
  out = {"task": c.task, "setting": c.setting, "num_problems": len(problems), "seed": FLAGS.seed,
         "methods": summary, "curves": cs, "plots": [os.path.basename(p) for p in plots],
         "per_problem": {k: [vars(x) for x in v] for k, v in results.items()}}
  with open(os.path.join(FLAGS.out, "results.json"), "w") as f:
    json.dump(out, f, indent=1)
  md = ev.markdown(summary)
  with open(os.path.join(FLAGS.out, "results.md"), "w") as f:
    f.write(md)
  print(md)
  _log(f"wrote {FLAGS.out}/results.json, results.md, {', '.join(os.path.basename(p) for p in plots)}")
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
