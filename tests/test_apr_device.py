"""The original APR on device (`--protocol apr`, `protocols.apr_text`) against the text-level
reference (`protocols.reference.apr_search`): a scripted model writes the original solver's
traces and malformed variants of them; the engine, teacher-forced with the same text, gives
the reference's children (prompts token for token, their texts), its final text and its
malformed ends, and every sample's logits equal a plain forward over the context the
original's fresh tokenization gives (a Llama checkpoint with a Llama-2-style sentencepiece
tokenizer, as in test_original_checkpoints)."""
import random
import zlib

import numpy as np
import pytest

from apr_jax.protocols import reference as ref
from apr_jax.tasks import countdown as cd
from apr_jax.tasks.countdown import original as orig

pytest.importorskip("sentencepiece")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from apr_jax import checkpoint
  from apr_jax.engine.runner import TreeEngine
  from apr_jax.engine.tree import TreeSpec
  from apr_jax.protocols import build
  from tests.test_original_checkpoints import make_apr_checkpoint
  path = make_apr_checkpoint(str(tmp_path_factory.mktemp("apr_device") / "llama_apr"))
  model, tok = checkpoint.load(path)
  spec = TreeSpec(protocol=build("apr", tok), root_stop=tuple(tok.stop_ids()), rows=8, threads=16,
                  slots=12288, log=49152, chunk=32, script=1536, script_rows=16,
                  record_logits=True)
  return model, tok, TreeEngine(model, tok, spec)


def _trim(t):
  return t[:-1] if t.endswith("\n") else t


class Model:
  """A text-level model: the root's continuations in order; each child's (by its node line)
  in order. Records every call as (root?, prefix, continuation)."""

  def __init__(self, root, children):
    self.root, self.children = list(root), {k: list(v) for k, v in children.items()}
    self.served = []

  def __call__(self, prefix):
    first = prefix.split("\n")[0]
    is_root = not first.startswith("Moving to Node #0,")
    c = self.root.pop(0) if is_root else self.children[first].pop(0)
    self.served.append((is_root, prefix, c))
    return c


def _tokens(tok, prefix, cont, eos=True):
  """The tokens a model writes after `prefix` to give `cont` (canonical: the fresh encoding
  of the whole text past the prefix's), cut at the token that completes the stop string."""
  a, b = tok.encode(prefix), tok.encode(prefix + cont)
  assert b[:len(a)] == a
  out = b[len(a):]
  texts = tok.token_texts()
  if ref.APR_STOP in cont:
    k = next(k for k in range(1, len(out) + 1) if ref.APR_STOP in "".join(texts[t] for t in out[:k]))
    return out[:k]
  return out + ([tok.eos_id] if eos else [])


def _live(ids, pos):
  """Indices of a thread's context as it ends: entry by entry, a token at position p drops
  what the context held from p on (a join or a rewind went back) and is appended."""
  ctx = []
  for i, p in enumerate(pos):
    while ctx and pos[ctx[-1]] >= p:  # the context's positions increase
      ctx.pop()
    ctx.append(i)
  return ctx


def run_case(setup, prompt, root, children, budget=None, spell=None, check_logits=True,
             no_eos=(), reason=None, max_threads=None):
  """Runs the reference and the engine on one scripted search; returns both. `spell(tokens)`
  respells the root's tokens (a non-canonical spelling of the same text); root calls in
  `no_eos` end without an EOS (at the budget); `reason`: the expected stop reason."""
  from apr_jax.engine.runner import Request
  model, tok, eng = setup
  m = Model(root, children)
  want = ref.apr_search(prompt, m, max_threads=max_threads)
  kids = [p for ps in want.child_prompts for p in ps]
  rank = {}
  script = {(): []}
  calls = {(): []}
  n_root = 0
  for is_root, prefix, c in m.served:
    toks = _tokens(tok, prefix, c, eos=not (is_root and n_root in no_eos))
    n_root += is_root
    if spell is not None and is_root:
      toks = spell(toks)
    if is_root:
      path = ()
    else:
      first = prefix.split("\n")[0]
      if first not in rank:
        rank[first] = len(rank)
      path = (rank[first],)
    script.setdefault(path, []).extend(toks)
    calls.setdefault(path, []).append((prefix, toks))
  res = eng.run([Request([tok.bos_id] + tok.encode(prompt), script=script,
                         max_thread_tokens=budget or 1500, max_total_tokens=12000,
                         max_threads=max_threads)])[0]
  assert res.stop_reason == (reason or ("malformed" if want.error else "stop")), (
      res.stop_reason, want.error)
  if want.calls[-1].startswith(prompt):
    assert res.text == want.calls[-1][len(prompt):]
  else:  # a spawn without a block opener: the original keeps no head
    assert res.text == want.calls[-1]
  threads = {tuple(t["path"]): t for t in res.threads}
  assert len(threads) == 1 + len(kids)
  for i, p in enumerate(kids):
    th = threads[(i,)]
    want_prompt = [tok.bos_id] + tok.encode(p)
    assert th["token_ids"][:len(want_prompt)] == want_prompt
    live = _live(th["token_ids"], th["positions"])
    body = [th["token_ids"][k] for k in live][1:]
    if body and body[-1] == tok.eos_id:
      body = body[:-1]
    assert _trim(tok.decode(body)) == [c for s in want.sub_calls for c in s][i]
  root, prompt_ids = threads[()], [tok.bos_id] + tok.encode(prompt)
  ids = prompt_ids + root["token_ids"]
  live = [ids[k] for k in _live(ids, list(range(len(prompt_ids))) + root["positions"])]
  if live[-1] == tok.eos_id:
    live = live[:-1]
  if spell is None:  # the context as the original's fresh tokenization gives it
    assert live[1:] in (tok.encode(want.calls[-1]), tok.encode(want.calls[-1] + "\n"))
    assert live[0] == tok.bos_id
  # the calls and children as the evaluation reads them from the result
  from apr_jax.evaluation.countdown import apr_device_texts
  calls, texts = apr_device_texts(res, tok, prompt)
  assert calls == want.calls and texts == [c for s in want.sub_calls for c in s]
  if check_logits:
    _check_logits(model, prompt_ids, res, threads)
  return want, res


def _check_logits(model, prompt_ids, res, threads):
  """Every sample's logits (recorded) equal a plain causal forward over the thread's live
  context before it (one forward per run of contexts that extend each other)."""
  worst, span = 0.0, 0.0
  for path, th in threads.items():
    got = res.logits[path]
    ids, pos = list(th["token_ids"]), list(th["positions"])
    lps = list(th["logprobs"])
    if path == ():  # the root's prompt is not in its ThreadInfo
      ids, pos = list(prompt_ids) + ids, list(range(len(prompt_ids))) + pos
      lps = [None] * len(prompt_ids) + lps
    samples = [k for k, lp in enumerate(lps) if lp is not None]
    assert len(samples) == len(got), (path, len(samples), len(got))
    groups = []  # [longest context, [(sample index, context length)]]
    for j, k in enumerate(samples):
      ctx = [ids[i] for i in _live(ids[:k], pos[:k])]
      if groups and ctx[:len(groups[-1][0])] == groups[-1][0]:
        groups[-1][0] = ctx
      else:
        groups.append([ctx, []])
      groups[-1][1].append((j, len(ctx)))
    for ctx, members in groups:
      lo = _forward(model, ctx)
      for j, n in members:
        worst = max(worst, float(np.abs(lo[n - 1] - got[j]).max()))
        span = max(span, float(lo[n - 1].max() - lo[n - 1].min()))
  assert span > 0.5 and worst <= 1e-4 * span, (worst, span)


def _forward(model, ids):
  """Logits [n, V] of a plain causal forward over `ids` (positions 0..n-1)."""
  import jax.numpy as jnp
  from tests.tree_fixtures import _fwd, bucket
  n = len(ids)
  b = bucket(n)
  x = np.zeros((1, b), np.int32)
  x[0, :n] = ids
  pos = np.arange(b, dtype=np.int32)[None, :]
  mask = np.tril(np.ones((b, b), bool))[None]
  out = _fwd()(model, jnp.asarray(x), jnp.asarray(pos), jnp.asarray(mask))
  return np.asarray(out[0, :n])


def _traces(n, seed):
  rng = random.Random(zlib.crc32(b"apr_device"))
  return [orig.solve_apr_original(p, rng) for p in cd.generate(cd.APR, n, seed=seed)]


def _script(t):
  """(root continuations, children's continuations) that make the reference search write
  trace t: each root call's text past its prefix, each child's past its prompt."""
  prefixes = [t.prompt]
  for k, kids in enumerate(t.children):
    call = _trim(t.calls[k])
    ids, _ = ref.apr_children(call)
    prefixes.append(ref.apr_join(call, ids, [ref.apr_search_result(_trim(c)) for c in kids]))
  root = [c[len(p):] for p, c in zip(prefixes, t.calls)]
  children = {}
  for prompts, kids in zip(t.child_prompts, t.children):
    for p, c in zip(prompts, kids):
      children[p.split("\n")[0]] = [c[len(p):]]
  return root, children


def test_original_traces_on_device_equal_the_reference(setup):
  tok = setup[1]
  n_kids = n_spawns = 0
  for t in _traces(13, seed=7):
    n = sum(map(len, t.child_prompts))
    if max(len(tok.encode(c)) for c in t.calls + [k for s in t.children for k in s]) > 1400:
      continue
    if len({p for ps in t.child_prompts for p in ps}) < n or n > 12:
      continue  # a child prompt twice (the scripted model could not tell them apart), or wide
    want, res = run_case(setup, t.prompt, *_script(t))
    assert want.error == "" and res.forks == len(t.children)
    n_spawns += len(t.children)
    n_kids += len(res.threads) - 1
  assert n_spawns >= 5 and n_kids >= 12


@pytest.fixture(scope="module")
def base():
  """A trace whose root spawns once (its first call's continuation ends with the block)."""
  t = _traces(2, seed=7)[1]
  assert len(t.children) == 1 and len(t.child_prompts[0]) == 2
  root, children = _script(t)
  assert root[0].rstrip("\n").endswith(ref.APR_END_CALLING)
  return t, root, children


def test_model_written_stop_string_is_replaced(setup, base):
  """The original cuts a call at `<Sub Searches>` and writes `<Calling Sub Searches>`: the
  row rewinds to the token holding the string's first byte (also when that token starts with
  a space, and in a child)."""
  t, root, children = base
  i = root[0].index(ref.APR_CALLING)
  tail = root[0][i + len(ref.APR_CALLING):]
  # at a line start, then after a space inside a line (the results block follows the space)
  for lead in ("", "Exploring more "):
    conts = [root[0][:i] + lead + ref.APR_STOP + "junk\n", tail] + root[1:]
    want, res = run_case(setup, t.prompt, conts, children, check_logits=lead == "")
    assert want.error == "" and res.forks == 1 and ref.APR_STOP in want.calls[1]
    assert (lead + ref.APR_CALLING) in want.calls[0]
  # a child: its text goes on after the replacement (before its summary path, and inside it:
  # the results block copies the replacement, not the rewound tokens)
  first = next(iter(children))
  c = children[first][0]
  goals = [k for k in range(len(c)) if c.startswith("Goal Reached", k)]
  assert len(goals) >= 2
  for j in (c.index("\nExploring") + 1, c.index("\n", goals[-2]) + 1):
    kid = dict(children)
    kid[first] = [c[:j] + ref.APR_STOP + "zz", "\n" + c[j:]]
    want, _ = run_case(setup, t.prompt, root, kid, check_logits=False)
    assert ref.APR_CALLING in want.sub_calls[0][0]
  assert ref.APR_CALLING in want.calls[-1]  # the second: inside the summary path


@pytest.mark.parametrize("case", ["unknown_node", "twice", "bad_node_line"])
def test_malformed_spawns_end_the_search(setup, base, case):
  t, root, children = base
  r0 = root[0]
  lines = [m for m in r0.split("\n") if m.startswith("<Start Sub Search")]
  if case == "unknown_node":
    r0 = r0.replace(lines[0], lines[0].rsplit("#", 1)[0] + "#0,9")
  elif case == "twice":
    r0 = r0.replace(lines[1], lines[1].rsplit("#", 1)[0] + "#" + lines[0].rsplit("#", 1)[1])
  else:
    r0 = r0.replace("Generated Node #0,0:", "Generated Node #0,0 -")
  want, res = run_case(setup, t.prompt, [r0], {}, check_logits=False)
  assert want.error and res.stop_reason == "malformed" and res.forks == 0


def test_spawn_edges(setup, base):
  """A block without spawn lines joins at once (an empty results block); a blank line after
  the block ends the search (no spawn); the tag spelled byte by byte still spawns; a call
  cut by its budget whose last line holds the tag spawns."""
  t, root, children = base
  tok = setup[1]
  r0 = root[0].rstrip("\n")
  head = r0[:r0.index(ref.APR_CALLING)]
  empty = head + ref.APR_CALLING + "\n" + ref.APR_END_CALLING + "\n"
  want, res = run_case(setup, t.prompt, [empty, "No solution found.\n"], {})
  assert want.error == "" and "<Sub Searches>\n<End Sub Searches>\nNo solution found." in want.calls[-1]
  assert res.forks == 1 and len(res.threads) == 1 and want.sub_calls == [[]]  # a spawn of none
  assert res.critical_path == res.total_tokens  # the join without children keeps the root's
  # a block without `<Calling Sub Searches>`: the original keeps no head (the prompt is gone)
  bare = head + r0[r0.index(ref.APR_CALLING) + len(ref.APR_CALLING) + 1:] + "\n"
  want, res = run_case(setup, t.prompt, [bare, "No solution found.\n"], children,
                       check_logits=False)
  assert want.calls[-1].startswith("<Sub Searches>\n") and res.forks == 1
  want, res = run_case(setup, t.prompt, [r0 + "\n\n"], {}, check_logits=False)
  assert len(want.calls) == 1 and res.forks == 0 and res.text == r0 + "\n"
  # `<End Calling Sub Searches>` written as byte tokens: the same text
  canon = tok.encode("a\n" + ref.APR_END_CALLING)[len(tok.encode("a\n")):]
  assert len(canon) > 3
  bytes_ = [tok.token_id(f"<0x{b:02X}>") for b in ref.APR_END_CALLING.encode()]

  spelled = []

  def spell(toks):
    for k in range(len(toks)):
      if toks[k:k + len(canon)] == canon:
        spelled.append(k)
        return toks[:k] + bytes_ + toks[k + len(canon):]
    return toks
  want, res = run_case(setup, t.prompt, root, children, spell=spell, check_logits=False)
  assert want.error == "" and res.forks == 1 and len(res.threads) == 3 and len(spelled) == 1
  # the first call ends at its budget (no EOS) with the tag in its last line
  n0 = len(_tokens(tok, t.prompt, empty, eos=False))
  want, res = run_case(setup, t.prompt, [empty, "No solution found.\n"], {}, budget=n0,
                       no_eos={0}, check_logits=False)
  assert want.error == "" and res.forks == 1 and "<End Sub Searches>" in res.text


def test_thread_budget_takes_the_first_children(setup, base):
  """max_threads (the engine's budget, the root included): a spawn gets its first children
  that fit; with none left, an empty results block (the reference's `max_threads`)."""
  t, root, children = base
  for k in (2, 1):
    want, res = run_case(setup, t.prompt, root, children, max_threads=k, check_logits=False)
    assert want.error == "" and len(want.sub_calls[0]) == k - 1 and len(res.threads) == k
