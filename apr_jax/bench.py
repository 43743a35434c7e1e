"""Benchmarks: `python -m apr_jax.bench NAME --out FILE.json` prints a table and writes JSON.

decode: SmolLM2-135M decode tokens/s at batch 1 and 8, apr_jax vs transformers (CPU torch),
        measured side by side in one process, interleaved, median of --repeats.
train:  training tokens/s and MFU of a Countdown config against the measured matmul peak.
fork:   SmolLM2-135M, a P-token prompt, a forced fork into k threads of n tokens, a join,
        m more tokens: apr_jax (the fork/join engine, Multiverse stitch join; also the
        ThreadWeaver flat join as apr_jax_flat), sequential decoding of the same number of
        tokens, and the host-orchestrated baseline (threads as separate batched requests with
        prefix caching, re-prefill at the join). Wall time, KV bytes, join cost.
attention: the engine's step time on Countdown, tree vs dense attention, pool sizes.
scaling: one decode step's attention on a synthetic thread tree (an 8B model's layer shape),
        tree vs dense (and the Pallas kernel on TPU), vs pool size, threads and lanes.
prefill: SmolLM2-135M, the prefill program (`TreeSpec.prefill`): a long prompt's time to first
        token alone against `Generator`'s prefill; then beside 7 decoding lanes, its latency
        and the decoders' time per token, with and without the prefill program.
prefix: SmolLM2-135M, R requests that share an S-token system prompt: time to first token with
        the prefix cache and without.
samples: SmolLM2-135M, one P-token prompt, n samples of T tokens: the engine's n samples
        (the prompt stored once) vs `Generator` decoding the prompt as a batch of n. Tokens/s,
        KV bytes allocated against the unique tokens stored.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import sys
import time

from absl import app, flags

from apr_jax import config_files
from apr_jax.errors import UserError, cli_main, parse_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "", "Write the records as a JSON list to this file.")
flags.DEFINE_integer("repeats", 3, "Timed repeats per configuration (median reported).", lower_bound=1)
flags.DEFINE_integer("new_tokens", 64, "Tokens generated per timed run.", lower_bound=2)
flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
flags.DEFINE_list("systems", ["apr_jax", "transformers"], "Systems to compare.")
flags.DEFINE_string("model", "", "GGUF model; empty = the embedded SmolLM2-135M-Instruct.")
flags.DEFINE_list("ks", ["1", "2", "4", "8"], "fork: thread counts.")
flags.DEFINE_integer("thread_tokens", 48, "fork: tokens per thread (n).", lower_bound=1)
flags.DEFINE_integer("after_tokens", 16, "fork: tokens after the join (m).", lower_bound=1)
flags.DEFINE_string("train_config", "configs/countdown_small_sos.py", "train: the config to measure.")
flags.DEFINE_list("methods", ["apr_jax", "apr_jax_flat", "sequential", "host"], "fork: methods.")
flags.DEFINE_list("pools", ["1536", "3072", "6144"], "attention: KV slots per lane to compare.")
flags.DEFINE_list("attentions", ["dense", "tree"], "attention: the attention paths to compare.")
flags.DEFINE_integer("problems", 16, "attention: Countdown problems per run.", lower_bound=1)
flags.DEFINE_integer("lanes", 8, "attention, step: lanes.", lower_bound=1)
flags.DEFINE_list("scaling_pools", ["1024", "2048", "4096"], "scaling: KV slots per lane.")
flags.DEFINE_list("scaling_threads", ["4", "16"], "scaling: threads per request (one lane).")
flags.DEFINE_list("scaling_lanes", ["1", "4"], "scaling: lanes.")
flags.DEFINE_list("scaling_blocks", ["128"], "scaling: tree attention block sizes (KV slots per "
                  "online-softmax step, `TreeSpec.block`); each past the first is timed as tree@N.")
flags.DEFINE_string("scaling_shape", "8b", "scaling: attention shape, 8b (32 q heads, 8 KV heads, "
                    "head_dim 128: Llama-3-8B) or tiny (4, 2, 16).")
flags.DEFINE_integer("prompt_tokens", 512, "scaling: the shared prompt of each lane.", lower_bound=1)
flags.DEFINE_integer("prefill_prompt", 4000, "prefill: the prompt alone.", lower_bound=2)
flags.DEFINE_integer("prefill_beside", 2000, "prefill: the prompt beside decoding lanes.",
                     lower_bound=2)
flags.DEFINE_integer("prefill_chunk", 256, "prefill, prefix: tokens per prefill call (256 suits a CPU; "
                     "accelerators want larger).", lower_bound=1)
flags.DEFINE_integer("prefix_tokens", 1000, "prefix: the shared system prompt.", lower_bound=1)
flags.DEFINE_integer("prefix_requests", 32, "prefix: requests sharing it.", lower_bound=1)
flags.DEFINE_integer("samples_prompt", 2000, "samples: prompt tokens.", lower_bound=2)
flags.DEFINE_integer("samples_n", 8, "samples: samples of the prompt.", lower_bound=1)
flags.DEFINE_integer("samples_tokens", 128, "samples: tokens per sample.", lower_bound=1)
flags.DEFINE_integer("step_at", 128, "step: the engine step whose state is timed.", lower_bound=1)
flags.DEFINE_integer("step_calls", 50, "step: calls per timed repeat.", lower_bound=1)
flags.DEFINE_integer("own_tokens", 32, "scaling: tokens of each thread's own.", lower_bound=1)
flags.DEFINE_integer("apr_call_tokens", 4096, "apr: each call's token budget (the original's).",
                     lower_bound=1)
flags.DEFINE_integer("apr_slots", 8192, "apr: KV slots per lane (one search per lane).", lower_bound=64)

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


def _fork_prompt(tok, tags_open, k):
  """A chat prompt that opens a parallel block with k outlines and ends with the fork trigger."""
  head = tok.encode(tok.apply_chat([{"role": "user", "content": "Plan a weekend trip to Paris."}]))
  outl = [t for j in range(k) for t in tok.encode(f"<Outline>{j + 1}: part {j + 1}</Outline>\n")]
  return head + tok.encode(tags_open) + outl


def bench_fork():
  import dataclasses
  from apr_jax import checkpoint
  from apr_jax.default_model import smollm2_path
  from apr_jax.engine.generate import Generator, bucket
  from apr_jax.engine.host import HostOrchestrator
  from apr_jax.engine.runner import Request, TreeEngine
  from apr_jax.engine.tree import TreeSpec
  from apr_jax.model.vocab import add_tokens
  from apr_jax.protocols import MULTIVERSE_TAGS, THREADWEAVER_TAGS, build

  n, m = FLAGS.thread_tokens, FLAGS.after_tokens
  ks = [int(k) for k in FLAGS.ks]
  unknown = set(FLAGS.methods) - {"apr_jax", "apr_jax_flat", "sequential", "host"}
  if unknown:
    raise UserError(f"unknown methods {sorted(unknown)}")
  model, tok = checkpoint.load(FLAGS.model or smollm2_path())
  model, _ = add_tokens(model, tok, sorted(set(MULTIVERSE_TAGS) | set(THREADWEAVER_TAGS)))
  # threads run exactly n tokens: no stop tokens, no closing tags forced at the budget
  mv = dataclasses.replace(build("multiverse", tok), child_stop=(), child_close=())
  # (and a thread ended by its budget joins as usual: not ThreadWeaver's malformed-block end)
  tw = dataclasses.replace(build("threadweaver", tok), child_stop=(), child_close=(),
                           malformed_close=())
  runners = {}
  prompt_len = {}
  for k in ks:
    p_mv = _fork_prompt(tok, "<Parallel>\n<Goal>\n", k) + tok.encode("</Goal>")
    p_tw = _fork_prompt(tok, "<Parallel>\n<Outlines>\n", k) + tok.encode("</Outlines>")
    pre = len(mv.child_pre) + len(mv.label([], k)) + len(mv.child_post)
    need = len(p_mv) + k * (pre + n) + len(mv.after_join) + m
    slots = -(-need // 16) * 16
    prompt_len[k] = len(p_mv)

    def make_engine(pr, prompt, k=k, slots=slots):
      spec = TreeSpec(protocol=pr, root_stop=(), lanes=1, rows=k, threads=k + 1, slots=slots,
                      chunk=64)
      eng = TreeEngine(model, tok, spec, segment_steps=1 << 20)
      req = Request(prompt, max_thread_tokens=n, max_total_tokens=k * n + m)

      def run():
        r = eng.run([req])[0]
        assert r.total_tokens == k * n + m, (r.total_tokens, r.stop_reason)
        return {"wall_s": r.wall_s, "kv_bytes": r.kv_bytes, "kv_stored_bytes": r.kv_stored_bytes,
                "steps": r.steps, "critical_path": r.critical_path, "total_tokens": r.total_tokens}

      def join_cost():
        """Per-step times (one step per segment): the steps after the last thread's final
        write that run the join's forced tokens (stitch: `\n<Conclusion>\n`; flat: the
        re-prefill) up to the parent's first sample, in units of the median thread-decode
        step."""
        times = []
        eng.segment_steps = 1
        try:
          r = eng.run([req], on_segment=lambda seg: times.append(seg["seconds"]))[0]
        finally:
          eng.segment_steps = 1 << 20
        kids = [t for t in r.threads if t["parent"] == 0]
        end = max(t["end_step"] for t in kids)
        start = max(t["start_step"] for t in kids)
        decode = statistics.median(times[start + 2:end - 1])
        queued = len(pr.after_join) + (k * (pre + n) if pr.join == "flat" else 0)
        join = sum(times[end + 1:end + 1 + -(-queued // spec.chunk)])
        return {"join_s": join, "decode_step_s": decode, "join_cost_decode_steps": join / decode}
      return run, join_cost

    if "apr_jax" in FLAGS.methods:
      runners[("apr_jax", k)] = make_engine(mv, p_mv)
    if "apr_jax_flat" in FLAGS.methods:
      runners[("apr_jax_flat", k)] = make_engine(tw, p_tw)
    if "sequential" in FLAGS.methods:
      gen = Generator(model, tok)

      def run_seq(k=k, prompt=p_mv, gen=gen):
        gen.generate_ids([prompt], max_new_tokens=k * n + m, stop_ids=[])
        s = gen.stats
        slots_seq = bucket(len(prompt)) + bucket(k * n + m)
        return {"wall_s": s["prefill_s"] + s["decode_s"], "kv_bytes": slots_seq * host_bpt,
                "kv_stored_bytes": (len(prompt) + k * n + m) * host_bpt,
                "critical_path": k * n + m, "total_tokens": k * n + m}
      runners[("sequential", k)] = (run_seq, None)
    if "host" in FLAGS.methods:
      host = HostOrchestrator(model, slots=slots)
      host_bpt = host.bytes_per_token
      prefixes = [list(tw.child_pre) + tw.label([], i + 1) + list(tw.child_post) for i in range(k)]

      def run_host(host=host, prompt=p_tw, prefixes=prefixes, k=k):
        r = host.fork_join(prompt, prefixes, n, tw.after_join, m)
        stored = (len(prompt) + k * (len(prefixes[0]) + n)) * host.bytes_per_token
        return {"wall_s": r["wall_s"], "kv_bytes": r["kv_bytes"], "kv_stored_bytes": stored,
                "join_s": r["join_s"], "reprefill_tokens": r["reprefill_tokens"],
                "critical_path": n + m, "total_tokens": k * n + m}
      runners[("host", k)] = (run_host, None)
  host_bpt = 2 * model.cfg.n_layers * model.cfg.n_kv_heads * model.cfg.head_dim * 4

  extra = {}
  for key, (fn, jc) in runners.items():  # warm-up: compile, allocate; join cost once
    _log(f"warm-up {key[0]} k={key[1]}")
    fn()
    if jc is not None:
      extra[key] = jc()
  samples = {key: [] for key in runners}
  for r in range(FLAGS.repeats):
    for key, (fn, _) in runners.items():
      res = fn()
      samples[key].append(res)
      _log(f"repeat {r + 1}/{FLAGS.repeats} {key[0]:13s} k={key[1]}: {res['wall_s']:.3f} s")
  records = []
  for (method, k), rs in samples.items():
    rec = {"benchmark": "fork", "method": method, "k": k, "prompt_tokens": prompt_len[k],
           "thread_tokens": n, "after_tokens": m, "repeats": len(rs),
           "wall_s": round(statistics.median(x["wall_s"] for x in rs), 4),
           "wall_s_all": [round(x["wall_s"], 4) for x in rs],
           "kv_bytes": rs[0]["kv_bytes"], "kv_stored_bytes": rs[0]["kv_stored_bytes"],
           "total_tokens": rs[0]["total_tokens"], "critical_path": rs[0]["critical_path"]}
    if "join_s" in rs[0]:
      rec["join_s"] = round(statistics.median(x["join_s"] for x in rs), 4)
    rec.update({kk: round(v, 4) for kk, v in extra.get((method, k), {}).items()})
    records.append(rec)
  for r in records:
    seq = next((x for x in records if x["method"] == "sequential" and x["k"] == r["k"]), None)
    host = next((x for x in records if x["method"] == "host" and x["k"] == r["k"]), None)
    if seq:
      r["wall_vs_sequential"] = round(r["wall_s"] / seq["wall_s"], 3)
    if host:
      r["wall_vs_host"] = round(r["wall_s"] / host["wall_s"], 3)
    r["kv_bytes_vs_stored"] = round(r["kv_bytes"] / r["kv_stored_bytes"], 3)
  print(f"{'method':13s} {'k':>2s} {'wall s':>8s} {'x seq':>6s} {'x host':>7s} {'KV MB':>7s} "
        f"{'KV/stored':>9s} {'join s':>7s} {'join/decode step':>16s}")
  for r in records:
    print(f"{r['method']:13s} {r['k']:2d} {r['wall_s']:8.3f} {r.get('wall_vs_sequential', float('nan')):6.2f} "
          f"{r.get('wall_vs_host', float('nan')):7.2f} {r['kv_bytes'] / 2**20:7.1f} "
          f"{r['kv_bytes_vs_stored']:9.2f} {r.get('join_s', float('nan')):7.3f} "
          f"{r.get('join_cost_decode_steps', float('nan')):16.2f}")
  return records


def bench_train():
  """Training tokens/s of the small Countdown config (packed rows of random tokens with a
  tree mask, the config's shapes) and model FLOP utilisation against the running machine's
  measured float32 matmul peak (a 2048^3 matmul), both measured in this process."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from apr_jax.model.config import ModelConfig
  from apr_jax.model.transformer import Transformer
  from apr_jax.training.trainer import make_optimizer, make_step

  c = config_files.load(FLAGS.train_config, "train", "bench train")
  m = dict(c.model)
  cfg = ModelConfig(arch=m.pop("arch", "llama"), vocab_size=c.vocab_size, **m)
  b, n = c.train.batch_size, c.seq_len
  x = jnp.ones((2048, 2048), jnp.float32)
  mm = jax.jit(lambda a: a @ a)
  mm(x).block_until_ready()
  peaks = []
  for _ in range(5):
    t0 = time.perf_counter()
    mm(x).block_until_ready()
    peaks.append(2 * 2048 ** 3 / (time.perf_counter() - t0))
  peak = statistics.median(peaks)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx, _ = make_optimizer(1e-3, 10, 100, 0.0, 1.0)
  opt = tx.init(params)
  step = make_step(graphdef, rest, tx)
  rng = np.random.default_rng(0)
  # rows of 4 packed sequences each (block-diagonal runs), labels everywhere
  groups = np.repeat(np.arange(4), n // 4)[None].repeat(b, 0).astype(np.int32)
  vis = np.zeros((b, c.max_groups, c.max_groups), bool)
  batch = {"tokens": jnp.asarray(rng.integers(3, c.vocab_size, (b, n)), jnp.int32),
           "positions": jnp.asarray(np.tile(np.arange(n // 4), 4)[None].repeat(b, 0), jnp.int32),
           "groups": jnp.asarray(groups), "vis": jnp.asarray(vis),
           "labels": jnp.asarray(rng.integers(3, c.vocab_size, (b, n)), jnp.int32)}
  params, opt, loss, _ = step(params, opt, batch)
  loss.block_until_ready()
  times = []
  for _ in range(FLAGS.repeats):
    t0 = time.perf_counter()
    params, opt, loss, _ = step(params, opt, batch)
    loss.block_until_ready()
    times.append(time.perf_counter() - t0)
  dt = statistics.median(times)
  tokens = b * n
  dense = cfg.num_params(include_embeddings=False)
  # 6 N per token for the weights (fwd + bwd), the output layer, and attention over the row
  flops = tokens * (6 * dense + 6 * cfg.vocab_size * cfg.dim + 6 * 2 * cfg.n_layers * n * cfg.n_heads * cfg.head_dim)
  rec = {"benchmark": "train", "config": FLAGS.train_config, "params": cfg.num_params(),
         "batch": b, "seq_len": n, "step_s": round(dt, 4), "tokens_per_s": round(tokens / dt, 1),
         "model_flops_per_step": flops, "achieved_gflops": round(flops / dt / 1e9, 2),
         "peak_matmul_gflops": round(peak / 1e9, 2), "mfu": round(flops / dt / peak, 4)}
  print(f"{'config':40s} {'tok/s':>9s} {'GFLOP/s':>8s} {'peak':>8s} {'MFU':>6s}")
  print(f"{FLAGS.train_config:40s} {rec['tokens_per_s']:9.0f} {rec['achieved_gflops']:8.1f} "
        f"{rec['peak_matmul_gflops']:8.1f} {rec['mfu']:6.1%}")
  return [rec]


def bench_attention():
  """Engine step time of the shipped parallel (APR) Countdown model on the same problems
  with each attention path and pool size, side by side: the tree path's step time should not
  grow with the pool; the KV slots read per step (counted by the engine) against the slots
  some token saw (the unique visible KV)."""
  from apr_jax import checkpoint
  from apr_jax.evaluation import countdown as ev
  from apr_jax.shipped import resolve
  from apr_jax.tasks import countdown as cd
  model, tok = checkpoint.load(resolve("countdown_small_apr"))
  problems = cd.test_split(cd.SETTINGS["small"], FLAGS.problems, seed=0)
  reqs = ev.requests(tok, problems)
  pools = [int(x) for x in FLAGS.pools]
  bad = set(FLAGS.attentions) - {"dense", "tree"}
  if bad:
    raise UserError(f"unknown --attentions {sorted(bad)}")
  engines = {}
  for pool in pools:
    for att in FLAGS.attentions:
      _log(f"compiling {att} attention, {pool} slots per lane")
      engines[(att, pool)] = ev.make_engine(model, tok, "apr_tok", lanes=FLAGS.lanes, slots=pool,
                                            attention=att)
  samples, outputs = {k: [] for k in engines}, {}
  for r in range(FLAGS.repeats + 1):  # the first round warms up
    for key, eng in engines.items():
      st0 = (int(eng.state.step), [float(x) for x in eng.state.reads])
      t0 = time.perf_counter()
      res = eng.run(reqs)
      wall = time.perf_counter() - t0
      steps = int(eng.state.step) - st0[0]
      seen, read = (float(x) - y for x, y in zip(eng.state.reads, st0[1]))
      outputs[key] = [x.token_ids for x in res]
      if r:
        samples[key].append(dict(wall_s=wall, steps=steps, seen=seen / steps, read=read / steps))
        _log(f"repeat {r}/{FLAGS.repeats} {key[0]:5s} {key[1]:6d} slots: {wall:.2f} s, "
             f"{1e3 * wall / steps:.2f} ms/step")
  ref = outputs[next(iter(outputs))]
  bpt = 2 * model.cfg.n_kv_heads * model.cfg.head_dim * 4  # float32 K and V, per layer
  records = []
  for (att, pool), rs in samples.items():
    step_ms = statistics.median(1e3 * x["wall_s"] / x["steps"] for x in rs)
    records.append({
        "benchmark": "attention", "attention": att, "slots": pool, "lanes": FLAGS.lanes,
        "problems": FLAGS.problems, "repeats": len(rs), "steps": rs[0]["steps"],
        "wall_s": round(statistics.median(x["wall_s"] for x in rs), 3),
        "step_ms": round(step_ms, 3),
        "kv_read_bytes_per_step_per_layer": round(rs[0]["read"] * bpt),
        "kv_visible_bytes_per_step_per_layer": round(rs[0]["seen"] * bpt),
        "same_outputs": outputs[(att, pool)] == ref})
  for r in records:
    small = next(x for x in records if x["attention"] == r["attention"] and x["slots"] == pools[0])
    dense = next((x for x in records if x["attention"] == "dense" and x["slots"] == r["slots"]), None)
    r["step_vs_smallest_pool"] = round(r["step_ms"] / small["step_ms"], 3)
    if dense:
      r["speedup_vs_dense"] = round(dense["step_ms"] / r["step_ms"], 3)
    r["read_vs_visible"] = round(r["kv_read_bytes_per_step_per_layer"] /
                                 max(r["kv_visible_bytes_per_step_per_layer"], 1), 3)
  print(f"{'attention':9s} {'slots':>6s} {'steps':>6s} {'ms/step':>8s} {'x pool0':>8s} "
        f"{'x dense':>8s} {'KV read/step':>13s} {'read/visible':>12s} same")
  for r in records:
    print(f"{r['attention']:9s} {r['slots']:6d} {r['steps']:6d} {r['step_ms']:8.2f} "
          f"{r['step_vs_smallest_pool']:8.2f} {r.get('speedup_vs_dense', float('nan')):8.2f} "
          f"{r['kv_read_bytes_per_step_per_layer'] / 2**20:11.2f}MB {r['read_vs_visible']:12.2f} "
          f"{r['same_outputs']}")
  return records


def _tree_step(lanes, slots, threads, prompt, own):
  """One decode step of a synthetic tree: per lane a prompt of `prompt` slots shared by
  `threads` threads, each with `own` tokens of its own after it (written in turns, so the
  spans interleave as threads that decode together write them), the rest of the pool free;
  one query per thread. Returns the mask [lanes, threads, slots] (what each query sees)."""
  import numpy as np
  mask = np.zeros((lanes, threads, slots), bool)
  mask[:, :, :prompt] = True
  for t in range(threads):
    mask[:, t, prompt + t:prompt + own * threads:threads] = True
  return mask


def bench_scaling():
  """The attention of one decode step, tree (`attend_visible`) vs dense (`attend_split`),
  on a synthetic thread tree: step time and KV bytes read vs the pool size, the threads per
  request and the lanes (one attention layer of the chosen shape, bfloat16 on GPU/TPU and
  float32 on CPU, median of --repeats). Pallas (`attend_pages`) is timed on TPU only (off
  TPU it runs interpreted)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from apr_jax.engine.tree.packing import visible_slots
  from apr_jax.model.attention import attend_split, attend_visible
  from apr_jax.model.config import resolve_dtype
  from apr_jax.model.pallas_attention import attend_pages
  shapes = {"8b": (32, 8, 128), "tiny": (4, 2, 16)}
  if FLAGS.scaling_shape not in shapes:
    raise UserError(f"--scaling_shape must be one of {', '.join(shapes)}")
  h, kh, d = shapes[FLAGS.scaling_shape]
  dtype = jnp.dtype(resolve_dtype("auto"))
  block = 128
  rng = np.random.default_rng(0)
  def positive(flag):  # a list flag of positive integers, or a clear error
    vals = getattr(FLAGS, flag)
    if not vals or not all(v.isdigit() and int(v) > 0 for v in vals):
      raise UserError(f"--{flag} must list positive integers, got {','.join(vals)!r}")
    return [int(v) for v in vals]
  pools, threads, lane_counts, blocks = (positive(f) for f in (
      "scaling_pools", "scaling_threads", "scaling_lanes", "scaling_blocks"))
  trees = {("tree" if i == 0 else f"tree@{b}"): b for i, b in enumerate(blocks)}
  paths = ["dense", *trees] + (["pallas"] if jax.default_backend() == "tpu" else [])
  grid = sorted({(lanes, slots, k) for slots in pools for k in threads for lanes in lane_counts})
  records = []
  for lanes, slots, k in grid:
    used = FLAGS.prompt_tokens + k * FLAGS.own_tokens
    if slots % block or slots < used:
      raise UserError(f"--scaling_pools: {slots} must be a multiple of {block} holding the prompt "
                      f"and the threads' tokens ({used})")
    mask = jnp.asarray(_tree_step(lanes, slots, k, FLAGS.prompt_tokens, FLAGS.own_tokens))
    q = jnp.asarray(rng.normal(size=(lanes, k, h, d)), dtype)
    kc = jnp.asarray(rng.normal(size=(lanes, kh, slots, d)), dtype)
    vc = jnp.asarray(rng.normal(size=(lanes, kh, slots, d)), dtype)
    kn = jnp.asarray(rng.normal(size=(lanes, kh, k, d)), dtype)
    vn = jnp.asarray(rng.normal(size=(lanes, kh, k, d)), dtype)
    mn = jnp.broadcast_to(jnp.eye(k, dtype=bool), (lanes, k, k))
    idx, count = jax.vmap(visible_slots)(mask)
    args = (q, kc, vc, mask, kn, vn, mn, idx, count)  # arguments, so nothing is constant-folded
    tree_fn = lambda bk: jax.jit(lambda q, kc, vc, m, kn, vn, mn, i, c: attend_visible(
        q, kc, vc, m, i, c, (jnp.max(c) + bk - 1) // bk, kn, vn, mn, bk))
    fns = {"dense": jax.jit(lambda q, kc, vc, m, kn, vn, mn, i, c: attend_split(q, kc, vc, m, kn, vn, mn)),
           **{name: tree_fn(bk) for name, bk in trees.items()},
           "pallas": jax.jit(lambda q, kc, vc, m, kn, vn, mn, i, c: attend_pages(
               q, kc, vc, m, kn, vn, mn, block))}
    per_slot = 2 * kh * d * dtype.itemsize
    reads = {"dense": lanes * slots,
             **{name: lanes * int(-(-int(jnp.max(count)) // bk)) * bk for name, bk in trees.items()},
             "pallas": int(jnp.sum(jnp.any(mask.reshape(lanes, k, -1, block), axis=(1, 3)))) * block}
    visible = int(jnp.sum(jnp.any(mask, axis=1)))
    out = {}
    for path in paths:
      out[path] = np.asarray(jax.block_until_ready(fns[path](*args)), np.float32)  # compile, warm
      times = []
      for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fns[path](*args))
        times.append(time.perf_counter() - t0)
      records.append({"benchmark": "scaling", "attention": path, "lanes": lanes, "slots": slots,
                      "threads": k, "prompt": FLAGS.prompt_tokens, "shape": FLAGS.scaling_shape,
                      "block": trees.get(path, block if path == "pallas" else None),
                      "dtype": str(dtype), "ms": round(1e3 * statistics.median(times), 3),
                      "kv_read_mb": round(reads[path] * per_slot / 2**20, 3),
                      "kv_visible_mb": round(visible * per_slot / 2**20, 3),
                      "max_abs_diff_vs_dense": float(np.abs(out[path] - out["dense"]).max())})
      _log(f"{path:10s} lanes {lanes} slots {slots} threads {k}: {records[-1]['ms']:.3f} ms")
  print(f"{'attention':10s} {'lanes':>5s} {'slots':>6s} {'threads':>7s} {'ms':>9s} {'x dense':>8s} "
        f"{'KV read MB':>10s} {'visible MB':>10s}")
  for r in records:
    dense = next(x for x in records if x["attention"] == "dense" and
                 (x["lanes"], x["slots"], x["threads"]) == (r["lanes"], r["slots"], r["threads"]))
    r["speedup_vs_dense"] = round(dense["ms"] / r["ms"], 3)
    print(f"{r['attention']:10s} {r['lanes']:5d} {r['slots']:6d} {r['threads']:7d} {r['ms']:9.3f} "
          f"{r['speedup_vs_dense']:8.2f} {r['kv_read_mb']:10.2f} {r['kv_visible_mb']:10.2f}")
  return records


def _pct(xs, q):
  xs = sorted(xs)
  return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def _interleaved(runners: dict, describe) -> dict:
  """Each runner once to warm up, then --repeats rounds of all of them in turn (noise on a
  shared machine hits every system alike): {name: [result of each round]}."""
  for name, fn in runners.items():
    _log(f"warm-up {name}")
    fn()
  got = {name: [] for name in runners}
  for rep in range(FLAGS.repeats):
    for name, fn in runners.items():
      got[name].append(fn())
      _log(f"repeat {rep + 1}/{FLAGS.repeats} {name:16s}: {describe(got[name][-1])}")
  return got


def bench_prefill():
  """Part 1, alone: one prompt's time to first token through the engine with the prefill
  program, through the engine's loop alone (chunks of `chunk` tokens), and `Generator`'s
  (prefill + first token), interleaved, median of --repeats. Part 2, beside decoders: 8
  lanes, 7 of them decoding from short prompts, the long prompt arriving in the eighth; one
  engine step per segment, so every step's wall time (prefill calls included) is a
  decoder's time per token until the long prompt's first token."""
  from apr_jax import checkpoint
  from apr_jax.default_model import smollm2_path
  from apr_jax.engine.generate import Generator
  from apr_jax.engine.runner import Request, TreeEngine
  from apr_jax.engine.tree import TreeSpec

  model, tok = checkpoint.load(FLAGS.model or smollm2_path())
  text = tok.encode(tok.apply_chat([{"role": "user", "content": PROMPT}]))
  make = lambda p: (text * (p // len(text) + 1))[:p]
  pa, pb, c = FLAGS.prefill_prompt, FLAGS.prefill_beside, FLAGS.prefill_chunk
  if max(pa, pb) + 64 > model.cfg.max_seq_len:
    raise UserError(f"prompts of {max(pa, pb)} tokens do not fit the model's context")
  blocks = lambda n: -(-n // 64) * 64
  records = []

  # part 1: alone
  ids = make(pa)
  base = TreeSpec(root_stop=(), lanes=1, requests=1, rows=1, threads=1, slots=blocks(pa + 64),
                  chunk=32)
  engines = {"apr_jax_prefill": TreeEngine(model, tok, dataclasses.replace(base, prefill=c),
                                           segment_steps=1 << 20),
             "apr_jax_loop": TreeEngine(model, tok, base, segment_steps=1 << 20)}
  gen = Generator(model, tok)

  def ttft_engine(eng):
    t0 = time.perf_counter()
    eng.run([Request(ids, max_thread_tokens=1)])
    return time.perf_counter() - t0

  def ttft_gen():
    t0 = time.perf_counter()
    gen.generate_ids([ids], max_new_tokens=1, stop_ids=[])
    return time.perf_counter() - t0
  runners = {name: functools.partial(ttft_engine, e) for name, e in engines.items()}
  runners["generator"] = ttft_gen
  got = _interleaved(runners, lambda x: f"{x:.2f} s to first token")
  g = statistics.median(got["generator"])
  for name, xs in got.items():
    records.append({"benchmark": "prefill", "part": "alone", "system": name, "prompt_tokens": pa,
                    "prefill_chunk": c if name == "apr_jax_prefill" else None,
                    "repeats": len(xs), "ttft_s": round(statistics.median(xs), 3),
                    "x_generator": round(statistics.median(xs) / g, 2)})
  del engines

  # part 2: beside 7 decoding lanes
  long_ids, short = make(pb), make(32)
  window = pb // 32 + 16   # decoder tokens: past the long prompt's first token either way
  spec = TreeSpec(root_stop=(), lanes=8, requests=1, rows=1, threads=1,
                  slots=blocks(max(pb, 32 + window) + 64), chunk=32)
  for name, sp in (("loop", spec), ("prefill", dataclasses.replace(spec, prefill=c))):
    eng = TreeEngine(model, tok, sp, segment_steps=1)
    reqs = [Request(short, max_thread_tokens=window) for _ in range(7)]
    reqs.append(Request(long_ids, max_thread_tokens=1))
    # warm-up: admission, release, every step variant, the prefill program
    eng.run([Request(short, max_thread_tokens=2)] * 7 + [Request(long_ids, max_thread_tokens=1)])
    stamps, first = [], {}

    def on_done(i, _r, first=first):
      first.setdefault(i, time.perf_counter())
    t0 = time.perf_counter()
    eng.run(reqs, on_segment=lambda seg: stamps.append(time.perf_counter()), on_done=on_done)
    latency = first[7] - t0
    steps = [b - a for a, b in zip([t0] + stamps, stamps) if b <= first[7]]
    records.append({"benchmark": "prefill", "part": "beside_7_decoders", "system": name,
                    "prompt_tokens": pb, "prefill_chunk": c if name == "prefill" else None,
                    "latency_s": round(latency, 3), "decoder_steps": len(steps),
                    "decoder_ms_p50": round(1e3 * _pct(steps, 50), 1),
                    "decoder_ms_p99": round(1e3 * _pct(steps, 99), 1),
                    "prefill_calls": eng.stats["prefill_calls"]})
    _log(f"beside decoders, {name}: first token after {latency:.2f} s; decoder step p50 "
         f"{records[-1]['decoder_ms_p50']} ms, p99 {records[-1]['decoder_ms_p99']} ms")
    del eng
  print(f"{'alone':18s} {'prompt':>7s} {'TTFT s':>8s} {'x generator':>12s}")
  for r in records[:3]:
    print(f"{r['system']:18s} {r['prompt_tokens']:7d} {r['ttft_s']:8.2f} {r['x_generator']:12.2f}")
  print(f"{'beside 7 decoders':18s} {'prompt':>7s} {'latency s':>10s} {'decoder p50 ms':>15s} "
        f"{'p99 ms':>8s}")
  for r in records[3:]:
    print(f"{r['system']:18s} {r['prompt_tokens']:7d} {r['latency_s']:10.2f} "
          f"{r['decoder_ms_p50']:15.1f} {r['decoder_ms_p99']:8.1f}")
  return records


def bench_prefix():
  """R requests, each an S-token system prompt + its own question, all submitted at once to
  4 lanes of 8 request slots; each request's time to first token (it ends there) with the
  prefix cache (`TreeEngine(prefix_cache=16)`) and without (0), the same engine program
  (prefill program on, `--prefill_chunk`), interleaved, median of --repeats."""
  from apr_jax import checkpoint
  from apr_jax.default_model import smollm2_path
  from apr_jax.engine.runner import Request, TreeEngine
  from apr_jax.engine.tree import TreeSpec

  model, tok = checkpoint.load(FLAGS.model or smollm2_path())
  text = tok.encode("You are a careful assistant. Answer briefly and check every step. ")
  s_tok, n_req = FLAGS.prefix_tokens, FLAGS.prefix_requests
  system = (text * (s_tok // len(text) + 1))[:s_tok]
  reqs = [Request(system + tok.encode(f" Question {i}: what is {i} + {2 * i + 1}?"),
                  max_thread_tokens=1) for i in range(n_req)]
  longest = max(len(r.prompt) for r in reqs)
  lanes, per = 4, 8
  spec = TreeSpec(root_stop=(), lanes=lanes, requests=per, rows=per, threads=per,
                  slots=-(-per * (longest + 8) // 64) * 64, chunk=32, prefill=FLAGS.prefill_chunk)
  engines = {"prefix_cache": TreeEngine(model, tok, spec, segment_steps=4, prefix_cache=16),
             "no_prefix_cache": TreeEngine(model, tok, spec, segment_steps=4, prefix_cache=0)}

  def run(eng):
    t0, first = time.perf_counter(), {}
    eng.stats["prefix_tokens"] = 0
    eng.run(reqs, on_done=lambda i, _r: first.setdefault(i, time.perf_counter() - t0))
    return {"ttft": [first[i] for i in range(n_req)], "wall_s": time.perf_counter() - t0,
            "prefix_tokens": eng.stats["prefix_tokens"]}
  got = _interleaved({name: functools.partial(run, eng) for name, eng in engines.items()},
                     lambda x: f"TTFT median {statistics.median(x['ttft']):.2f} s, "
                               f"all done {x['wall_s']:.2f} s")
  records = []
  for name, xs in got.items():
    records.append({"benchmark": "prefix", "system": name, "requests": n_req,
                    "system_prompt_tokens": s_tok, "lanes": lanes, "requests_per_lane": per,
                    "repeats": len(xs),
                    "ttft_s_median": round(statistics.median(statistics.median(x["ttft"]) for x in xs), 3),
                    "ttft_s_p90": round(statistics.median(_pct(x["ttft"], 90) for x in xs), 3),
                    "wall_s": round(statistics.median(x["wall_s"] for x in xs), 3),
                    "prefix_tokens_read": xs[-1]["prefix_tokens"]})
  off = records[1]
  for r in records:
    r["ttft_vs_no_cache"] = round(r["ttft_s_median"] / off["ttft_s_median"], 3)
  print(f"{'system':16s} {'TTFT median s':>14s} {'TTFT p90 s':>11s} {'all done s':>11s} "
        f"{'x no cache':>11s} {'prefix tokens read':>19s}")
  for r in records:
    print(f"{r['system']:16s} {r['ttft_s_median']:14.2f} {r['ttft_s_p90']:11.2f} {r['wall_s']:11.2f} "
          f"{r['ttft_vs_no_cache']:11.2f} {r['prefix_tokens_read']:19d}")
  return records


def bench_samples():
  """n samples of one prompt: the engine (`Request(n=...)`, the prompt prefilled and stored
  once, the samples decoding side by side) vs `Generator` (a batch of n copies of the
  prompt), interleaved, median of --repeats. Both sample at temperature 1 and decode
  exactly T tokens (no stop token)."""
  from apr_jax import checkpoint
  from apr_jax.default_model import smollm2_path
  from apr_jax.engine.generate import Generator, bucket
  from apr_jax.engine.runner import Request, TreeEngine
  from apr_jax.engine.sampling import SamplingConfig
  from apr_jax.engine.tree import TreeSpec

  p, n, t = FLAGS.samples_prompt, FLAGS.samples_n, FLAGS.samples_tokens
  model, tok = checkpoint.load(FLAGS.model or smollm2_path())
  if p + t > model.cfg.max_seq_len:
    raise UserError(f"--samples_prompt + --samples_tokens ({p + t}) > the model's context "
                    f"({model.cfg.max_seq_len})")
  text = tok.encode(tok.apply_chat([{"role": "user", "content": PROMPT}]))
  ids = (text * (p // len(text) + 1))[:p]
  samp = SamplingConfig(temperature=1.0)
  unique = p + n * t                 # the prompt once, every sample's tokens
  slots = -(-(unique + n) // 64) * 64  # + each sample's copy of the prompt's last token
  spec = TreeSpec(root_stop=(), lanes=1, requests=n, rows=n, threads=n, slots=slots, chunk=256,
                  sampling=samp)
  eng = TreeEngine(model, tok, spec, segment_steps=1 << 20)
  gen = Generator(model, tok)

  def run_engine():
    t0 = time.perf_counter()
    r = eng.run([Request(ids, n=n, seed=0, max_thread_tokens=t)])[0]
    wall = time.perf_counter() - t0
    got = sum(s.total_tokens for s in r.samples) if n > 1 else r.total_tokens
    assert got == n * t, (got, r.stop_reason)
    return {"wall_s": wall, "kv_bytes": r.kv_bytes}

  def run_generator():
    t0 = time.perf_counter()
    _, n_gen, _ = gen.generate_ids([ids] * n, max_new_tokens=t, sampling=samp, stop_ids=[])
    wall = time.perf_counter() - t0
    assert int(n_gen.sum()) == n * t
    return {"wall_s": wall, "prefill_s": gen.stats["prefill_s"],
            "kv_bytes": n * bucket(p + t) * eng.bytes_per_token}

  runners = {"apr_jax": run_engine, "generator": run_generator}
  got = _interleaved(runners, lambda x: f"{n * t / x['wall_s']:7.1f} tok/s")
  records = []
  for name, rs in got.items():
    kv = rs[0]["kv_bytes"]
    records.append({"benchmark": "samples", "system": name, "prompt_tokens": p, "n": n,
                    "tokens_per_sample": t, "repeats": len(rs),
                    "tokens_per_s": round(statistics.median(n * t / x["wall_s"] for x in rs), 2),
                    "wall_s_median": round(statistics.median(x["wall_s"] for x in rs), 3),
                    "kv_bytes": kv, "unique_tokens": unique,
                    "kv_per_unique_token": round(kv / (unique * eng.bytes_per_token), 3)})
  base = records[1]["tokens_per_s"]
  for r in records:
    r["speedup_vs_generator"] = round(r["tokens_per_s"] / base, 2)
  print(f"{'system':10s} {'tok/s (median)':>15s} {'x generator':>12s} {'KV MB':>8s} "
        f"{'KV / unique tokens':>19s}")
  for r in records:
    print(f"{r['system']:10s} {r['tokens_per_s']:15.1f} {r['speedup_vs_generator']:12.2f} "
          f"{r['kv_bytes'] / 2**20:8.1f} {r['kv_per_unique_token']:19.2f}")
  return records


def bench_apr():
  """The original APR protocol on a checkpoint in its format (--model): the on-device engine
  (`--protocol apr`) vs the original's orchestration of calls on the host (`--apr_host`,
  every round of calls one batch), greedy, on the same --problems held-out problems of the
  checkpoint's setting, interleaved, median of --repeats. Also how many problems give the
  same final text and children in both, and each one's accuracy."""
  from apr_jax import checkpoint
  from apr_jax.engine.host_original import AprOriginalHost
  from apr_jax.evaluation import countdown as ev
  from apr_jax.tasks import countdown as cd
  from apr_jax.tasks.countdown import data
  from apr_jax.tasks.countdown import original as orig
  from apr_jax.engine.runner import Request
  if not FLAGS.model:
    raise UserError("bench apr needs --model: a checkpoint in the original APR format (e.g. "
                    "python -m apr_jax.train --config configs/countdown_small_sos.py "
                    "--config.format=apr_original)")
  model, tok = checkpoint.load(FLAGS.model)
  try:
    setting = data.read_checkpoint(FLAGS.model).get("setting", "apr")
  except UserError:
    setting = "apr"  # a released checkpoint (no apr_config.json): the paper's setting
  problems = cd.test_split(cd.SETTINGS[setting], 1000, seed=0)[:FLAGS.problems]
  prompts = [orig.apr_prompt(p) for p in problems]
  call, total = FLAGS.apr_call_tokens, 4 * FLAGS.apr_slots
  eng = ev.make_apr_engine(model, tok, lanes=FLAGS.lanes, rows=8, slots=FLAGS.apr_slots,
                           max_total_tokens=total)
  host = AprOriginalHost(model, tok, max_tokens=call, batch=max(len(problems), 1),
                         log=lambda *a: None)
  bos = [tok.bos_id] if tok.bos_id is not None else []
  out = {}

  def run_device():
    t0 = time.perf_counter()
    rs = eng.run([Request(bos + tok.encode(t), max_thread_tokens=call, max_total_tokens=total)
                  for t in prompts])
    wall = time.perf_counter() - t0
    out["device"] = [ev.apr_device_texts(r, tok, t) for r, t in zip(rs, prompts)]
    out["device_reasons"] = [r.stop_reason for r in rs]
    return {"wall_s": wall, "forks": sum(r.forks for r in rs)}

  def run_host():
    t0 = time.perf_counter()
    ss = host.solve(prompts)
    wall = time.perf_counter() - t0
    out["host"] = [(s.calls, [k for spawn in s.sub_calls for k in spawn]) for s in ss]
    out["host_errors"] = [s.error for s in ss]
    return {"wall_s": wall, "forks": sum(len(s.sub_calls) for s in ss)}

  got = _interleaved({"apr_jax": run_device, "host": run_host},
                     lambda x: f"{len(problems) / x['wall_s']:6.2f} problems/s, {x['forks']} spawns")
  same = sum(d[0][-1] == h[0][-1] and d[1] == h[1] for d, h in zip(out["device"], out["host"]))
  acc = {k: sum(ev.verdict(p, [c[-1]] + kids)[0] for p, (c, kids) in zip(problems, out[k]))
         / max(len(problems), 1) for k in ("device", "host")}
  records = []
  for name, rs in got.items():
    key = "device" if name == "apr_jax" else "host"
    records.append({"benchmark": "apr", "system": name, "problems": len(problems),
                    "setting": setting, "repeats": len(rs),
                    "problems_per_s": round(statistics.median(len(problems) / x["wall_s"] for x in rs), 3),
                    "wall_s_median": round(statistics.median(x["wall_s"] for x in rs), 3),
                    "spawns": rs[-1]["forks"], "accuracy": round(acc[key], 3),
                    "same_as_other": same})
  base = records[1]["problems_per_s"]
  for r in records:
    r["speedup_vs_host"] = round(r["problems_per_s"] / base, 2)
  print(f"{'system':8s} {'problems/s (median)':>20s} {'x host':>7s} {'spawns':>7s} {'accuracy':>9s}")
  for r in records:
    print(f"{r['system']:8s} {r['problems_per_s']:20.3f} {r['speedup_vs_host']:7.2f} "
          f"{r['spawns']:7d} {r['accuracy']:9.3f}")
  print(f"same final text and children: {same}/{len(problems)} problems")
  return records


def bench_step():
  """One 1-token engine step of the Countdown evaluation, timed by part: the row assignment,
  packing, packing + the model, the whole step (sampling, budgets and the protocol
  included), and the model's forward over as many tokens with one key each (its matmuls
  without attention). Each part is a jitted call on the engine state of --lanes problems at
  step --step_at (one per lane, the evaluation's engine shape); --step_calls calls per
  repeat, parts interleaved, median of --repeats."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from apr_jax import checkpoint
  from apr_jax.engine.tree import loop, packing
  from apr_jax.evaluation import countdown as ev
  from apr_jax.shipped import resolve
  from apr_jax.tasks import countdown as cd
  model, tok = checkpoint.load(resolve("countdown_small_apr"))
  eng = ev.make_engine(model, tok, "apr_tok", lanes=FLAGS.lanes, slots=1536, step_cost="auto")
  problems = cd.test_split(cd.SETTINGS["small"], FLAGS.lanes, seed=0)
  snap = []

  def keep(info):  # a copy of the state once the loop has passed --step_at
    if not snap and info["first_step"] + info["steps"] >= FLAGS.step_at:
      snap.append(jax.tree.map(lambda a: a.copy(), eng.state))

  eng.run(ev.requests(tok, problems), on_segment=keep)
  if not snap:
    raise UserError(f"the run ended before step {FLAGS.step_at}: lower --step_at")
  st, spec, g, params = snap[0], eng.spec, eng.graphdef, eng.params
  n_tok = spec.lanes  # a 1-token step: one token per lane

  def pack(st):
    return jax.vmap(lambda l: packing.pack(l, st.step, spec, 1))(st.lanes)

  def pack_model(st, params):
    lanes, pk = pack(st)
    visible = loop.visible_kv(pk, spec)[0]
    return nnx.merge(g, params).read_cache(pk["tok"], pk["pos"], pk["mask"], pk["mask_new"],
                                           st.cache, visible)

  def whole(st, params):  # the cache is not written: a call without donation would copy it
    lanes, out = loop.forward_step(nnx.merge(g, params), st, spec, 1)
    return loop.finish_lanes(lanes, out, st.step, spec)

  ones = (jnp.zeros((n_tok, 1), jnp.int32), jnp.zeros((n_tok, 1), jnp.int32),
          jnp.ones((n_tok, 1, 1), bool))
  parts = {"assign_rows": (lambda st, params: jax.vmap(
               lambda l: packing.assign_rows(l, spec))(st.lanes)),
           "pack": lambda st, params: pack(st),
           "pack+model": pack_model,
           "whole step": whole,
           "model, 1 key": lambda st, params: nnx.merge(g, params)(*ones)}

  def timed(fn):
    fn = jax.jit(fn)
    jax.block_until_ready(fn(st, params))  # compiled before the timed calls

    def run():
      t0 = time.perf_counter()
      for _ in range(FLAGS.step_calls):
        out = fn(st, params)
      jax.block_until_ready(out)
      return 1e3 * (time.perf_counter() - t0) / FLAGS.step_calls
    return run

  got = _interleaved({k: timed(f) for k, f in parts.items()}, lambda x: f"{x:.2f} ms")
  whole = statistics.median(got["whole step"])
  records = [{"benchmark": "step", "part": k, "lanes": spec.lanes, "slots": spec.slots,
              "step": int(st.step), "ms_median": round(statistics.median(v), 3),
              "share_of_step": round(statistics.median(v) / whole, 3), "repeats": len(v)}
             for k, v in got.items()]
  print(f"{'part':14s} {'ms (median)':>12s} {'x whole step':>13s}")
  for r in records:
    print(f"{r['part']:14s} {r['ms_median']:12.2f} {r['share_of_step']:13.2f}")
  return records


BENCHMARKS = {"decode": bench_decode, "fork": bench_fork, "train": bench_train,
              "attention": bench_attention, "scaling": bench_scaling,
              "samples": bench_samples, "prefill": bench_prefill,
              "prefix": bench_prefix, "step": bench_step, "apr": bench_apr}


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
  app.run(main, flags_parser=parse_flags)
