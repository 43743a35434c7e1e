"""The original APR rebuilds a child's prompt as text and tokenizes it afresh. An on-device
version can only copy token spans of the parent's context and add fixed tokens. With a
Llama-2-style sentencepiece tokenizer (as in test_original_checkpoints), this checks that a
splice gives exactly the original's tokens for every child prompt of the original solver's
traces. The splice copies the node id, the state without its closing `]` (that `]` merges
with the comma after it), the parent's operations and the new operation, and puts constant
glue between them. A plain copy of the spans does not give them."""
import random
import re
import zlib

import pytest

from apr_jax.tasks import countdown as cd
from apr_jax.tasks.countdown import original as orig

spm = pytest.importorskip("sentencepiece")


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
  d = tmp_path_factory.mktemp("spm")
  rng = random.Random(zlib.crc32(b"apr_checkpoint"))
  lines = []
  for p in cd.generate(cd.APR, 40, seed=3):
    t = orig.solve_apr_original(p, rng)
    lines += [x for c in t.calls + [k for s in t.children for k in s] for x in c.split("\n")]
  (d / "corpus.txt").write_text("\n".join(lines))
  spm.SentencePieceTrainer.train(
      input=str(d / "corpus.txt"), model_prefix=str(d / "tok"), vocab_size=400, model_type="bpe",
      split_digits=True, byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
      normalization_rule_name="identity", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
  return spm.SentencePieceProcessor(model_file=str(d / "tok.model"))


def _spans(sp, text):
  """[(id, start, end)]: each token's characters in `text` (the dummy prefix at 0)."""
  out, pos = [], 0
  for i in sp.encode(text):
    piece = sp.id_to_piece(i)
    n = 1 if piece.startswith("<0x") else len(piece.replace("\u2581", " "))
    if pos == 0 and piece.startswith("\u2581") and not text.startswith(" "):
      n -= 1
    out.append((i, pos, pos + n))
    pos += n
  assert pos == len(text)
  return out


def _copy(spans, a, b):
  """The tokens covering text[a:b] exactly; None where a or b falls inside a token."""
  if a not in {s for _, s, _ in spans} or b not in {e for _, _, e in spans}:
    return None
  return [i for i, s, e in spans if s >= a and e <= b]


def test_child_prompts_are_token_splices_of_the_parent(sp):
  rng = random.Random(zlib.crc32(b"apr_splices"))
  glue, n, plain = {}, 0, 0
  for p in cd.generate(cd.APR, 60, seed=11):
    t = orig.solve_apr_original(p, rng)
    for k, prompts in enumerate(t.child_prompts):
      parent = t.calls[k]
      spans = _spans(sp, parent)
      for prompt in prompts:
        m = re.fullmatch(r"Moving to Node #([\d,]+)\nCurrent State: (\d+:\[[^\]]*\]), "
                         r"Operations: \[(.*)\]", prompt)
        nid, ops = m.group(1), m.group(3)
        g = re.search(f"Generated Node #{re.escape(nid)}: " + r"(\d+:\[[^\]]*\]) Operation: (\S+)\n",
                      parent)
        at = g.start() + len("Generated Node #")
        node, state, op = (_copy(spans, at, at + len(nid)), _copy(spans, *g.span(1)),
                           _copy(spans, *g.span(2)))
        assert state[-1] == sp.piece_to_id("]")
        earlier = []
        if ops.count("'") > 2:  # a deeper node: the parent's operations come first
          prev = ops[:ops.rindex(", '")]
          q = parent.rfind(f"Operations: [{prev}]", 0, g.start())
          assert q >= 0
          start = q + len("Operations: [") + 1
          earlier = _copy(spans, start, start + len(prev) - 2)
          assert earlier is not None
        # the fixed tokens: what the fresh tokenization has between the copied spans
        enc, pos, parts = sp.encode(prompt), 0, []
        for piece in (node, state[:-1], earlier, op):
          j = next(j for j in range(pos, len(enc) - len(piece) + 1) if enc[j:j + len(piece)] == piece)
          parts.append(tuple(enc[pos:j]))
          pos = j + len(piece)
        parts.append(tuple(enc[pos:]))
        key = (bool(earlier), tuple(parts))
        glue[key] = glue.get(key, 0) + 1
        spliced = [*parts[0], *node, *parts[1], *state[:-1], *parts[2], *earlier, *parts[3], *op,
                   *parts[4]]
        assert spliced == enc
        # the state copied whole (its `]` included) is never what the original tokens hold
        plain += any(enc[j:j + len(state)] == state for j in range(len(enc)))
        n += 1
  assert n > 200
  # one constant glue per shape (single operation / with the parent's operations): the
  # fixed tokens do not depend on the node
  assert sorted(k[0] for k in glue) == [False, True], glue.keys()
  assert plain == 0


def _text(sp, ids) -> str:
  """The text of token ids as they read inside a sequence (no dummy-prefix stripping)."""
  out = ""
  for i in ids:
    piece = sp.id_to_piece(i)
    out += chr(int(piece[3:5], 16)) if piece.startswith("<0x") else piece.replace("\u2581", " ")
  return out


def test_results_blocks_are_token_splices_of_the_parent_and_children(sp):
  """The join: the original replaces the parent's spawn block by the results block and
  tokenizes the new call afresh. Spliced on device from the parent's tokens before the block,
  each child's number spelled with digit tokens, its node id copied from the spawn line, its
  summary path copied from the child's tokens, and fixed text between them whose tokens
  depend only on that text, it gives exactly the original's tokens."""
  from apr_jax.protocols import reference
  rng = random.Random(zlib.crc32(b"apr_joins"))
  fixed, n = {}, 0
  for p in cd.generate(cd.APR, 60, seed=12):
    t = orig.solve_apr_original(p, rng)
    for k, kids in enumerate(t.children):
      if not kids:
        continue
      spawn, after = t.calls[k], t.calls[k + 1]
      before = spawn[:spawn.rindex(reference.APR_CALLING + "\n")]
      ctx = after[:after.index(orig.RESULTS_END, len(before)) + len(orig.RESULTS_END)]
      lines = re.findall(r"<Start Sub Search (\d+) at level 1> Moving to Node #([\d,]+)\n",
                         spawn[len(before):])
      results = [reference.apr_search_result(text) for text in kids]
      assert ctx == reference.apr_join(spawn, [node for _, node in lines], results)
      spans = _spans(sp, spawn)
      pieces = [_copy(spans, 0, len(before))]
      block = len(before)
      for (i, node), text, res in zip(lines, kids, results):
        at = spawn.index(f"<Start Sub Search {i} at level 1> Moving to Node #{node}\n", block)
        at += len(f"<Start Sub Search {i} at level 1> Moving to Node #")
        pieces += [[sp.piece_to_id(d) for d in i], _copy(spans, at, at + len(node))]
        if res is not None:
          kid = _spans(sp, text)
          start = text.rindex(res)
          pieces.append(_copy(kid, start, start + len(res)))
      assert all(x is not None for x in pieces)
      enc, pos, spliced = sp.encode(ctx), 0, []
      for piece in pieces:
        j = next(j for j in range(pos, len(enc) - len(piece) + 1) if enc[j:j + len(piece)] == piece)
        glue = tuple(enc[pos:j])
        fixed.setdefault(_text(sp, glue), set()).add(glue)
        spliced += [*glue, *piece]
        pos = j + len(piece)
      fixed.setdefault(_text(sp, enc[pos:]), set()).add(tuple(enc[pos:]))
      spliced += enc[pos:]
      assert spliced == enc
      n += len(kids)
  assert n > 150
  # each fixed text has one spelling, whatever it sits between
  assert all(len(v) == 1 for v in fixed.values()), {k: v for k, v in fixed.items() if len(v) > 1}
  assert " at level 1 at Node #" in fixed and ">\n<End Sub Searches>\n" in fixed
