"""Sequential generation: prefill + decode over a static-shape KV cache.

The decode loop is one jitted `jax.lax.while_loop` over a single state pytree (`DecodeState`),
with the state donated so the cache is updated in place. The host may run it in segments
(`until_step`) to stream text; a segment is one device call with no host round trip inside.

Prompts of different lengths are left-padded to a bucketed length, so a new prompt of a
similar length reuses the compiled programs. Every row writes the same cache slot at each
step; each row has its own positions, and slots left of its padding are masked out.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax.sharding import Mesh, NamedSharding

from apr_jax.processes import fetch, put
from apr_jax.cache import kv as kvlib
from apr_jax.cache import memory as memlib
from apr_jax.engine.sampling import SamplingConfig, sample
from apr_jax.engine.stop_reasons import StopReason, finish_reason
from apr_jax.errors import UserError
from apr_jax.model.sharding import ShardingRules, single_device_mesh
from apr_jax.model.transformer import Transformer
from apr_jax.tokenizer.chat import use_chat


class DecodeState(NamedTuple):
  cache: tuple        # per layer LayerKV, [B, K, S, D]
  tokens: jax.Array   # [B, N] generated ids (N = max new tokens), pad_id after a row stops
  last: jax.Array     # [B] the token to feed next
  pos: jax.Array      # [B] its position
  pad: jax.Array      # [B] left padding of each row (slots < pad are not attended)
  slot: jax.Array     # () next cache slot to write
  step: jax.Array     # () tokens generated so far (the same for every row)
  done: jax.Array     # [B] bool
  n_gen: jax.Array    # [B] tokens generated per row, stop token included
  keys: jax.Array     # [B] per-row PRNG keys
  match: jax.Array    # [B, n_stop_strings] text-matcher state per stop string ([B, 0]: none)


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything static about one compiled generation program."""
  batch: int
  prompt_len: int     # bucketed prompt length P
  max_new: int        # bucketed N (cache slots S = P + N)
  sampling: SamplingConfig
  stop_ids: tuple[int, ...]
  pad_id: int
  stop_text: tuple[str, ...] = ()  # stop strings: a row ends in the token that completes one

  @property
  def slots(self) -> int:
    return self.prompt_len + self.max_new


def bucket(n: int, minimum: int = 16) -> int:
  """Next power of two >= n (at least `minimum`), then multiples of 1024."""
  if n <= 1024:
    b = minimum
    while b < n:
      b *= 2
    return b
  return -(-n // 1024) * 1024


@dataclasses.dataclass
class Result:
  token_ids: list[int]       # generated ids, the stop token included if one was produced
  text: str                  # decoded text without the stop token
  stop_reason: str           # "stop" (a stop token) | "length" (max_new_tokens): StopReason labels
  prompt_tokens: int

  @property
  def finish_reason(self) -> str:
    """OpenAI's finish_reason."""
    return finish_reason(self.stop_reason)


def prefill_mask(pad, prompt_len: int, slots: int):
  """[B, P, S]: prompt token i (left-padded row) sees slots pad..i."""
  i = jnp.arange(prompt_len)[None, :, None]
  s = jnp.arange(slots)[None, None, :]
  return (s <= i) & (s >= pad[:, None, None])


def decode_mask(pad, slot, slots: int):
  """[B, 1, S]: the token written at `slot` sees slots pad..slot."""
  s = jnp.arange(slots)[None, :]
  return ((s <= slot) & (s >= pad[:, None]))[:, None, :]


def _stop_step(matcher, match, token, valid):
  """The stop strings' matcher states after `token` [B] and whether one of them ended in it."""
  if matcher is None:
    return match, jnp.zeros(token.shape, bool)
  match, hit = matcher.advance(match, token, valid)
  return match, jnp.any(hit, axis=-1)


def _prefill(graphdef, params, tokens, pad, keys, spec: Spec, cache_dtype, cache_sharding,
             matcher=None):
  """tokens [B, P] left-padded; keys [B, *]: each row's PRNG key data. Allocates the cache,
  runs the prompt, samples the first token; returns the DecodeState. Stop strings are matched
  over the generated text only (as a server's stop sequences are)."""
  model: Transformer = nnx.merge(graphdef, params)
  keys = jax.random.wrap_key_data(keys)
  b, p = tokens.shape
  cache = kvlib.init_cache(model.cfg, b, spec.slots, cache_dtype, cache_sharding)
  i = jnp.arange(p)
  positions = jnp.maximum(i[None, :] - pad[:, None], 0)                     # [B, P]
  mask = prefill_mask(pad, p, spec.slots)                                   # [B, P, S]
  h, cache = model.decode(tokens, positions, mask, cache, 0)
  logits = model.logits(h[:, -1])                                           # [B, V]
  first = sample(logits, jax.vmap(jax.random.fold_in)(keys, jnp.zeros_like(pad)), spec.sampling)
  stop = jnp.asarray(spec.stop_ids or (-1,), jnp.int32)
  match = jnp.zeros((b, len(spec.stop_text)), jnp.int32)
  match, text_stop = _stop_step(matcher, match, first, jnp.ones((b,), bool))
  done = jnp.isin(first, stop) | text_stop
  out = jnp.full((b, spec.max_new), spec.pad_id, jnp.int32).at[:, 0].set(first)
  return DecodeState(cache=cache, tokens=out, last=first, pos=positions[:, -1] + 1, pad=pad,
                     slot=jnp.asarray(p, jnp.int32), step=jnp.asarray(1, jnp.int32), done=done,
                     n_gen=jnp.ones((b,), jnp.int32), keys=keys, match=match)


def _decode(graphdef, params, state: DecodeState, until_step, spec: Spec,
            matcher=None) -> DecodeState:
  """Runs decode steps while step < until_step and some row is not done."""
  model: Transformer = nnx.merge(graphdef, params)
  stop = jnp.asarray(spec.stop_ids or (-1,), jnp.int32)

  def cond(s: DecodeState):
    return (s.step < until_step) & ~jnp.all(s.done)

  def body(s: DecodeState):
    mask = decode_mask(s.pad, s.slot, spec.slots)                           # [B, 1, S]
    h, cache = model.decode(s.last[:, None], s.pos[:, None], mask, s.cache, s.slot)
    logits = model.logits(h[:, 0])
    nxt = sample(logits, jax.vmap(jax.random.fold_in)(s.keys, jnp.broadcast_to(s.step, s.pad.shape)),
                 spec.sampling)
    nxt = jnp.where(s.done, spec.pad_id, nxt)
    tokens = jax.lax.dynamic_update_slice(s.tokens, nxt[:, None], (jnp.int32(0), s.step))
    match, text_stop = _stop_step(matcher, s.match, nxt, ~s.done)
    return DecodeState(cache=cache, tokens=tokens, last=nxt, pos=s.pos + 1, pad=s.pad,
                       slot=s.slot + 1, step=s.step + 1,
                       done=s.done | jnp.isin(nxt, stop) | text_stop,
                       n_gen=s.n_gen + (~s.done).astype(jnp.int32), keys=s.keys, match=match)

  return jax.lax.while_loop(cond, body, state)


class Generator:
  """Batched sequential generation for one model. Compiled programs are cached by Spec."""

  def __init__(self, model: Transformer, tokenizer=None, *, mesh: Mesh | None = None,
               rules: ShardingRules | None = None, cache_dtype=None):
    self.graphdef, self.params = nnx.split(model)
    self.cfg = model.cfg
    self.tokenizer = tokenizer
    self.mesh = mesh or single_device_mesh()
    self.rules = rules or ShardingRules()
    leaves = jax.tree.leaves(self.params)
    self.cache_dtype = cache_dtype or (leaves[0].dtype if leaves else jnp.float32)
    self._compiled: dict = {}
    self._matchers: dict = {}
    self.stats: dict = {}

  def _matcher(self, stop_text: tuple):
    """The text matcher of a tuple of stop strings (built once: tables over the vocabulary)."""
    if not stop_text:
      return None
    if stop_text not in self._matchers:
      from apr_jax.protocols.textmatch import TextMatcher
      if self.tokenizer is None:
        raise UserError("stop strings need the model's tokenizer")
      texts = list(self.tokenizer.token_texts())[:self.cfg.vocab_size]
      texts += [""] * (self.cfg.vocab_size - len(texts))  # ids past the tokenizer's: no text
      self._matchers[stop_text] = TextMatcher.build(stop_text, texts)
    return self._matchers[stop_text]

  # ---- compiled programs
  def _row_shardings(self, b: int):
    """Shardings of per-row vectors [B] and per-row matrices [B, *] (rows over `data`)."""
    spec = self.rules.spec(("batch",), (b,), self.mesh)
    return NamedSharding(self.mesh, spec), NamedSharding(self.mesh, spec + (None,))

  def _programs(self, spec: Spec):
    """(prefill, decode) compiled ahead of time for `spec`, so compile time is measured
    apart from run time."""
    if spec in self._compiled:
      return self._compiled[spec]
    t0 = time.perf_counter()
    b = spec.batch
    row, row2 = self._row_shardings(b)
    i32 = lambda shape, sh: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh)
    kshape = jax.random.key_data(jax.random.key(0)).shape
    keys_abs = jax.ShapeDtypeStruct((b,) + kshape, jnp.uint32, sharding=row2)
    cache_sharding = kvlib.cache_sharding(self.cfg, b, spec.slots, self.mesh, self.rules)
    matcher = self._matcher(spec.stop_text)
    prefill = jax.jit(functools.partial(_prefill, cache_dtype=self.cache_dtype,
                                        cache_sharding=cache_sharding, matcher=matcher),
                      static_argnums=(0, 5)).lower(
        self.graphdef, self.params, i32((b, spec.prompt_len), row2), i32((b,), row), keys_abs,
        spec).compile()
    state_abs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                             prefill.out_info)
    decode = jax.jit(functools.partial(_decode, matcher=matcher), static_argnums=(0, 4),
                     donate_argnums=(2,)).lower(
        self.graphdef, self.params, state_abs, jax.ShapeDtypeStruct((), jnp.int32), spec).compile()
    self._compiled[spec] = (prefill, decode)
    self.stats["compile_s"] = self.stats.get("compile_s", 0.0) + time.perf_counter() - t0
    return prefill, decode

  def spec_for(self, prompt_lens: Sequence[int], max_new_tokens: int,
               sampling: SamplingConfig, stop_ids: Sequence[int] | None,
               row_limits: Sequence[int] | None = None,
               stop_strings: Sequence[str] = ()) -> Spec:
    longest = max(prompt_lens)
    if min(prompt_lens) == 0:
      raise UserError("empty prompt")
    if max_new_tokens <= 0:
      raise UserError(f"max_new_tokens must be positive, got {max_new_tokens}")
    limits = row_limits if row_limits is not None else [max_new_tokens] * len(prompt_lens)
    for n, lim in zip(prompt_lens, limits):
      if not 0 < lim <= max_new_tokens:
        raise UserError(f"a row's token limit must be in 1..{max_new_tokens}, got {lim}")
      if n + lim > self.cfg.max_seq_len:
        raise UserError(f"prompt ({n} tokens) + max_new_tokens ({lim}) exceeds the "
                        f"model's context of {self.cfg.max_seq_len} tokens")
    if stop_ids is None:
      stop_ids = self.tokenizer.stop_ids() if self.tokenizer is not None else list(self.cfg.eos_ids)
    pad_id = self.cfg.eos_ids[0] if self.cfg.eos_ids else 0
    stop_text = tuple(dict.fromkeys(str(t) for t in stop_strings))
    if any(not t for t in stop_text):
      raise UserError("a stop string must not be empty")
    spec = Spec(batch=len(prompt_lens), prompt_len=bucket(longest), max_new=bucket(max_new_tokens),
                sampling=sampling, stop_ids=tuple(int(s) for s in stop_ids), pad_id=pad_id,
                stop_text=stop_text)
    memlib.check_batch(self.cfg, self.cache_dtype, spec.batch, spec.prompt_len, spec.slots,
                       self.mesh, f"generating {spec.batch} prompt(s) of up to {longest} tokens")
    return spec

  def start(self, prompts: Sequence[Sequence[int]], spec: Spec, seeds: Sequence[int]) -> DecodeState:
    prefill, _ = self._programs(spec)
    b, p = spec.batch, spec.prompt_len
    arr = np.full((b, p), spec.pad_id, np.int32)
    pad = np.zeros((b,), np.int32)
    for r, ids in enumerate(prompts):
      arr[r, p - len(ids):] = ids
      pad[r] = p - len(ids)
    keys = np.asarray(jax.random.key_data(jax.vmap(jax.random.key)(np.asarray(seeds, np.uint32))))
    row, row2 = self._row_shardings(b)
    return prefill(self.params, put(arr, row2), put(pad, row), put(keys, row2))

  def advance(self, state: DecodeState, spec: Spec, until_step: int) -> DecodeState:
    _, decode = self._programs(spec)
    return decode(self.params, state, np.int32(until_step))

  def generate_ids(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                   sampling: SamplingConfig = SamplingConfig(), stop_ids=None, seed: int = 0,
                   on_segment=None, segment: int = 0, row_limits: Sequence[int] | None = None,
                   stop_strings: Sequence[str] = ()):
    """Token-level API. Returns (tokens [B, max_new_tokens] np, n_gen [B] np, done [B] np).

    `stop_strings`: a row also ends (done) in the token whose text completes one of them,
    matched on device over the decoded text of what the row generated (`protocols.textmatch`:
    any spelling of the string, inside a token or across tokens); that token is the row's last.

    `on_segment(state)` is called after every `segment` decode steps (0 = one segment); if
    it returns True, decoding stops there (the caller has what it needs: e.g. every row has
    written a stop string).
    `row_limits` [B] (each <= max_new_tokens): row r keeps its first row_limits[r] tokens,
    as if generated alone with that budget (rows are independent: the tokens a row decodes
    past its limit are dropped and change nothing before them); only prompt + limit must fit
    the model's context.
    """
    spec = self.spec_for([len(p) for p in prompts], max_new_tokens, sampling, stop_ids,
                         row_limits, stop_strings)
    self._programs(spec)  # compile outside the timed region
    t0 = time.perf_counter()
    state = self.start(prompts, spec, [seed + i for i in range(len(prompts))])
    jax.block_until_ready(state.step)
    t1 = time.perf_counter()
    step = 1
    while True:
      until = max_new_tokens if not segment else min(max_new_tokens, step + segment)
      state = self.advance(state, spec, until)
      step, all_done = fetch((state.step, jnp.all(state.done)))  # the same on every process
      step = int(step)
      if on_segment is not None and on_segment(state) is True:
        break
      if step >= max_new_tokens or bool(all_done):
        break
    tokens, n_gen, done = fetch((state.tokens, state.n_gen, state.done))
    t2 = time.perf_counter()
    self.stats.update(prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=step - 1)
    tokens, n_gen = np.array(tokens[:, :max_new_tokens]), np.minimum(n_gen, max_new_tokens)
    done = np.array(done)
    if row_limits is not None:
      lim = np.asarray(row_limits)
      over = n_gen > lim           # the stop token (if any) came after the row's limit
      done &= ~over
      n_gen = np.minimum(n_gen, lim)
      tokens[np.arange(tokens.shape[1])[None, :] >= lim[:, None]] = spec.pad_id
    return tokens, n_gen, done

  def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], *, chat: str | bool = "auto",
               max_new_tokens: int = 64, sampling: SamplingConfig = SamplingConfig(),
               seed: int = 0, stop_ids=None, on_segment=None, segment: int = 0,
               stop_strings: Sequence[str] = ()) -> list[Result]:
    """Text API: prompts are strings or token id lists. `chat` ("auto" | "on" | "off",
    `tokenizer.chat.use_chat`): "auto" wraps string prompts in the checkpoint's chat template
    when it has one and leaves them plain text when it has none. `stop_strings`: a row ends
    where its text first holds one of them (stop reason "stop"); `text` is cut before it, as
    OpenAI's `stop` cuts, and `token_ids` end with the token that completed it."""
    tok = self.tokenizer
    ids = []
    wrap = None
    for p in prompts:
      if isinstance(p, str):
        if tok is None:
          raise UserError("this model has no tokenizer; pass token ids")
        if wrap is None:
          wrap = use_chat(chat, tok.chat_template)
        text = tok.apply_chat([{"role": "user", "content": p}]) if wrap else p
        ids.append(tok.encode(text))
      else:
        ids.append([int(i) for i in p])
    for p in ids:
      bad = [i for i in p if not 0 <= i < self.cfg.vocab_size]
      if bad:
        raise UserError(f"token id {bad[0]} is outside the model's vocab of {self.cfg.vocab_size}")
    tokens, n_gen, done = self.generate_ids(ids, max_new_tokens=max_new_tokens, sampling=sampling,
                                            stop_ids=stop_ids, seed=seed, on_segment=on_segment,
                                            segment=segment, stop_strings=stop_strings)
    stop_set = set(self.spec_for([len(p) for p in ids], max_new_tokens, sampling,
                                 stop_ids).stop_ids)
    out = []
    for r in range(len(ids)):
      gen = [int(t) for t in tokens[r, :n_gen[r]]]
      stopped = bool(done[r])
      body = gen[:-1] if stopped and gen and gen[-1] in stop_set else gen
      text = tok.decode(body) if tok is not None else ""
      if stopped and stop_strings:
        cut = [text.find(t) for t in stop_strings if t and t in text]
        text = text[:min(cut)] if cut else text
      out.append(Result(token_ids=gen, text=text, stop_reason=(StopReason.STOP if stopped else StopReason.LENGTH).label,
                        prompt_tokens=len(ids[r])))
    return out
