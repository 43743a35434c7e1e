"""Countdown evaluation through the fork/join engine: accuracy, tokens, critical path,
wall clock, forks, and APR's three curves (accuracy vs context window, vs total-token budget,
vs latency).

Curves are computed from one greedy run per problem with generous budgets: with greedy
decoding, a run under a limit is identical to the unlimited run until the limit is hit, and
hitting it ends that thread without its answer. So a problem counts as solved under a
context window C iff it was solved and no thread's context exceeded C (conservative for the
parallel model: a parent might still succeed from its other children), under a token budget
B iff solved with total tokens <= B, and under a latency L iff solved within L seconds.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from typing import Sequence

import numpy as np

from apr_jax.errors import UserError
from apr_jax.evaluation import accounting
from apr_jax.protocols import reference
from apr_jax.tasks import countdown as cd
from apr_jax.tasks.countdown import data


@dataclasses.dataclass
class ProblemResult:
  problem: tuple
  correct: bool            # the claimed solution replays to [target]
  trace_valid: bool        # and every line of every thread is right
  why: str
  total_tokens: int
  critical_path: int
  max_context: int
  forks: int
  threads: int
  wall_s: float
  stop_reason: str
  apr_tokens: int = -1          # APR's accounting: every call's sequence (`accounting.py`)
  apr_longest: int = -1         # ... and its longest sequence
  tw_critical_path: int = -1    # ThreadWeaver's critical path (wrapper tags counted)


def original_counts(tok, fmt: str, texts: Sequence[str], root_ids=()) -> dict:
  """The originals' accountings of one problem's threads (-1 where one does not apply):
  APR's for the sequential and APR formats, ThreadWeaver's critical path for its format."""
  out = {}
  if fmt in ("sos", "sos_original", "apr_tok"):
    n = lambda s: len(tok.encode(s))
    c = accounting.apr_token_counts(accounting.apr_root_calls(texts[0]), list(texts[1:]), n)
    out.update(apr_tokens=c["token_count"], apr_longest=c["longest_seq_token_count"])
  if fmt == "threadweaver":
    tags = [tok.token_id(t) for t in ("<Parallel>", "</Parallel>", "<Thread>", "</Thread>")]
    out["tw_critical_path"] = accounting.threadweaver_stats(root_ids, *tags)["critical_path"]
  return out


def thread_texts(res, tok, fmt: str, prompt_text: str) -> list[str]:
  """The verifier's view of an engine result: the root's text (prompt included) first, then
  each child's text (APR children after their spawn line, which is their prompt)."""
  root = prompt_text + tok.decode(res.threads[0]["token_ids"])
  out = [root]
  for t in res.threads[1:]:
    out.append(tok.decode(t["token_ids"]))
  return out


def verdict(p: cd.Problem, texts) -> tuple[bool, bool, str]:
  """(correct: the claimed solution replays to the target, trace_valid: every line of every
  thread is right too, why)."""
  ok, why = cd.verify(p, texts, check_lines=False)
  valid, why_lines = cd.verify(p, texts)
  return ok, valid, why_lines if ok else why


PROMPT_TOKENS = 128  # more than any Countdown prompt of the shipped settings


def _positive_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def make_engine(model, tok, fmt: str, lanes: int = 8, rows: int = 8, slots: int | str = 2048,
                max_threads: int = 16, step_cost=None, max_total_tokens: int = 6000,
                attention: str = "tree", requests_per_lane: int = 1):
  """An engine for the format's protocol whose token log holds any request with these
  budgets (`tree.log_bound`), so a request ends at its budget, never because of the log.
  `requests_per_lane` share a lane's rows, KV pool and log (its thread table and log grow
  with them: `max_threads` and a log bound per request).
  `slots="auto"`: the most KV slots per lane that fit in device memory (`cache.memory`), at
  most what a request with these budgets can write."""
  import jax
  from flax import nnx

  from apr_jax.cache import memory
  from apr_jax.engine import tree
  from apr_jax.engine.runner import TreeEngine
  from apr_jax.engine.tree import TreeSpec
  if not _positive_int(requests_per_lane):
    raise UserError(f"requests_per_lane must be a positive number, got {requests_per_lane!r}")
  pr = data.protocol_for(fmt, tok)
  depth = pr.max_depth if pr.forks else 0
  log = tree.log_bound(pr, PROMPT_TOKENS, max_threads, depth, max_total_tokens)

  def spec_for(n: int) -> TreeSpec:
    spec = TreeSpec(protocol=pr, root_stop=(tok.eos_id,), lanes=lanes,
                    requests=requests_per_lane, rows=rows, threads=max_threads * requests_per_lane,
                    slots=n, chunk=32, attention=attention)
    return dataclasses.replace(spec, log=max(log * requests_per_lane, spec.n_log))

  if slots == "auto":
    leaves = jax.tree.leaves(nnx.state(model))
    dtype = leaves[0].dtype if leaves else "float32"
    slots = memory.auto_slots(spec_for, model.cfg, dtype, None, cap=log * requests_per_lane)
  elif not _positive_int(slots):
    raise UserError(f"slots must be a positive number of KV slots per lane or 'auto', got {slots!r}")
  return TreeEngine(model, tok, spec_for(slots), segment_steps=64, step_cost=step_cost)


def requests(tok, problems: Sequence[cd.Problem], max_thread_tokens: int = 1536,
             max_total_tokens: int = 6000, fmt: str = "sos") -> list:
  """One engine request per problem: BOS + the format's prompt, with the evaluation's budgets."""
  from apr_jax.engine.runner import Request
  return [Request([tok.bos_id] + tok.encode(data.prompt_text(fmt, p)), max_thread_tokens=max_thread_tokens,
                  max_total_tokens=max_total_tokens) for p in problems]


def evaluate(engine, tok, fmt: str, problems: Sequence[cd.Problem], max_thread_tokens: int = 1536,
             max_total_tokens: int = 6000, batch: int = 64, log=None) -> list[ProblemResult]:
  """Every problem through the engine in one run; progress every `batch` problems or 10 s."""
  log = log or (lambda s: print(s, file=sys.stderr, flush=True))
  reqs = requests(tok, problems, max_thread_tokens, max_total_tokens, fmt)
  out: list = [None] * len(problems)
  progress = _Progress(len(problems), batch, log)

  def on_done(i, r):
    p = problems[i]
    texts = thread_texts(r, tok, fmt, data.prompt_text(fmt, p))
    ok, valid, why = verdict(p, texts)
    ctx = max((max(t["positions"]) + 1 if t["positions"] else 0) for t in r.threads)
    out[i] = ProblemResult(problem=(p.nums, p.target), correct=ok, trace_valid=valid, why=why,
                           total_tokens=r.total_tokens, critical_path=r.critical_path,
                           max_context=ctx, forks=r.forks, threads=len(r.threads),
                           wall_s=r.wall_s, stop_reason=r.stop_reason,
                           **original_counts(tok, fmt, texts, r.token_ids))
    progress.add(ok)

  # one run: continuous batching keeps every lane busy until the last problem
  engine.run(reqs, on_done=on_done)
  return out


class _Progress:
  """The evaluation's progress line: every `batch` problems, every 10 s and at the end."""

  def __init__(self, total: int, batch: int, log):
    self.total, self.batch, self.log = total, max(batch, 1), log
    self.t0, self.shown, self.done, self.ok = time.perf_counter(), 0.0, 0, 0

  def add(self, ok: bool):
    self.done += 1
    self.ok += ok
    dt = time.perf_counter() - self.t0
    if self.done == self.total or dt - self.shown >= 10 or self.done % self.batch == 0:
      self.shown = dt
      self.log(_progress(self.done, self.total, self.ok / self.done, dt))


def _progress(done: int, total: int, acc: float, dt: float) -> str:
  bar = "#" * int(20 * done / total)
  return (f"[{bar:20s}] {done}/{total} problems | accuracy {acc:.3f} | {done / dt:.2f} problems/s | "
          f"ETA {(total - done) * dt / done / 60:.1f} min")


def summarize(rs: Sequence[ProblemResult], wall: float) -> dict:
  m = lambda f: float(statistics.mean(f(x) for x in rs)) if rs else 0.0
  return {"problems": len(rs), "accuracy": m(lambda x: x.correct),
          "trace_valid": m(lambda x: x.trace_valid), "total_tokens_mean": m(lambda x: x.total_tokens),
          "critical_path_mean": m(lambda x: x.critical_path), "max_context_mean": m(lambda x: x.max_context),
          "forks_mean": m(lambda x: x.forks), "threads_mean": m(lambda x: x.threads),
          "wall_s_mean": m(lambda x: x.wall_s), "problems_per_s": len(rs) / wall if wall else None,
          **{f"{k}_mean": _mean_known(rs, k) for k in ("apr_tokens", "apr_longest", "tw_critical_path")}}


def _mean_known(rs, key):
  """The mean of an accounting over the problems it applies to (None: none)."""
  vals = [getattr(x, key) for x in rs if getattr(x, key) >= 0]
  return float(statistics.mean(vals)) if vals else None


def curve(rs, key, limits):
  return [float(np.mean([x.correct and getattr(x, key) <= lim for x in rs])) for lim in limits]


def curves(results: dict) -> dict:
  """APR's three curves for every method: accuracy vs context window, token budget, latency."""
  allr = [x for rs in results.values() for x in rs]
  hi = lambda key: max(getattr(x, key) for x in allr) if allr else 1
  ctx = sorted({int(v) for v in np.linspace(64, hi("max_context"), 12)})
  tok = sorted({int(v) for v in np.linspace(64, hi("total_tokens"), 12)})
  lat = sorted({float(round(v, 3)) for v in np.linspace(0, hi("wall_s"), 12)[1:]})
  return {"context_window": {"limits": ctx, **{k: curve(v, "max_context", ctx) for k, v in results.items()}},
          "total_tokens": {"limits": tok, **{k: curve(v, "total_tokens", tok) for k, v in results.items()}},
          "latency_s": {"limits": lat, **{k: curve(v, "wall_s", lat) for k, v in results.items()}}}


def plot(cs: dict, out_dir: str) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  paths = []
  for name, c in cs.items():
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=110)
    for k, ys in c.items():
      if k != "limits":
        ax.plot(c["limits"], ys, marker="o", ms=3, label=k)
    ax.set_xlabel({"context_window": "context window (tokens)", "total_tokens": "total-token budget",
                   "latency_s": "latency (s)"}[name])
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    p = os.path.join(out_dir, f"accuracy_vs_{name}.png")
    fig.savefig(p)
    plt.close(fig)
    paths.append(p)
  return paths


def markdown(summary: dict) -> str:
  keys = ["accuracy", "trace_valid", "total_tokens_mean", "apr_tokens_mean", "critical_path_mean",
          "apr_longest_mean", "tw_critical_path_mean", "max_context_mean", "forks_mean", "wall_s_mean",
          "problems_per_s"]
  lines = ["| method | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
  for name, s in summary.items():
    lines.append(f"| {name} | " + " | ".join(
        f"{s.get(k):.3f}" if isinstance(s.get(k), float) else ("-" if s.get(k) is None else str(s[k]))
        for k in keys) + " |")
  return "\n".join(lines) + "\n"


def evaluate_host(host, tok, problems: Sequence[cd.Problem], max_thread_tokens: int = 1536,
                  batch: int = 64, log=None) -> list[ProblemResult]:
  """The APR model through the host-orchestrated baseline (`engine.host.HostAPR`); a
  problem's latency is its batch's wall time (the host waits for the whole batch)."""
  log = log or (lambda s: print(s, file=sys.stderr, flush=True))
  out = []
  t0 = time.perf_counter()
  for i in range(0, len(problems), batch):
    chunk = problems[i:i + batch]
    prompts = [[tok.bos_id] + tok.encode(cd.prompt_text(p)) for p in chunk]
    tb = time.perf_counter()
    rs = host.solve(prompts, max_thread_tokens=max_thread_tokens)
    wall = time.perf_counter() - tb
    for p, r in zip(chunk, rs):
      texts = [cd.prompt_text(p) + tok.decode(r["tokens"])] + [tok.decode(c) for c in r["children"]]
      ok, valid, why = verdict(p, texts)
      out.append(ProblemResult(problem=(p.nums, p.target), correct=ok, trace_valid=valid,
                               why=why, total_tokens=r["total_tokens"], critical_path=-1, max_context=-1,
                               forks=r["forks"], threads=1 + len(r["children"]), wall_s=wall,
                               stop_reason="", **original_counts(
                                   tok, "apr_tok", [cd.prompt_text(p) + tok.decode(r["rendered"])] + texts[1:])))
    done = len(out)
    dt = time.perf_counter() - t0
    log(f"[host] {done}/{len(problems)} problems | accuracy {sum(x.correct for x in out) / done:.3f} | "
        f"{done / dt:.2f} problems/s")
  return out


def apr_original_counts(n_tokens, s) -> dict:
  """Token counts of one original-protocol search (`reference.AprSearch`), from its texts:
  a call's sampled tokens are its text's tokens past the text it started from (the
  `<Calling Sub Searches>` that replaces a written `<Sub Searches>` is counted as written).
  roots / kids: per root call, per spawn and child; max context: the longest call; apr:
  APR's own accounting over all the calls."""
  sampled = lambda text, prefix: max(0, n_tokens(text) - n_tokens(prefix))
  subs = [c for spawn in s.sub_calls for c in spawn]
  return dict(roots=[sampled(c, p) for c, p in zip(s.calls, s.prefixes)],
              kids=[[sampled(c, p) for c, p in zip(spawn, prompts)]
                    for spawn, prompts in zip(s.sub_calls, s.child_prompts)],
              apr=accounting.apr_token_counts(s.calls, subs, n_tokens),
              max_context=max(n_tokens(c) for c in s.calls + subs))


def evaluate_apr_original(host, tok, problems: Sequence[cd.Problem], batch: int = 64,
                          log=None) -> list[ProblemResult]:
  """A checkpoint in the original APR format through the original's orchestration
  (`engine.host_original.AprOriginalHost`), prompted and scored as the original: the root
  prompt `Moving to Node #0\\nCurrent State: T:[...], Operations: []`, the answer read from
  the last call (its summary path) with the children's texts for the line checks. A
  malformed spawn block ends a search unsolved. A problem's latency is its batch's wall time."""
  from apr_jax.tasks.countdown import original as orig
  log = log or (lambda s: print(s, file=sys.stderr, flush=True))
  n = lambda s: len(tok.encode(s))
  out, t0 = [], time.perf_counter()
  for i in range(0, len(problems), batch):
    chunk = problems[i:i + batch]
    prompts = [orig.apr_prompt(p) for p in chunk]
    tb = time.perf_counter()
    searches = host.solve(prompts)
    wall = time.perf_counter() - tb
    for p, s in zip(chunk, searches):
      c = apr_original_counts(n, s)
      kids = [k for spawn in s.sub_calls for k in spawn]
      if s.error:
        ok, valid, why = False, False, f"malformed: {s.error}"
      else:
        ok, valid, why = verdict(p, [s.calls[-1]] + kids)
      total = sum(c["roots"]) + sum(sum(k) for k in c["kids"])
      critical = sum(c["roots"]) + sum(max(k, default=0) for k in c["kids"])
      out.append(ProblemResult(
          problem=(p.nums, p.target), correct=ok, trace_valid=valid, why=why, total_tokens=total,
          critical_path=critical, max_context=c["max_context"], forks=len(s.sub_calls),
          threads=1 + len(kids), wall_s=wall, stop_reason="error" if s.error else "",
          apr_tokens=c["apr"]["token_count"], apr_longest=c["apr"]["longest_seq_token_count"]))
    done = len(out)
    log(f"[apr_original] {done}/{len(problems)} problems | accuracy "
        f"{sum(x.correct for x in out) / done:.3f} | {done / (time.perf_counter() - t0):.2f} problems/s")
  return out


def make_apr_engine(model, tok, lanes: int = 8, rows: int = 8, slots: int = 8192,
                    max_threads: int = 32, max_total_tokens: int = 16384):
  """An engine for the original APR protocol on device (`protocols.apr_text`): a checkpoint
  in the original format (plain-text tags), its token log sized for these budgets."""
  from apr_jax.engine import tree
  from apr_jax.engine.runner import TreeEngine
  from apr_jax.engine.tree import TreeSpec
  from apr_jax.protocols import build
  if not all(_positive_int(v) for v in (slots, lanes, rows, max_threads)):
    raise UserError(f"lanes, rows, slots and max_threads must be positive numbers, got {lanes!r}, "
                    f"{rows!r}, {slots!r}, {max_threads!r}")
  pr = build("apr", tok)
  log = tree.log_bound(pr, PROMPT_TOKENS, max_threads, 1, max_total_tokens)
  spec = TreeSpec(protocol=pr, root_stop=tuple(tok.stop_ids()), lanes=lanes, rows=rows,
                  threads=max_threads, slots=slots, chunk=32, log=log)
  return TreeEngine(model, tok, spec, segment_steps=64)


def apr_device_texts(r, tok, prompt: str):
  """(the root's calls, the children's texts) of an on-device original-APR result
  (`protocols.apr_text.search_texts`)."""
  from apr_jax.protocols.apr_text import search_texts
  bos = [tok.bos_id] if tok.bos_id is not None else []
  return search_texts(r, tok, bos + tok.encode(prompt))


def evaluate_apr_device(engine, tok, problems: Sequence[cd.Problem], max_call_tokens: int = 4096,
                        max_total_tokens: int = 16384, batch: int = 64,
                        log=None) -> list[ProblemResult]:
  """A checkpoint in the original APR format through the original protocol on device
  (`make_apr_engine`), prompted and scored as `evaluate_apr_original` does: the answer read
  from the last call, the children's texts for the line checks; a malformed spawn ends a
  search unsolved. Token counts are the engine's (every sampled token, EOS included; the
  critical path: the root's samples plus its longest child per spawn); APR's own
  accounting is computed from the calls' texts."""
  from apr_jax.engine.runner import Request
  from apr_jax.tasks.countdown import original as orig
  log = log or (lambda s: print(s, file=sys.stderr, flush=True))
  n = lambda s: len(tok.encode(s))
  bos = [tok.bos_id] if tok.bos_id is not None else []
  prompts = [orig.apr_prompt(p) for p in problems]
  reqs = [Request(bos + tok.encode(t), max_thread_tokens=max_call_tokens,
                  max_total_tokens=max_total_tokens) for t in prompts]
  out: list = [None] * len(problems)
  progress, cut = _Progress(len(problems), batch, log), [0]

  def on_done(i, r):
    p = problems[i]
    calls, kids = apr_device_texts(r, tok, prompts[i])
    if r.stop_reason == "malformed":
      ok, valid, why = False, False, "malformed: the spawn block cannot be read"
    else:
      ok, valid, why = verdict(p, [calls[-1]] + kids)
    apr = accounting.apr_token_counts(calls, kids, n)
    ctx = max((max(t["positions"]) + 1 if t["positions"] else 0) for t in r.threads)
    named = 0  # children the spawn blocks named: more than ran means max_threads cut them
    for c in calls[:-1]:
      try:
        named += len(reference.apr_children(c)[0])
      except reference.AprMalformed:
        pass
    if named > len(kids):
      cut[0] += 1
    out[i] = ProblemResult(
        problem=(p.nums, p.target), correct=ok, trace_valid=valid, why=why,
        total_tokens=r.total_tokens, critical_path=r.critical_path,
        max_context=max(ctx, len(reqs[i].prompt)), forks=r.forks, threads=len(r.threads),
        wall_s=r.wall_s, stop_reason=r.stop_reason if named <= len(kids) else "max_threads",
        apr_tokens=apr["token_count"], apr_longest=apr["longest_seq_token_count"])
    progress.add(ok)

  engine.run(reqs, on_done=on_done)
  if cut[0]:
    log(f"note: {cut[0]} search(es) named more children than max_threads let run (their "
        "stop_reason reads max_threads); raise the config's max_threads")
  return out
