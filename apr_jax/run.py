"""Generate text with a model: `python -m apr_jax.run --prompt "What is 2+3?"`.

The default model is the embedded SmolLM2-135M-Instruct. `--json` prints one JSON object.
`--protocol threadweaver|multiverse|apr` runs the fork/join engine: the model forks by
writing the protocol's tags, the thread tree is shown live, and the summary at the end.
"""
from __future__ import annotations

import json
import sys
import time

from absl import app, flags

from apr_jax import config_files
from apr_jax.errors import UserError, cli_main, parse_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "", "A .gguf file, a Hugging Face model directory, or an apr_jax "
                    "checkpoint directory. Empty: the embedded SmolLM2-135M-Instruct.")
flags.DEFINE_string("tokenizer", "", "Tokenizer override: tokenizer.json dir, .model or .gguf.")
flags.DEFINE_multi_string("prompt", ["What is 2+3?"], "Prompt text; repeat for a batch.")
flags.DEFINE_enum("chat", "auto", ["auto", "on", "off"], "Wrap each prompt in the checkpoint's "
                  "chat template: auto = when it has one (plain text otherwise), on, off.")
flags.DEFINE_integer("max_new_tokens", 128, "Maximum tokens to generate per prompt.", lower_bound=1)
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.", lower_bound=0.0)
flags.DEFINE_integer("top_k", 0, "Top-k sampling; 0 = off.", lower_bound=0)
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1]; 1 = off.")
flags.DEFINE_integer("seed", 0, "Random seed for sampling.", lower_bound=0)
flags.DEFINE_multi_string("stop", [], "Plain decoding: a stop string (repeatable); a prompt's "
                          "text ends before the first one it writes.")
flags.DEFINE_boolean("json", False, "Print one JSON object (text, token_ids, stats) and nothing else.")
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"], "Parameter and KV dtype; "
                  "auto: bfloat16 on GPU/TPU, float32 on CPU.")
flags.DEFINE_string("mesh", "1x1", "Device mesh DATAxMODEL, e.g. 2x4.")
flags.DEFINE_integer("stream_every", 16, "Decode steps per streamed segment (text mode).",
                     lower_bound=1)
flags.DEFINE_enum("task", "none", ["none", "countdown"], "countdown: solve a Countdown problem "
                  "with a shipped model (prints the thread tree and the verifier's verdict).")
flags.DEFINE_string("problem", "", "countdown: 'N1,N2,N3:TARGET'; empty = a random held-out "
                    "problem (--seed).")
flags.DEFINE_enum("method", "parallel", ["parallel", "sequential"], "countdown: the shipped APR "
                  "fork/join model or the sequential Stream-of-Search model.")
flags.DEFINE_enum("protocol", "none", ["none", "threadweaver", "multiverse", "apr", "apr_tok"],
                  "Fork/join protocol; none = plain sequential decoding. threadweaver, "
                  "multiverse: the originals' formats, in the on-device engine. apr: APR as its "
                  "released checkpoints run (plain-text tags), in the on-device engine (spawn, "
                  "child prompts and results block as the original builds them); each prompt is "
                  "a root prompt (plain text). apr_tok: APR with single-token tags.")
flags.DEFINE_boolean("apr_host", False, "--protocol apr: orchestrate the calls on the host as "
                     "the original evaluation does (one batch of calls per round), instead of "
                     "the on-device engine.")
flags.DEFINE_string("assistant_prefix", "", "Text placed after the prompt (after the chat "
                    "template's assistant header): e.g. a block ending in the fork trigger "
                    "forces a fork.")
flags.DEFINE_integer("rows", 8, "Fork/join: thread rows, one pool shared by the requests (more "
                     "threads wait for a row).", lower_bound=1)
flags.DEFINE_integer("max_threads", 16, "Fork/join: threads per request, the root included.",
                     lower_bound=1)
flags.DEFINE_integer("max_depth", None, "Fork/join: nesting depth (default: the protocol's).",
                     lower_bound=0)
flags.DEFINE_integer("max_total_tokens", 0, "Fork/join: sampled tokens over all threads "
                     "(0 = max_threads x max_new_tokens).", lower_bound=0)
flags.DEFINE_integer("max_critical_path", 0, "Fork/join: critical-path tokens (0 = off).",
                     lower_bound=0)
flags.DEFINE_integer("n", 1, "Fork/join: samples per prompt (sample i uses seed derive(seed, i); "
                     "the prompt is stored once for the samples that share a lane).", lower_bound=1)
flags.DEFINE_integer("prefill", 0, "Fork/join: tokens per call of the prefill program, which writes "
                     "long prompts and re-prefills apart from the decode loop (0 = the loop "
                     "writes them, chunk by chunk).", lower_bound=0)
flags.DEFINE_float("deadline_s", 0.0, "Fork/join: wall-clock deadline per request (0 = off).",
                   lower_bound=0.0)
config_files.DEFINE_config_file("config", "run", "Optional config file (e.g. configs/smollm2_chat.py) "
                                "whose values fill the flags not given explicitly.")
flags.register_validator("top_p", lambda v: 0 < v <= 1, "--top_p must be in (0, 1]")


def _stats(gen, results, wall_s) -> dict:
  s = gen.stats
  n = sum(len(r.token_ids) for r in results)
  steps = max(s.get("decode_steps", 0), 1)
  return {
      "prompt_tokens": [r.prompt_tokens for r in results],
      "generated_tokens": n,
      "compile_s": round(s.get("compile_s", 0.0), 3),
      "prefill_s": round(s["prefill_s"], 4),
      "decode_s": round(s["decode_s"], 4),
      "decode_tokens_per_s": round(len(results) * steps / s["decode_s"], 2) if s["decode_s"] else None,
      "tokens_per_s": round(n / (s["prefill_s"] + s["decode_s"]), 2),
      "wall_s": round(wall_s, 3),
  }


@cli_main
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])} (quote the prompt: --prompt \"...\")")
  from apr_jax import utils
  utils.quiet_logs()
  utils.apply_config_file(flags, FLAGS.config)
  utils.setup_jax()
  from apr_jax.model.config import resolve_dtype
  from apr_jax import checkpoint
  from apr_jax.default_model import smollm2_path
  from apr_jax.engine.generate import Generator
  from apr_jax.engine.sampling import SamplingConfig
  from apr_jax.model.sharding import make_mesh, parse_mesh

  t0 = time.perf_counter()
  if FLAGS.task == "countdown":
    return _run_countdown(t0)
  prompts = list(FLAGS.prompt)
  if not prompts or any(not p for p in prompts):
    raise UserError("--prompt must not be empty")
  if FLAGS.apr_host and FLAGS.protocol != "apr":
    raise UserError("--apr_host applies to --protocol apr")
  if FLAGS.n > 1 and (FLAGS.protocol == "none" or FLAGS.apr_host):
    raise UserError("--n samples each prompt in the fork/join engine: pass --protocol "
                    "threadweaver, multiverse, apr or apr_tok, without --apr_host (or repeat "
                    "--prompt with --temperature)")
  if FLAGS.protocol == "apr" and (FLAGS.assistant_prefix or FLAGS.chat == "on"):
    raise UserError("--protocol apr sends each prompt as plain text: drop "
                    "--assistant_prefix and --chat=on (put the text in --prompt)")
  sampling = SamplingConfig(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
  mesh = make_mesh(*parse_mesh(FLAGS.mesh))
  path = FLAGS.model or smollm2_path()
  log = (lambda *a: None) if FLAGS.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
  log(f"loading {path} ({resolve_dtype(FLAGS.dtype)})")
  model, tok = checkpoint.load(path, dtype=FLAGS.dtype, mesh=mesh,
                               tokenizer=FLAGS.tokenizer or None)
  if tok is None:
    raise UserError(f"{path} has no tokenizer; pass --tokenizer")
  if FLAGS.chat == "auto" and not tok.chat_template:
    log("note: the checkpoint has no chat template; prompts are sent as plain text")
  gen = Generator(model, tok, mesh=mesh)
  if mesh.shape["data"] > 1 and len(prompts) % mesh.shape["data"]:
    raise UserError(f"{len(prompts)} prompts do not split over a data axis of {mesh.shape['data']}")

  if FLAGS.stop and FLAGS.protocol != "none":
    raise UserError("--stop applies to plain decoding; a fork/join protocol ends its threads "
                    "with its own tags")
  if FLAGS.protocol == "apr":
    _refuse_single_token_apr(tok, path)
    if FLAGS.apr_host:
      return _run_apr_original(model, tok, mesh, prompts, sampling, path, log, t0)
  if FLAGS.protocol != "none":
    return _run_tree(model, tok, mesh, prompts, sampling, path, log, t0)
  if FLAGS.assistant_prefix:
    raise UserError("--assistant_prefix needs --protocol (or put the text in --prompt with --chat=off)")
  stops = list(FLAGS.stop)
  if any(not t for t in stops):
    raise UserError("--stop must not be empty")

  # a streamed segment could print text that a stop string completed later would cut
  stream = not FLAGS.json and len(prompts) == 1 and not stops
  printed = [""]
  gen_stop = set(tok.stop_ids())

  def on_segment(state):
    import numpy as np
    ids = np.asarray(state.tokens[0, :int(state.n_gen[0])])
    ids = [int(i) for i in ids if int(i) not in gen_stop]
    text = tok.decode(ids)
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
      return
    sys.stdout.write(text[len(printed[0]):])
    sys.stdout.flush()
    printed[0] = text

  log("compiling (cached for later runs)...")
  results = gen.generate(prompts, chat=FLAGS.chat, max_new_tokens=FLAGS.max_new_tokens,
                         sampling=sampling, seed=FLAGS.seed,
                         on_segment=on_segment if stream else None,
                         segment=FLAGS.stream_every if stream else 0, stop_strings=stops)
  stats = _stats(gen, results, time.perf_counter() - t0)
  if FLAGS.json:
    rows = [{"text": r.text, "token_ids": r.token_ids, "stop_reason": r.stop_reason,
             "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens} for r in results]
    out = dict(rows[0]) if len(rows) == 1 else {"results": rows}
    out["stats"] = stats
    out["model"] = path
    out["dtype"] = _dtype_name(model)
    print(json.dumps(out))
    return 0
  if stream:
    rest = results[0].text[len(printed[0]):]
    print(rest)
  elif len(results) == 1:  # one prompt, not streamed (stop strings): the text as streaming prints it
    print(results[0].text)
  else:
    for i, r in enumerate(results):
      print(f"--- [{i}] {prompts[i]!r}\n{r.text}")
  log(f"[{stats['generated_tokens']} tokens | decode {stats['decode_tokens_per_s']} tok/s | "
      f"prefill {stats['prefill_s']:.3f} s | compile {stats['compile_s']:.1f} s | "
      f"stop: {results[0].stop_reason}]")
  return 0


def _dtype_name(model) -> str:
  import jax
  leaves = jax.tree.leaves(model)
  return str(leaves[0].dtype) if leaves else "float32"


def _parse_problem(text):
  from apr_jax.tasks import countdown as cd
  try:
    nums, target = text.split(":")
    nums = tuple(int(x) for x in nums.split(","))
    target = int(target)
  except ValueError:
    raise UserError(f"--problem must look like '3,12,27:31', got {text!r}") from None
  if not 2 <= len(nums) <= 6 or min(nums) < 1 or target < 1:
    raise UserError(f"--problem needs 2-6 positive numbers and a positive target, got {text!r}")
  return cd.Problem(nums, target)


def _run_countdown(t0):
  import numpy as np
  from apr_jax import checkpoint
  from apr_jax.evaluation import countdown as ev
  from apr_jax.engine.runner import Request
  from apr_jax.shipped import resolve
  from apr_jax.tasks import countdown as cd
  from apr_jax.tasks.countdown import data
  name = {"parallel": "countdown_small_apr", "sequential": "countdown_small_sos"}[FLAGS.method]
  path = resolve(FLAGS.model or name)
  extra = data.read_checkpoint(path)
  fmt = extra["format"]
  if fmt == "apr_original":
    raise UserError(f"{path} is trained on the original APR calls: run it with --protocol "
                    "apr and its prompt, or evaluate it with `python -m apr_jax.eval "
                    "--config configs/eval_apr_original.py`")
  if FLAGS.problem:
    p = _parse_problem(FLAGS.problem)
  else:
    test = cd.test_split(cd.SETTINGS[extra.get("setting", "small")], 1000, seed=0)
    p = test[int(np.random.default_rng(FLAGS.seed).integers(len(test)))]
  model, tok = checkpoint.load(path, dtype=FLAGS.dtype)
  eng = ev.make_engine(model, tok, fmt, lanes=1, rows=FLAGS.rows, slots=4096 if len(p.nums) > 3 else 2048,
                       max_total_tokens=6000)
  live = sys.stderr.isatty() and not FLAGS.json
  shown = [0]

  def progress(views):
    lines = [l for k, v in sorted(views.items(), key=lambda kv: str(kv[0])) for l in _tree_lines(v, k)]
    if shown[0]:
      sys.stderr.write(f"\x1b[{shown[0]}F\x1b[J")
    sys.stderr.write("\n".join(lines) + "\n")
    shown[0] = len(lines)

  prompt = data.prompt_text(fmt, p)
  req = Request([tok.bos_id] + tok.encode(prompt), max_thread_tokens=1536, max_total_tokens=6000,
                seed=FLAGS.seed)
  r = eng.run([req], on_progress=progress if live else None)[0]
  ok, valid, why = ev.verdict(p, ev.thread_texts(r, tok, fmt, prompt))
  if ok:
    why = "every line checks" if valid else f"right answer, but a search line is wrong: {why}"
  if FLAGS.json:
    out = dict(r.summary(), problem={"nums": list(p.nums), "target": p.target}, correct=ok, why=why,
               method=FLAGS.method, model=path, dtype=_dtype_name(model))
    print(json.dumps(out))
    return 0
  print(f"problem: reach {p.target} from {list(p.nums)}  ({FLAGS.method} model, {fmt} format)\n")
  print(prompt + tok.decode(r.threads[0]["token_ids"]))
  for t in r.threads[1:]:
    print(f"--- thread {t['id']} (child {t['path'][-1] + 1} of T{t['parent']}) ---")
    print(tok.decode(t["token_ids"]))
  print(f"verdict: {'CORRECT' if ok else 'wrong'} ({why})")
  eta = 1 - r.critical_path / r.total_tokens if r.total_tokens else 0.0
  print(f"[{r.total_tokens} tokens | critical path {r.critical_path} (eta {eta:.2f}) | {r.forks} forks "
        f"| {len(r.threads)} threads | {r.wall_s:.2f} s | stop: {r.stop_reason}]", file=sys.stderr)
  return 0


_MARK = {"free": " ", "ready": "·", "running": "▸", "waiting": "⋯", "done": "✓"}


def _tree_lines(threads: list, prompt_no: int) -> list[str]:
  """A compact per-thread view of one request: id, state, sampled tokens."""
  cells = []
  for t in threads:
    par = t["parent"]
    cells.append(f"T{t['id']}{'<' + str(par) if par >= 0 else ''} {_MARK[t['state']]}{t['tokens']}")
  lines = [f"[{prompt_no}] " + "  ".join(cells[:8])]
  for i in range(8, len(cells), 8):
    lines.append("    " + "  ".join(cells[i:i + 8]))
  return lines


def _run_tree(model, tok, mesh, prompts, sampling, path, log, t0):
  from apr_jax.engine.generate import bucket
  from apr_jax.engine.runner import Request, TreeEngine
  from apr_jax.engine import tree
  from apr_jax.engine.tree import TreeSpec
  from apr_jax.model.vocab import add_tokens
  from apr_jax.protocols import TAGS, build
  from apr_jax.tokenizer.chat import use_chat

  name = FLAGS.protocol
  chat = use_chat(FLAGS.chat, tok.chat_template) and name != "apr"
  missing = [t for t in TAGS.get(name, ()) if tok.token_id(t) is None]
  if missing:
    log(f"note: the model has no {name} tags; adding {len(missing)} (rows = mean of the tag "
        f"word's pieces). It was not trained to fork, so forks come from --assistant_prefix.")
    model, _ = add_tokens(model, tok, TAGS[name])
  if name == "apr":
    log("reading the tokenizer's spellings of the APR splices...")
  pr = build(name, tok)
  ids = []
  for p in prompts:
    text = tok.apply_chat([{"role": "user", "content": p}]) if chat else p
    bos = [tok.bos_id] if name == "apr" and tok.bos_id is not None else []  # the original's <s>
    ids.append(bos + tok.encode(text + FLAGS.assistant_prefix))
  n_new = FLAGS.max_new_tokens
  if name == "apr" and not FLAGS["max_new_tokens"].present:  # per call: the original's 4096,
    n_new = min(4096, model.cfg.max_seq_len - max(len(i) for i in ids))  # as the context allows
  total = FLAGS.max_total_tokens or FLAGS.max_threads * n_new
  longest = max(len(i) for i in ids)
  if longest + n_new > model.cfg.max_seq_len:
    raise UserError(f"prompt ({longest} tokens) + max_new_tokens ({n_new}) exceeds the model's "
                    f"context of {model.cfg.max_seq_len} tokens")
  # every sampled token, plus forced tokens (prefixes, joins) of up to max_threads threads
  slots = bucket(longest + total + FLAGS.max_threads * 16)
  # one lane per device of the data axis; its requests share its rows, thread table and KV
  lanes = mesh.shape["data"]
  per_lane = -(-min(len(ids) * FLAGS.n, 8) // lanes)
  depth = pr.max_depth if FLAGS.max_depth is None else min(FLAGS.max_depth, pr.max_depth)
  log_entries = tree.log_bound(pr, longest, FLAGS.max_threads, depth, total)
  spec = TreeSpec(protocol=pr, sampling=sampling, root_stop=tuple(tok.stop_ids()), lanes=lanes,
                  requests=per_lane, rows=FLAGS.rows, threads=FLAGS.max_threads * per_lane,
                  slots=slots * per_lane, chunk=max(32, FLAGS.rows),
                  log=log_entries * per_lane, prefill=FLAGS.prefill)
  log(f"compiling the fork/join loop ({name}, {lanes} lane(s) x {per_lane} request(s) sharing "
      f"{FLAGS.rows} rows and {slots * per_lane} KV slots)...")
  eng = TreeEngine(model, tok, spec, mesh=mesh, segment_steps=FLAGS.stream_every)
  reqs = [Request(i, seed=FLAGS.seed + k, max_threads=FLAGS.max_threads, max_depth=FLAGS.max_depth,
                  max_total_tokens=total, max_critical_path=FLAGS.max_critical_path or None,
                  max_thread_tokens=n_new, deadline_s=FLAGS.deadline_s or None, n=FLAGS.n)
          for k, i in enumerate(ids)]
  live = sys.stderr.isatty() and not FLAGS.json
  shown = [0]

  def progress(views):
    lines = []
    for k, v in sorted(views.items(), key=lambda kv: str(kv[0])):
      lines += _tree_lines(v, k)
    if shown[0]:
      sys.stderr.write(f"\x1b[{shown[0]}F\x1b[J")
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()
    shown[0] = len(lines)

  results = eng.run(reqs, on_progress=progress if live else None)
  wall = time.perf_counter() - t0
  rows = [r.summary() for r in results]
  finals = {}
  if name == "apr":  # the last call's text, the answer as the original reads it, a malformed end
    from apr_jax.protocols.apr_text import search_texts
    from apr_jax.protocols.reference import apr_search_result
    for k, (i, r, d) in enumerate(zip(ids, results, rows)):
      calls, _ = search_texts(r, tok, i)
      finals[k] = calls[-1]
      d.update(calls=calls, result=apr_search_result(calls[-1]),
               error="malformed spawn" if d["stop_reason"] == "malformed" else "")
  if FLAGS.json:
    out = {"protocol": name, "model": path, "dtype": _dtype_name(model),
           "results": rows,
           "stats": {"compile_s": round(eng.stats["compile_s"], 3), "wall_s": round(wall, 3)}}
    if len(results) == 1:
      out.update(out.pop("results")[0])
    print(json.dumps(out))
    return 0
  outs = [(k, j, s) for k, r in enumerate(results) for j, s in enumerate(r.samples or [r])]
  for k, j, r in outs:
    if len(outs) > 1:
      print(f"--- [{k}] {prompts[k]!r}" + (f" sample {j}" if FLAGS.n > 1 else ""))
    print(finals[k] if name == "apr" and FLAGS.n == 1 else r.text)  # apr: the last call
    log(f"thread tree [{k}]:")
    for t in r.threads:
      label = "root" if not t["path"] else ".".join(str(x + 1) for x in t["path"])
      snippet = " ".join(t["text"].split())[:60]
      log(f"  T{t['id']:<2d} {label:8s} parent {t['parent']:>2d}  steps {t['start_step']:>4d}-"
          f"{t['end_step']:<4d} {t['tokens']:>4d} tok  {t['stop_reason']:12s} {snippet!r}")
    eta = 1 - r.critical_path / r.total_tokens if r.total_tokens else 0.0
    log(f"[{r.total_tokens} tokens | critical path {r.critical_path} (eta {eta:.2f}) | "
        f"{r.forks} forks | {len(r.threads)} threads | {r.wall_s:.2f} s | "
        f"{r.total_tokens / max(r.wall_s, 1e-9):.1f} tok/s | stop: {r.stop_reason} | "
        f"KV {r.kv_stored_bytes / 2**20:.1f}/{r.kv_bytes / 2**20:.1f} MiB]")
  return 0


def _refuse_single_token_apr(tok, path):
  from apr_jax.protocols import APR_TAGS
  held = [t for t in APR_TAGS if tok.token_id(t) is not None]
  if held:
    raise UserError(f"{path} holds APR's tags as single tokens ({', '.join(held[:2])}, ...): it "
                    "speaks the single-token variant, run it with --protocol apr_tok "
                    "(--protocol apr is the original format, tags written as plain text)")


def _run_apr_original(model, tok, mesh, prompts, sampling, path, log, t0):
  """APR's original protocol orchestrated on the host (`--apr_host`, `engine.host_original`):
  one search per prompt. Each call may write up to --max_new_tokens tokens (default here: the
  original's --max_tokens, 4096); the root prompt goes in as written (no chat template, no
  assistant prefix), as the original sends it."""
  from apr_jax.engine.host_original import AprOriginalHost
  from apr_jax.protocols.reference import apr_search_result
  budget = FLAGS.max_new_tokens if FLAGS["max_new_tokens"].present else 4096  # the original's
  host = AprOriginalHost(model, tok, max_tokens=budget, sampling=sampling, seed=FLAGS.seed,
                         mesh=mesh, log=log)
  searches = host.solve(prompts)
  wall = time.perf_counter() - t0
  rows = [{"calls": s.calls, "sub_calls": s.sub_calls, "child_prompts": s.child_prompts,
           "result": s.result, "error": s.error,
           "children": sum(len(c) for c in s.sub_calls)} for s in searches]
  if FLAGS.json:
    out = {"protocol": "apr", "model": path, "dtype": _dtype_name(model),
           "results": rows, "stats": {"calls": host.calls, "context_cut_calls": host.cut,
                                      "wall_s": round(wall, 3)}}
    if len(rows) == 1:
      out.update(out.pop("results")[0])
    print(json.dumps(out))
    return 0
  for k, (s, r) in enumerate(zip(searches, rows)):
    if len(rows) > 1:
      print(f"--- [{k}] {prompts[k]!r}")
    print(s.calls[-1])
    for j, (cps, kids) in enumerate(zip(s.child_prompts, s.sub_calls)):
      log(f"spawn {j + 1}: {len(kids)} sub search(es)")
      for cp, kid in zip(cps, kids):
        log(f"  {cp.splitlines()[0]}: {len(kid) - len(cp)} chars, "
            f"{'goal' if apr_search_result(kid) else 'no solution'}")
    log(f"[{len(s.calls)} call(s) of the root | {r['children']} sub search(es) | result: "
        f"{'found' if s.result else 'none'}{' | malformed: ' + s.error if s.error else ''}]")
  log(f"[{host.calls} model calls | {wall:.2f} s]")
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
