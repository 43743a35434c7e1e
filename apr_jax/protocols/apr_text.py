"""The original APR protocol on device: its plain-text tags read over a thread's tokens, the
spawn block parsed, the child prompts and the results block spliced from token spans.

The original (`protocols.reference.apr_search`) edits text and tokenizes every call afresh.
The engine keeps tokens, so it copies token spans of the parent's and the children's
contexts and puts fixed tokens ("glue") between them:

  child prompt   BOS  Moving to Node #{id}\\nCurrent State: {state without ]}], Operations: ['
                 [{parent's operations}', '] {op}']
  results block  <Sub Searches>\\n, per child i: <Goal Reached in Sub Search {i} at level 1 at
                 Node #{id}>\\n{summary path}\\n  or  <No Solution in Sub Search {i} at level 1
                 at Node #{id}>\\n, then <End Sub Searches>\\n

`{id}`, `{state}`, `{op}` and the parent's operations are spans of the parent's node line
`Generated Node #{id}: {state} Operation: {op}` and of the latest `Operations: [...]` line
before it; `{summary path}` is the child's text after its second-to-last `Goal Reached` and
one character, stripped. The glue is derived from the tokenizer when the protocol is built
(the tokens a fresh encoding has between the copied spans), and the splices are checked
against fresh encodings there: a tokenizer whose spelling depends on what sits across a
splice is refused (the host orchestration, `engine.host_original`, runs any tokenizer).

Where tags are read: on the parent's live tokens at the fork (`plan`: one associative scan
per tag, matching text as `protocols.textmatch` does, so any spelling of a tag is found),
and on each sampled token while decoding (`stream`: the spawn trigger, the stop string and
`Goal Reached`). Lines are token spans between newline tokens: the protocol needs a
tokenizer whose only token holding a newline is the newline itself (Llama-2's byte
fallback `<0x0A>`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from apr_jax.errors import UserError
from apr_jax.protocols import reference
from apr_jax.protocols.textmatch import TextMatcher, token_tables

CALLING = reference.APR_CALLING
END_CALLING = reference.APR_END_CALLING
STOP = reference.APR_STOP
GOAL = "Goal Reached"
# tags read on the parent's tokens at a fork, in this order
SEARCH = (CALLING, "\n" + END_CALLING, "<Start Sub Search", "Moving to Node", "Moving to Node #",
          "Generated Node #", "Operation:", "Operations: [", "Operations: ['", "Generated Node")
(T_CALLING, T_END_NL, T_START, T_MOVING, T_MOVING_ID, T_GEN_ID, T_OP, T_OPS,
 T_OPS_OPEN, T_GEN) = range(len(SEARCH))
# tags read on every sampled token
STREAM = (END_CALLING, GOAL, STOP)
S_END, S_GOAL, S_STOP = range(len(STREAM))
MAX_ID = 32  # tokens of a node id (the child's label)


@dataclasses.dataclass(frozen=True, eq=False)
class AprText:
  """The tables and glue the device needs (host arrays; hashable by identity)."""
  search: TextMatcher
  stream: TextMatcher
  newline: int
  blank: np.ndarray       # [V] bool: the token's text is whitespace only, or empty (BOS, EOS)
  colon: np.ndarray       # [V] bool: the text is ':'
  bracket: np.ndarray     # [V] bool: the text is ']'
  quote: np.ndarray       # [V] bool: the text starts with "'"
  lead_space: np.ndarray  # [V] bool: the text starts with a space
  dummy_prefix: bool      # the tokenizer spells a text's start after a space (sentencepiece)
  nbytes: np.ndarray      # [V] int32: bytes of the text
  stop_at: np.ndarray     # [len(STOP) + 1, V] int32: a token's bytes up to where the stop
                          # string first ends in it, from each matcher state (0: it does not)
  bos: tuple
  digits: tuple           # ids of '0'..'9' (a child's number in the results block)
  glue: dict              # name -> token tuple (see the module docstring)

  @property
  def tag_len(self):
    return tuple(len(t.encode()) for t in SEARCH)


def _in_context(tok, left: str, text: str) -> tuple:
  """The tokens `text` gets after `left` in a fresh encoding (left's own tokens removed)."""
  a, b = tok.encode(left), tok.encode(left + text)
  if b[:len(a)] != a:
    raise UserError(f"this tokenizer spells {text!r} after {left!r} across the boundary; the "
                    "on-device APR protocol cannot splice it (run it with the host orchestration)")
  return tuple(b[len(a):])


def build(tok) -> AprText:
  """The protocol's tables for a tokenizer; refused (UserError) where a splice would not give
  the fresh encoding's tokens."""
  texts = tok.token_texts()
  nl = [i for i, t in enumerate(texts) if "\n" in t]
  if len(nl) != 1 or texts[nl[0]] != "\n" or tok.encode("a\nb")[-2:-1] != nl:
    raise UserError("the on-device APR protocol needs a tokenizer whose only token holding a "
                    "newline is the newline itself (as Llama-2's byte fallback has it); run it "
                    "with the host orchestration")
  digits = []
  for d in range(10):
    ids = _in_context(tok, "\n", str(d))
    if len(ids) != 1:
      raise UserError("the on-device APR protocol needs single-token digits")
    digits.append(ids[0])
  g = {
      "node": _in_context(tok, "", "Moving to Node #"),
      "state": _in_context(tok, "0", "\nCurrent State: "),
      "ops": _in_context(tok, "1", "], Operations: ['"),
      "ops_sep": _in_context(tok, "1", "', '"),
      "ops_end": _in_context(tok, "1", "']"),
      "open": _in_context(tok, "\n", "<Sub Searches>\n"),
      "sp_open": _in_context(tok, "a", " <Sub Searches>\n"),
      "goal": _in_context(tok, "\n", "<Goal Reached in Sub Search "),
      "none": _in_context(tok, "\n", "<No Solution in Sub Search "),
      "mid": _in_context(tok, "0", " at level 1 at Node #"),
      "close": _in_context(tok, "0", ">\n"),
      "nl": _in_context(tok, "a", "\n"),
      "end": _in_context(tok, "\n", "<End Sub Searches>\n"),
      "calling": _in_context(tok, "\n", CALLING),
      "sp_calling": _in_context(tok, "a", " " + CALLING),
  }
  arr = lambda f: np.array([f(t) for t in texts], bool)
  at = AprText(
      search=TextMatcher.build(SEARCH, texts), stream=TextMatcher.build(STREAM, texts),
      newline=nl[0], blank=arr(lambda t: t.strip() == ""), colon=arr(lambda t: t == ":"),
      bracket=arr(lambda t: t == "]"), quote=arr(lambda t: t.startswith("'")),
      lead_space=arr(lambda t: t.startswith(" ")),
      dummy_prefix=texts[tok.encode("<")[0]].startswith(" "),
      nbytes=np.array([len(t.encode()) for t in texts], np.int32),
      stop_at=token_tables(STOP, texts, offsets=True)[2],
      bos=() if tok.bos_id is None else (tok.bos_id,), digits=tuple(digits), glue=g)
  check(at, tok)
  return at


# ----------------------------------------------------------------------------- on device
def _scan(tm: TextMatcher, seq, valid):
  """Every tag of `tm` over the token sequence: (hit [T, G]: an occurrence ends in the token;
  clean [T, G]: it ends at the token's last byte). One associative scan of the automata's
  transition maps (composition), so a fork reads its parent in O(log G) steps."""
  import jax
  import jax.numpy as jnp
  nxt, hit_t = jnp.asarray(tm.nxt), jnp.asarray(tm.hit)
  n_t, n_s = nxt.shape[:2]
  tok = jnp.clip(seq, 0, nxt.shape[2] - 1)
  f = jnp.moveaxis(nxt[:, :, tok], 2, 1)                                  # [T, G, S]
  f = jnp.where(valid[None, :, None], f, jnp.arange(n_s, dtype=f.dtype)[None, None, :])
  after = jax.lax.associative_scan(lambda a, b: jnp.take_along_axis(b, a, axis=-1), f, axis=1)
  after = after[:, :, 0]
  before = jnp.concatenate([jnp.zeros((n_t, 1), after.dtype), after[:, :-1]], axis=1)
  hit = hit_t[jnp.arange(n_t)[:, None], before, tok[None, :]] & valid[None, :]
  lens = jnp.asarray([len(t.encode()) for t in tm.tags], after.dtype)
  return hit, hit & (after == lens[:, None])


def _span_strip(nb_next, nb_prev, a, b):
  """[a, b) without its blank tokens at both ends (an empty span: a == b)."""
  import jax.numpy as jnp
  n = nb_next.shape[0]
  lo = nb_next[jnp.clip(a, 0, n - 1)]
  hi = nb_prev[jnp.clip(b - 1, 0, n - 1)] + 1
  ok = (a < b) & (lo < b) & (hi > a)
  return jnp.where(ok, lo, a), jnp.where(ok, hi, a)


def _hashes(seq, n_pos):
  """Polynomial hashes of every span: h(a, b) = (H[b] - H[a]) * P^-a (uint32, wrapping)."""
  import jax.numpy as jnp
  p = np.uint32(0x01000193)
  with np.errstate(over="ignore"):
    powers = np.cumprod(np.concatenate([[1], np.full(n_pos - 1, p)]).astype(np.uint32), dtype=np.uint32)
    inv = np.cumprod(np.concatenate([[1], np.full(n_pos - 1, pow(int(p), -1, 1 << 32))]).astype(
        np.uint32), dtype=np.uint32)
  h = jnp.concatenate([jnp.zeros((1,), jnp.uint32), jnp.cumsum(
      (seq.astype(jnp.uint32) + 1) * jnp.asarray(powers[:-1]), dtype=jnp.uint32)])
  return lambda a, b: (h[b] - h[a]) * jnp.asarray(inv)[jnp.clip(a, 0, n_pos - 1)]


def plan(at: AprText, seq, n, k_max: int):
  """The spawn of a parent whose live tokens are seq[:n] ([G]): a dict with

  mark: the index of the token where the block (`<Calling Sub Searches>`) starts (without
  one, the first token after the BOS: the original's split keeps no head then); mark_sp:
  the results block is spelled after a space (the block's first token holds one before the
  tag, or the block starts the text of a tokenizer that prefixes one); count: the spawn
  lines (children); spans [K, 4, 2]: per child the [start, end) indices of its node id, its state without `]`,
  the parent's operations (empty for a node whose parent has none) and its operation;
  bad: the spawn is malformed (a spawn line naming no node, a node no line generated, a
  node named twice, a `Generated Node` line that does not read as one, an id longer than
  MAX_ID tokens): the original's search ends there."""
  import jax
  import jax.numpy as jnp
  g = seq.shape[0]
  j = jnp.arange(g)
  valid = j < n
  hit, clean = _scan(at.search, seq, valid)
  tok = jnp.clip(seq, 0, at.blank.shape[0] - 1)
  nl = valid & (seq == at.newline)
  line = jnp.cumsum(nl) - nl                                   # the newline ends its line
  blank = jnp.asarray(at.blank)[tok] | ~valid
  nb_next = jax.lax.cummin(jnp.where(~blank, j, g), axis=0, reverse=True)
  nb_prev = jax.lax.cummax(jnp.where(~blank, j, -1), axis=0)
  seg = lambda x, op: op(x, line, num_segments=g)
  first_in_line = lambda m: seg(jnp.where(m, j, g), jax.ops.segment_min)
  line_end = seg(jnp.where(valid & ~nl, j + 1, 0), jax.ops.segment_max)  # [lines]
  line_start = seg(jnp.where(valid, j, g), jax.ops.segment_min)

  # the block: after the last `<Calling Sub Searches>\n`, up to the first `\n<End Calling...`
  nl_next = jnp.concatenate([nl[1:], jnp.zeros((1,), bool)])
  calling = hit[T_CALLING] & clean[T_CALLING] & nl_next
  bs = jnp.max(jnp.where(calling, j, -1))
  lo = jnp.where(bs >= 0, bs + 2, 0)
  last_nl = jax.lax.cummax(jnp.where(nl, j, -1), axis=0)
  end_nl = hit[T_END_NL] & (last_nl >= lo)
  be = jnp.min(jnp.where(end_nl, last_nl, n))
  # the tag's first token: the one holding its first byte (walking back over byte counts)
  nbytes = jnp.asarray(at.nbytes)[tok]
  cum = jnp.cumsum(nbytes)
  start_of = lambda e, length: jnp.searchsorted(cum, cum[e] - length, side="right")
  # without a block opener the original keeps no head: the block starts after the BOS
  head0 = jnp.where((n > 0) & (seq[0] == (at.bos[0] if at.bos else -1)), 1, 0)
  mark = jnp.where(bs >= 0, start_of(jnp.maximum(bs, 0), at.tag_len[T_CALLING]), head0)
  # the block's first token holds a space before the tag: the results block is spelled after it
  mc = jnp.clip(mark, 0, g - 1)
  mark_sp = ((bs >= 0) & (cum[jnp.maximum(bs, 0)] - at.tag_len[T_CALLING] - (cum[mc] - nbytes[mc]) == 1)
             & jnp.asarray(at.lead_space)[tok[mc]])
  mark_sp |= (bs < 0) & at.dummy_prefix  # no head: the block starts the text, as encoded afresh

  # spawn lines: `<Start Sub Search` and `Moving to Node` in one line of the block
  inb = valid & (j >= lo) & (j < be)
  has = lambda t: seg((hit[t] & inb).astype(jnp.int32), jax.ops.segment_max) > 0
  spawn = has(T_START) & has(T_MOVING)
  mid = first_in_line(hit[T_MOVING_ID] & inb)
  mid_c = mid < g
  mid_clean = clean[T_MOVING_ID][jnp.clip(mid, 0, g - 1)] & mid_c
  lines = jnp.nonzero(spawn, size=k_max, fill_value=g)[0]
  count = jnp.minimum(jnp.sum(spawn), k_max).astype(jnp.int32)
  lc = jnp.clip(lines, 0, g - 1)
  live = lines < g
  ida, idb = _span_strip(nb_next, nb_prev, mid[lc] + 1, line_end[lc])
  bad = jnp.any(live & ~mid_clean[lc])
  bad |= jnp.any(live & ((idb - ida) > MAX_ID)) | jnp.any(live & (idb <= ida))

  # node lines: `Generated Node #{id}: {state} Operation: {op}`, anywhere in the text
  gid = first_in_line(hit[T_GEN_ID] & clean[T_GEN_ID])
  colon_next = jax.lax.cummin(jnp.where(jnp.asarray(at.colon)[tok] & valid, j, g), axis=0,
                              reverse=True)
  c = colon_next[jnp.clip(gid + 1, 0, g - 1)]
  op_next = jax.lax.cummin(jnp.where(clean[T_OP], j, g), axis=0, reverse=True)
  o = op_next[jnp.clip(c + 1, 0, g - 1)]
  lend = line_end
  node = (gid < g) & (c < lend) & (o < lend)
  na, nb = _span_strip(nb_next, nb_prev, gid + 1, c)
  sa, sb = _span_strip(nb_next, nb_prev, c + 1, start_of(jnp.clip(o, 0, g - 1), at.tag_len[T_OP]))
  node &= (sb > sa) & jnp.asarray(at.bracket)[tok][jnp.clip(sb - 1, 0, g - 1)] & (nb > na)
  oa, ob = _span_strip(nb_next, nb_prev, o + 1, lend)
  # a `Generated Node` line that is no node line: the original cannot read it either
  bad |= jnp.any((seg(hit[T_GEN].astype(jnp.int32), jax.ops.segment_max) > 0) & ~node)
  # the parent's operations: the latest `Operations: [` line before the node line
  ops_prev = jax.lax.cummax(jnp.where(hit[T_OPS], j, -1), axis=0)
  q = ops_prev[jnp.clip(line_start - 1, 0, g - 1)]
  q = jnp.where(line_start > 0, q, -1)
  ql = line[jnp.clip(q, 0, g - 1)]
  oo = first_in_line(hit[T_OPS_OPEN] & clean[T_OPS_OPEN])[ql]
  quote_last = seg(jnp.where(jnp.asarray(at.quote)[tok] & valid, j, -1), jax.ops.segment_max)[ql]
  has_ops = (q >= 0) & (oo < g) & (quote_last > oo + 1)
  ea, eb = jnp.where(has_ops, oo + 1, 0), jnp.where(has_ops, quote_last, 0)

  # each spawn's node: the first node line with the same id tokens
  h = _hashes(seq, g + 1)
  sid = h(ida, idb)
  nid = h(na, nb)
  same = (node[None, :] & (nid[None, :] == sid[:, None]) &
          ((nb - na)[None, :] == (idb - ida)[:, None]))                    # [K, lines]
  found = jnp.any(same, axis=1)
  at_l = jnp.argmax(same, axis=1)
  k_i = jnp.arange(MAX_ID)
  tok_of = lambda a, b: jnp.where(k_i[None, :] < (b - a)[:, None],
                                  seq[jnp.clip(a[:, None] + k_i[None, :], 0, g - 1)], -1)
  exact = jnp.all(tok_of(ida, idb) == tok_of(na[at_l], nb[at_l]), axis=1)
  bad |= jnp.any(live & ~(found & exact))
  ids = tok_of(ida, idb)
  dup = (jnp.all(ids[:, None, :] == ids[None, :, :], axis=2) & live[:, None] & live[None, :] &
         (jnp.arange(k_max)[:, None] < jnp.arange(k_max)[None, :]))
  bad |= jnp.any(dup)
  spans = jnp.stack([jnp.stack([ida, idb], -1), jnp.stack([sa[at_l], sb[at_l] - 1], -1),
                     jnp.stack([ea[at_l], eb[at_l]], -1), jnp.stack([oa[at_l], ob[at_l]], -1)], 1)
  spans = jnp.where(live[:, None, None], spans, 0)
  return dict(mark=mark.astype(jnp.int32), mark_sp=mark_sp, count=count,
              spans=spans.astype(jnp.int32), bad=bad)


def child_prompt(at: AprText, seq, spans, size: int):
  """A child's prompt [size] and its length: BOS, glue and the spans [4, 2] of `seq`."""
  import jax.numpy as jnp
  from apr_jax.engine.tree.ops import compact
  gl = at.glue
  has_ops = spans[2, 1] > spans[2, 0]
  parts, oks = [], []

  def const(ids, ok=True):
    parts.append(jnp.asarray(ids if ids else [0], jnp.int32))
    oks.append(jnp.full((max(len(ids), 1),), bool(ids)) & ok)

  def span(s):
    k = jnp.arange(seq.shape[0])
    parts.append(seq)
    oks.append((k >= s[0]) & (k < s[1]))
  const(at.bos + gl["node"])
  span(spans[0])
  const(gl["state"])
  span(spans[1])
  const(gl["ops"])
  span(spans[2])
  const(gl["ops_sep"], has_ops)
  span(spans[3])
  const(gl["ops_end"])
  toks, ok = jnp.concatenate(parts), jnp.concatenate(oks)
  out, _ = compact(toks, ok, size)
  return out, jnp.sum(ok).astype(jnp.int32)


def number_tokens(at: AprText, i):
  """The digits of child number i (0-based, as the original numbers its results) [3] and
  how many are real (numbers up to 999)."""
  import jax.numpy as jnp
  d = jnp.asarray(at.digits, jnp.int32)
  n = jnp.where(i >= 100, 3, jnp.where(i >= 10, 2, 1))
  ds = jnp.stack([d[(i // 100) % 10], d[(i // 10) % 10], d[i % 10]])
  return jnp.roll(ds, n - 3), n


# ----------------------------------------------------------------------------- results
def _live(ids, pos):
  """Indices of the entries no later entry rewrote (a thread's context as it ends)."""
  keep, low = [], 1 << 62
  for i in range(len(ids) - 1, -1, -1):
    if pos[i] < low:
      keep.append(i)
      low = pos[i]
  return keep[::-1]


def search_texts(result, tok, prompt_ids) -> tuple[list, list]:
  """(the root's calls, the children's texts) of a `TreeResult` of the on-device protocol,
  as the original records a search: each root call's text is the root's context where the
  call ended (a spawn: the entry before the forced results block; the last entry), each
  child's text its context at its end; BOS and EOS left out, one trailing newline dropped.
  `prompt_ids`: the root's prompt as admitted (its ThreadInfo starts after it)."""
  stops = set(tok.stop_ids()) | ({tok.bos_id} if tok.bos_id is not None else set())

  def text(ids):
    t = tok.decode([i for i in ids if i not in stops])
    return t[:-1] if t.endswith("\n") else t

  root = result.threads[0]
  ids = list(prompt_ids) + list(root["token_ids"])
  pos = list(range(len(prompt_ids))) + list(root["positions"])
  sampled = [False] * len(prompt_ids) + [lp is not None for lp in root["logprobs"]]
  ends = []
  for k in range(len(ids) - 1):
    if sampled[k] and not sampled[k + 1]:  # forced next: a results block or a replacement
      run = []
      for j in range(k + 1, len(ids)):
        if sampled[j] or len(run) >= 8:
          break
        run.append(ids[j])
      if tok.decode(run).lstrip(" ").startswith(STOP):
        ends.append(k)
  ends.append(len(ids) - 1)
  calls = [text([ids[i] for i in _live(ids[:e + 1], pos[:e + 1])]) for e in ends]
  kids = [text([t["token_ids"][i] for i in _live(t["token_ids"], t["positions"])])
          for t in result.threads[1:]]
  return calls, kids


# ----------------------------------------------------------------------------- host check
def _np_plan(at: AprText, ids: list, k_max: int = 8):
  import jax.numpy as jnp
  g = max(64, 1 << (len(ids) - 1).bit_length())
  seq = np.zeros((g,), np.int32)
  seq[:len(ids)] = ids
  import jax
  p = jax.jit(lambda s, n: plan(at, s, n, k_max))(jnp.asarray(seq), len(ids))
  return seq, {k: np.asarray(v) for k, v in p.items()}


_EXAMPLES = (
    ("Moving to Node #0\nCurrent State: 40:[30, 82, 20, 67], Operations: []\n"
     "Exploring Operation: 82-67=15, Resulting Numbers: [30, 20, 15]\n"
     "Generated Node #0,1: 40:[30, 20, 15] Operation: 82-67=15\n"
     "Exploring Operation: 82-30=52, Resulting Numbers: [20, 67, 52]\n"
     "Generated Node #0,0: 40:[20, 67, 52] Operation: 82-30=52\n"
     "<Calling Sub Searches>\n<Start Sub Search 0 at level 1> Moving to Node #0,1\n"
     "<Start Sub Search 1 at level 1> Moving to Node #0,0\n<End Calling Sub Searches>"),
    ("Moving to Node #0\nCurrent State: 96:[12, 7, 88, 3], Operations: []\n"
     "Exploring Operation: 12-7=5, Resulting Numbers: [88, 3, 5]\n"
     "Generated Node #0,2: 96:[88, 3, 5] Operation: 12-7=5\n"
     "Moving to Node #0,2\nCurrent State: 96:[88, 3, 5], Operations: ['12-7=5']\n"
     "Exploring Operation: 88+5=93, Resulting Numbers: [3, 93]\n"
     "Generated Node #0,2,10: 96:[3, 93] Operation: 88+5=93\n"
     "<Calling Sub Searches>\n<Start Sub Search 0 at level 1> Moving to Node #0,2,10\n"
     "<End Calling Sub Searches>"),
)


def check(at: AprText, tok):
  """Splices equal fresh encodings on a few spawns and joins: the tokenizer's spellings do
  not depend on what sits across a splice (else UserError)."""
  for text in _EXAMPLES:
    ids = tok.encode(text)
    seq, p = _np_plan(at, ids)
    want_ids, want = reference.apr_children(text)
    import jax.numpy as jnp
    for k, prompt in enumerate(want):
      out, n = child_prompt(at, jnp.asarray(seq), jnp.asarray(p["spans"][k]), 256)
      if p["bad"] or int(p["count"]) != len(want) or \
         [int(x) for x in np.asarray(out)[:int(n)]] != list(at.bos) + tok.encode(prompt):
        raise UserError("this tokenizer spells the original APR's child prompts differently "
                        "from a splice of the parent's tokens; the on-device APR protocol cannot "
                        "run it (run it with the host orchestration)")
    head = reference.apr_join(text, want_ids, [None] * len(want_ids))
    spliced = list(ids[:int(p["mark"])]) + list(at.glue["open"])
    for k, nid in enumerate(want_ids):
      a, b = p["spans"][k, 0]
      spliced += [*at.glue["none"], *[at.digits[int(c)] for c in str(k)], *at.glue["mid"],
                  *[int(x) for x in seq[a:b]], *at.glue["close"]]
    spliced += list(at.glue["end"])
    if spliced != tok.encode(head):
      raise UserError("this tokenizer spells the original APR's results block differently "
                      "from its splice; the on-device APR protocol cannot run it (run it with "
                      "the host orchestration)")
