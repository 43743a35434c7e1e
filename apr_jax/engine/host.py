"""The host-orchestrated baseline, on our own model code: the ThreadWeaver way.

A host loop sends each thread as a separate request (the k threads of a fork run as one
batch, the way a serving engine batches concurrent requests), with prefix caching (the
prompt's KV is computed once and shared by the thread requests), and re-prefills the threads
into the parent at the join (threads 2..k; the parent's cached prefix covers the prompt and
thread 1), then decodes the continuation. Greedy. Every phase boundary is a host round trip.
"""
from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apr_jax.cache import kv as kvlib
from apr_jax.processes import fetch
from apr_jax.model.transformer import Transformer


def _extend(graphdef, params, cache, tokens, start):
  """Writes tokens [B, T] at slots/positions start.. (every row alike); greedy next token."""
  model: Transformer = nnx.merge(graphdef, params)
  b, t = tokens.shape
  s = cache[0].k.shape[2]
  pos = jnp.broadcast_to(start + jnp.arange(t), (b, t))
  mask = jnp.broadcast_to(jnp.arange(s)[None, :] <= pos[0][:, None], (b, t, s))
  h, cache = model.decode(tokens, pos, mask, cache, start)
  return jnp.argmax(model.logits(h[:, -1]), -1).astype(jnp.int32), cache


def _decode(graphdef, params, cache, last, start, n: int):
  """n greedy decode steps for every row from slot `start`: returns tokens [B, n], cache."""
  model: Transformer = nnx.merge(graphdef, params)
  b = last.shape[0]
  s = cache[0].k.shape[2]

  def body(i, carry):
    cache, last, out = carry
    p = start + i
    mask = jnp.broadcast_to(jnp.arange(s) <= p, (b, 1, s))
    h, cache = model.decode(last[:, None], jnp.full((b, 1), p), mask, cache, p)
    nxt = jnp.argmax(model.logits(h[:, 0]), -1).astype(jnp.int32)
    return cache, nxt, out.at[:, i].set(last)

  cache, last, out = jax.lax.fori_loop(0, n, body, (cache, last, jnp.zeros((b, n), jnp.int32)))
  return out, cache


class HostOrchestrator:

  def __init__(self, model: Transformer, slots: int, cache_dtype=jnp.float32):
    self.graphdef, self.params = nnx.split(model)
    self.cfg = model.cfg
    self.slots = slots
    self.cache_dtype = cache_dtype
    self._extend = jax.jit(_extend, static_argnums=(0,), donate_argnums=(2,))
    self._decode = jax.jit(_decode, static_argnums=(0, 5), donate_argnums=(2,))
    self.bytes_per_token = 2 * self.cfg.n_layers * self.cfg.n_kv_heads * self.cfg.head_dim * \
        jnp.dtype(cache_dtype).itemsize

  def fork_join(self, prompt: Sequence[int], prefixes: Sequence[Sequence[int]], n: int,
                after_join: Sequence[int], m: int) -> dict:
    """prompt -> k threads (forced prefix each, then n tokens) -> flat join -> m tokens."""
    g, p = self.graphdef, self.params
    k = len(prefixes)
    t0 = time.perf_counter()
    cache = kvlib.init_cache(self.cfg, 1, self.slots, self.cache_dtype)
    _, cache = self._extend(g, p, cache, jnp.asarray([prompt], jnp.int32), 0)
    # fork: k thread requests hit the prompt's prefix cache
    cache_k = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)
    pre = jnp.asarray(prefixes, jnp.int32)
    start = len(prompt)
    first, cache_k = self._extend(g, p, cache_k, pre, start)
    toks, cache_k = self._decode(g, p, cache_k, first, start + pre.shape[1], n)
    threads = np.asarray(fetch(toks))   # host round trip: the orchestrator joins
    t1 = time.perf_counter()
    # join: the parent's cached prefix is prompt + thread 1; re-prefill threads 2..k
    parent = jax.tree.map(lambda x: x[:1], cache_k)
    del cache_k
    rest = [t for i in range(1, k) for t in list(prefixes[i]) + threads[i].tolist()] + list(after_join)
    first, parent = self._extend(g, p, parent, jnp.asarray([rest], jnp.int32),
                                 start + pre.shape[1] + n)
    jax.block_until_ready(first)
    t2 = time.perf_counter()
    out, parent = self._decode(g, p, parent, first, start + pre.shape[1] + n + len(rest), m)
    jax.block_until_ready(out)
    t3 = time.perf_counter()
    return {"wall_s": t3 - t0, "join_s": t2 - t1, "threads_s": t1 - t0, "after_s": t3 - t2,
            "kv_bytes": k * self.slots * self.bytes_per_token, "threads": threads,
            "continuation": np.asarray(out)[0], "reprefill_tokens": len(rest)}


class HostAPR:
  """APR's reference orchestration on our model code: the host decodes the parents until
  they call sub searches, sends every child as a separate request (batched, fresh contexts),
  builds the results block on the host and re-prefills each parent's new context to go on.
  Greedy. Used as the baseline for the engine's evaluation throughput."""

  def __init__(self, model: Transformer, tokenizer, protocol):
    from apr_jax.engine.generate import Generator
    self.gen = Generator(model, tokenizer)
    self.pr = protocol
    self.eos = tokenizer.eos_id

  def _decode(self, prompts, max_new, stops):
    toks, n, done = self.gen.generate_ids(prompts, max_new_tokens=max_new, stop_ids=stops)
    return [toks[i, :n[i]].tolist() for i in range(len(prompts))]

  def solve(self, prompts: Sequence[Sequence[int]], max_thread_tokens: int = 1536,
            max_forks: int = 2) -> list[dict]:
    pr = self.pr
    ctx = [list(p) for p in prompts]              # each parent's current context
    # tokens: what the root sampled; rendered: the same with each results block after its
    # spawn block (as the engine renders a root), for the accountings
    out = [{"tokens": [], "rendered": [], "total_tokens": 0, "forks": 0, "children": []}
           for _ in prompts]
    active = list(range(len(prompts)))
    while active:
      gen = self._decode([ctx[i] for i in active], max_thread_tokens, [self.eos, pr.fork])
      spawn = []
      for i, g in zip(active, gen):
        out[i]["total_tokens"] += len(g)
        out[i]["tokens"] += g
        out[i]["rendered"] += g
        ctx[i] += g
        if g and g[-1] == pr.fork and out[i]["forks"] < max_forks and pr.open in ctx[i]:
          spawn.append(i)
      active = []
      if not spawn:
        break
      # children: one request per spawn line, fresh context = child_pre + the line's text
      kids, owner = [], []
      for i in spawn:
        c = ctx[i]
        start = len(c) - 1 - c[::-1].index(pr.open)
        line = None  # text before the first spawn tag is not a child
        for t in c[start + 1:-1] + [pr.count]:
          if t == pr.count:
            if line is not None:
              kids.append(list(pr.child_pre) + line)
              owner.append(i)
            line = []
          elif line is not None:
            line.append(t)
        out[i]["forks"] += 1
        ctx[i] = c[:start]                          # the spawn block is dropped
      res = self._decode(kids, max_thread_tokens, [self.eos]) if kids else []
      blocks = {i: list(pr.results_open) for i in spawn}
      for i, k, g in zip(owner, kids, res):
        out[i]["total_tokens"] += len(g)
        out[i]["children"].append(k[len(pr.child_pre):] + g)
        tags = [j for j, t in enumerate(g) if t in pr.result_tags]
        blocks[i] += [t for t in g[tags[-1]:] if t not in pr.child_stop] if tags else list(pr.no_result)
      for i in spawn:
        ctx[i] += blocks[i] + list(pr.results_close) + list(pr.after_join)  # re-prefilled next round
        out[i]["rendered"] += blocks[i] + list(pr.results_close) + list(pr.after_join)
        active.append(i)
    return out
