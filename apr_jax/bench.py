"""Benchmarks: `python -m apr_jax.bench NAME --out FILE.json` prints a table and writes JSON.

decode: SmolLM2-135M decode tokens/s at batch 1 and 8, apr_jax vs transformers (CPU torch),
        measured side by side in one process, interleaved, median of --repeats.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app, flags

from apr_jax.errors import UserError, cli_main

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "", "Write the records as a JSON list to this file.")
flags.DEFINE_integer("repeats", 3, "Timed repeats per configuration (median reported).", lower_bound=1)
flags.DEFINE_integer("new_tokens", 64, "Tokens generated per timed run.", lower_bound=2)
flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
flags.DEFINE_list("systems", ["apr_jax", "transformers"], "Systems to compare.")
flags.DEFINE_string("model", "", "GGUF model; empty = the embedded SmolLM2-135M-Instruct.")

PROMPT = "Write a short story about a robot who learns to paint."


def _log(*a):
  print(*a, file=sys.stderr, flush=True)


def bench_decode():
  from apr_jax import checkpoint
  from apr_jax.default_model import smollm2_path
  from apr_jax.engine.generate import Generator

  path = FLAGS.model or smollm2_path()
  batches = [int(b) for b in FLAGS.batches]
  n = FLAGS.new_tokens
  runners = {}
  model, tok = checkpoint.load(path)
  ids = tok.encode(tok.apply_chat([{"role": "user", "content": PROMPT}]))

  if "apr_jax" in FLAGS.systems:
    gen = Generator(model, tok)

    def run_apr(b):
      gen.generate_ids([ids] * b, max_new_tokens=n, stop_ids=[])  # stats exclude compile
      s = gen.stats
      return {"wall_s": s["prefill_s"] + s["decode_s"], "decode_s": s["decode_s"],
              "decode_steps": s["decode_steps"]}
    runners["apr_jax"] = run_apr

  if "transformers" in FLAGS.systems:
    import torch
    from transformers import AutoModelForCausalLM
    d, f = os.path.split(path)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()

    def run_hf(b):
      x = torch.tensor([ids] * b)
      t0 = time.perf_counter()
      with torch.no_grad():
        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=0)
      return {"wall_s": time.perf_counter() - t0}
    runners["transformers"] = run_hf

  unknown = set(FLAGS.systems) - set(runners)
  if unknown:
    raise UserError(f"unknown systems {sorted(unknown)}; choose from apr_jax, transformers")
  for name, fn in runners.items():  # warm-up: compile, allocate
    for b in batches:
      _log(f"warm-up {name} batch {b}")
      fn(b)
  samples = {(s, b): [] for s in runners for b in batches}
  for r in range(FLAGS.repeats):
    for b in batches:
      for name, fn in runners.items():
        res = fn(b)
        samples[(name, b)].append(res)
        _log(f"repeat {r + 1}/{FLAGS.repeats} {name:12s} batch {b}: {b * n / res['wall_s']:7.1f} tok/s")
  records = []
  for (name, b), rs in samples.items():
    rec = {"benchmark": "decode", "system": name, "batch": b, "new_tokens": n,
           "prompt_tokens": len(ids), "repeats": len(rs),
           "tokens_per_s": round(statistics.median(b * n / x["wall_s"] for x in rs), 2),
           "wall_s_median": round(statistics.median(x["wall_s"] for x in rs), 4),
           "tokens_per_s_all": [round(b * n / x["wall_s"], 2) for x in rs]}
    if "decode_s" in rs[0]:
      rec["decode_tokens_per_s"] = round(statistics.median(
          b * x["decode_steps"] / x["decode_s"] for x in rs), 2)
    records.append(rec)
  for b in batches:
    base = next((r for r in records if r["system"] == "transformers" and r["batch"] == b), None)
    for r in records:
      if r["batch"] == b and base is not None:
        r["speedup_vs_transformers"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
  print(f"{'system':14s} {'batch':>5s} {'tok/s (median)':>15s} {'decode-only tok/s':>18s} "
        f"{'x transformers':>15s}")
  for r in records:
    print(f"{r['system']:14s} {r['batch']:5d} {r['tokens_per_s']:15.1f} "
          f"{r.get('decode_tokens_per_s', float('nan')):18.1f} "
          f"{r.get('speedup_vs_transformers', float('nan')):15.2f}")
  return records


BENCHMARKS = {"decode": bench_decode}


@cli_main
def main(argv):
  from apr_jax import utils
  utils.quiet_logs()
  if len(argv) != 2 or argv[1] not in BENCHMARKS:
    raise UserError(f"usage: python -m apr_jax.bench NAME --out FILE.json; NAME is one of "
                    f"{', '.join(BENCHMARKS)}")
  if FLAGS.out and not os.path.isdir(os.path.dirname(os.path.abspath(FLAGS.out))):
    raise UserError(f"--out directory does not exist: {os.path.dirname(FLAGS.out)}")
  utils.setup_jax()
  records = BENCHMARKS[argv[1]]()
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(records, f, indent=1)
    _log(f"wrote {FLAGS.out}")
  return 0


if __name__ == "__main__":
  app.run(main)
