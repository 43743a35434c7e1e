"""Shared pieces of the fork/join engine tests: a tiny random model, toy-vocab protocols,
random well-formed trajectories, and the exactness check against the plain reference."""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from apr_jax.engine.generate import bucket
from apr_jax.model.config import ModelConfig
from apr_jax.model.transformer import Transformer
from apr_jax.protocols import Protocol, outlines
from apr_jax.protocols import reference

BOS, EOS = 1, 2
PLAIN = (3, 40)  # ordinary tokens: ids 3..39
OPEN, COUNT, FORK, NL, TAG_A, STOP, TAG_B, CLOSE_B, GOAL, NOGOAL = 40, 41, 42, 43, 44, 45, 46, 47, 48, 49
DIGITS = tuple(range(50, 60))
SEP, COLON = 60, 61

PROTOCOLS = {
    # Multiverse-like: shared context, stitch join, nesting
    "multiverse": Protocol(name="multiverse", fork=FORK, open=OPEN, count=COUNT,
                           child_pre=(NL, TAG_A, NL), child_post=(COLON,), digits=DIGITS,
                           label_sep=(SEP,), child_stop=(STOP,), child_close=(NL, STOP),
                           join="stitch", after_join=(NL, TAG_B, NL), max_depth=3),
    # ThreadWeaver-like: shared context, flat re-prefill join (later threads without their
    # leading NL; a thread ended by EOS or a budget closes the block and ends the request), one level
    "threadweaver": Protocol(name="threadweaver", fork=FORK, open=OPEN, count=COUNT,
                             child_pre=(NL, TAG_A, NL), child_post=(COLON,), digits=DIGITS,
                             child_stop=(STOP,), child_close=(NL, STOP), join="flat",
                             after_join=(NL,), join_skip_first=True, malformed_close=(NL, CLOSE_B),
                             max_depth=1),
    # APR-like (apr_tok): fresh contexts from spawn lines, results join, one level
    "apr_tok": Protocol(name="apr_tok", fork=FORK, open=OPEN, count=COUNT, child_pre=(BOS,), context="fresh",
                    child_stop=(EOS,), join="results", results_open=(TAG_B,),
                    results_close=(CLOSE_B, NL), result_tags=(GOAL, NOGOAL), no_result=(NOGOAL, NL),
                    goal=(GOAL,), max_depth=1),
}


# the toy vocabulary's text (what the originals' regexes read); 62 and 63 spell parts of
# outline headers in one token, as real tokenizers sometimes do
TEXT = {BOS: "<s>", EOS: "</s>", OPEN: "<Outlines>", COUNT: "<Outline>", FORK: "</Outlines>",
        NL: "\n", TAG_A: "<Thread>", STOP: "</Thread>", TAG_B: "<Conclusion>", CLOSE_B: "</Parallel>",
        GOAL: "<Goal>", NOGOAL: "<No>", SEP: ".", COLON: ":", 62: "1:", 63: " 2.", 0: "<pad>",
        3: " ", 4: "\t", **{d: str(i) for i, d in enumerate(DIGITS)},
        **{i: chr(ord("a") + i - 5) for i in range(5, 31)}, **{i: chr(ord("A") + i - 31) for i in range(31, 40)}}
TEXTS = [TEXT[i] for i in range(64)]


def decode(ids):
  return "".join(TEXT[int(i)] for i in ids)


def encode_label(label: str):
  return [SEP if c == "." else DIGITS[int(c)] for c in label]


TEXT_FNS = (decode, encode_label)
READER = outlines.reader(TEXTS, COUNT, DIGITS, (SEP,))
# the same protocols labelling their children by the model's outline numbers
OUTLINE_PROTOCOLS = {n: dataclasses.replace(PROTOCOLS[n], name=n + "_outlines", outline=READER)
                     for n in ("threadweaver", "multiverse")}


def outline_block(rng, k, taken):
  """Tokens of an outline block body with about k headers: mostly valid numbers (some
  nested, some written with merged or spaced tokens), some duplicates, unnumbered and
  malformed ones. `taken`: the numbers written so far."""
  out = []
  for j in range(k):
    kind = rng.random() if j else 0.0  # the first header is always a valid new number
    if kind < 0.6 or not taken:
      n = len(taken) + 1
      label = str(n) if rng.random() < 0.7 else f"{n}.{int(rng.integers(1, 4))}"
      taken.append(label)
      toks, r = encode_label(label), rng.random()
      if label.endswith("1") and r < 0.3:
        head = [COUNT] + toks[:-1] + [62]              # "1:" in one token
      elif label.startswith("2.") and r < 0.6:
        head = [COUNT, 63] + toks[2:] + [COLON]        # " 2." in one token
      else:                                            # spaces or a newline around the number
        lead = [[], [3], [NL, 3]][int(rng.integers(0, 3))]
        head = [COUNT] + lead + toks + ([4] if rng.random() < 0.3 else []) + [COLON]
    elif kind < 0.75:
      head = [COUNT] + encode_label(taken[int(rng.integers(0, len(taken)))]) + [COLON]  # duplicate
    elif kind < 0.9:
      head = [COUNT] + plain(rng, 1, 2) + [COLON]                                        # unnumbered
    else:
      head = [COUNT, DIGITS[7], SEP, COLON]                                              # "7.:" malformed
    out += head + plain(rng, 0, 3)
  return out


def random_outline_trajectory(name: str, rng, blocks=2, max_kids=3):
  """(prompt, scripts) of a random trajectory of OUTLINE_PROTOCOLS[name]: its children are
  the distinct valid numbers the regex reads (computed here from the text)."""
  pr = OUTLINE_PROTOCOLS[name]
  scripts = {}

  def thread(path, depth):
    out, kid = plain(rng, 1, 4), 0
    nb = blocks if depth == 0 else int(rng.integers(0, 2)) if depth < pr.max_depth and name == "multiverse" else 0
    for _ in range(nb):
      body = outline_block(rng, int(rng.integers(1, max_kids + 1)), [])
      out += [OPEN] + body + [FORK]
      for _ in outlines.numbers(decode([OPEN] + body)):
        scripts[path + (kid,)] = thread(path + (kid,), depth + 1) + [STOP]
        kid += 1
      out += plain(rng, 1, 3)
    return out

  scripts[()] = thread((), 0) + [EOS]
  return [BOS] + plain(rng, 2, 6), scripts


def tiny_model(seed=0, vocab=64):
  cfg = ModelConfig(arch="llama", vocab_size=vocab, dim=32, ffn_dim=64, n_layers=2, n_heads=4,
                    n_kv_heads=2, head_dim=8, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=1024,
                    bos_id=BOS, eos_ids=(EOS,))
  model = Transformer(cfg, rngs=nnx.Rngs(seed))
  # larger weights than the default init, so that wrong contexts change the logits visibly
  graphdef, state = nnx.split(model)
  state = jax_tree_scale(state, 3.0)
  return nnx.merge(graphdef, state)


def jax_tree_scale(state, f):
  import jax
  return jax.tree.map(lambda x: x * f if x.ndim == 2 else x, state)


def plain(rng, lo, hi):
  return [int(x) for x in rng.integers(*PLAIN, int(rng.integers(lo, hi + 1)))]


def random_trajectory(name: str, rng, max_kids=3, nest=True, blocks=None, max_threads=12):
  """(prompt, scripts) of a random well-formed trajectory of the toy protocol `name` with at
  most `max_threads` threads."""
  while True:
    prompt, scripts = _random_trajectory(name, rng, max_kids, nest, blocks)
    if len(scripts) <= max_threads:
      return prompt, scripts


def _random_trajectory(name, rng, max_kids, nest, blocks):
  pr = PROTOCOLS[name]
  scripts = {}
  prompt = [BOS] + plain(rng, 2, 6)

  def thread(path, depth):
    out = plain(rng, 1, 4)
    nblocks = (blocks if blocks is not None else int(rng.integers(0, 3))) if depth == 0 else (
        int(rng.integers(0, 2)) if nest and depth < pr.max_depth and name == "multiverse" else 0)
    kid = 0
    for _ in range(nblocks):
      k = int(rng.integers(1, max_kids + 1))
      out += [OPEN]
      for _ in range(k):
        out += [COUNT] + plain(rng, 0 if pr.context == "shared" else 1, 3)
      out += [FORK]
      for i in range(k):
        child = path + (kid,)
        kid += 1
        if pr.context == "fresh":
          body = plain(rng, 1, 4)
          if rng.random() < 0.6:
            body += [GOAL if rng.random() < 0.5 else NOGOAL] + plain(rng, 0, 3)
          scripts[child] = body + [EOS]
        else:
          scripts[child] = thread(child, depth + 1) + [STOP]
      out += plain(rng, 1, 3)
    return out

  scripts[()] = thread((), 0) + [EOS]
  return prompt, scripts


@functools.lru_cache(maxsize=None)
def _fwd():
  @nnx.jit
  def f(model, ids, pos, mask):
    return model(ids, pos, mask)
  return f


def reference_logits(model, trace: reference.Trace, ctx) -> np.ndarray:
  """Logits [V] of a plain full forward over `ctx` (padded to a bucket: few compiles)."""
  n = len(ctx)
  b = bucket(n)
  ids = np.zeros((1, b), np.int32)
  pos = np.zeros((1, b), np.int32)
  mask = np.zeros((1, b, b), bool)
  ids[0, :n] = [e[0] for e in ctx]
  pos[0, :n] = [e[1] for e in ctx]
  mask[0, :n, :n] = trace.mask(ctx)
  mask[0, np.arange(n, b), np.arange(n, b)] = True
  out = _fwd()(model, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
  return np.asarray(out[0, n - 1])


def check_exact(model, result, trace: reference.Trace, prompt_len: int, rel_tol=1e-4):
  """Engine result (teacher-forced, record_logits) vs the reference: same trajectory, same
  metrics, and every sample's logits equal a full forward over the thread's context."""
  ref_traj = [e[0] for e in trace.final_context][prompt_len:]
  assert result.token_ids == ref_traj
  assert result.total_tokens == trace.total_tokens
  assert result.critical_path == trace.critical_path
  assert set(result.logits) == set(trace.threads)
  worst, span, worst_lp = 0.0, 0.0, 0.0
  info = {tuple(t["path"]): t for t in result.threads}
  for path, th in trace.threads.items():
    got = result.logits[path]
    assert len(got) == len(th.samples), (path, len(got), len(th.samples))
    # each sampled token's log-prob, as the engine returns it with the thread
    # (a thread cancelled at a sample never writes that sample)
    lps = [lp for lp in info[path]["logprobs"] if lp is not None]
    cut = th.stop_reason in ("cancelled", "pruned")
    assert len(lps) == len(th.samples) or (cut and len(lps) == len(th.samples) - 1), (
        path, len(lps), len(th.samples))
    for j, ctx in enumerate(th.contexts):
      ref = reference_logits(model, trace, ctx)
      worst = max(worst, float(np.abs(ref - got[j]).max()))
      span = max(span, float(ref.max() - ref.min()))
      ref_lp = ref[th.samples[j]] - (ref.max() + np.log(np.exp(ref - ref.max()).sum()))
      if j < len(lps):
        worst_lp = max(worst_lp, abs(float(ref_lp) - lps[j]))
  assert worst_lp <= 2 * rel_tol * max(span, 1.0), worst_lp
  assert span > 1.0, "model too weak to detect wrong contexts"
  assert worst <= rel_tol * span, (worst, span)
  return worst, span
