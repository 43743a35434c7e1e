"""Text tags over the token stream (`protocols.textmatch`): the on-device automaton equals a
plain string search of the decoded text, for every spelling of a tag."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from apr_jax.errors import UserError
from apr_jax.protocols.textmatch import TextMatcher, reference_hits

TAGS = ("<End Calling Sub Searches>", "<Sub Searches>", "aa", "abab")


def _run(m: TextMatcher, ids):
  """The matcher over one stream, step by step under jit: hits [len(ids), n_tags]."""
  step = jax.jit(m.advance)
  s, out = m.init(), []
  for t in ids:
    s, h = step(s, jnp.asarray(t))
    out.append(np.asarray(h))
  return np.array(out).reshape(len(ids), len(m.tags))


def _check(m, texts, ids):
  got = _run(m, ids)
  for k, tag in enumerate(m.tags):
    assert got[:, k].tolist() == reference_hits(tag, texts, ids), (tag, [texts[i] for i in ids])


# a hand-made vocabulary in which the tag has many spellings
VOCAB = ["<", "End", " Calling", " Sub", " Searches", ">", "<End", " Calling Sub", " Searches>",
         "\n", "\n<", "x", " ", "<End Calling Sub Searches>", ">\n<Sub", "a", "b", "ab", "aab",
         "", "\ufffd", " Sub Searches>"]


def _ids(*pieces):
  return [VOCAB.index(p) for p in pieces]


def test_a_tag_spelled_by_different_token_sequences_is_found_in_each():
  m = TextMatcher.build(TAGS, VOCAB)
  spellings = [  # (ids, the token the tag ends in)
      (_ids("x", "\n<", "End", " Calling", " Sub", " Searches", ">"), 6),  # after a newline
      (_ids("x", " ", "<End", " Calling Sub", " Searches>"), 4),            # after a space
      (_ids("x", "<End Calling Sub Searches>", "\n"), 1),                   # one piece
      (_ids("<End", " Calling Sub", " Searches", ">\n<Sub", " Searches>"), 3),  # two tags
      (_ids("<", "", "End", " Calling", "", " Sub Searches>"), 5),         # empty pieces between
  ]
  for ids, end in spellings:
    assert np.flatnonzero(_run(m, ids)[:, 0]).tolist() == [end], ids
    _check(m, VOCAB, ids)
  # the second tag starts inside the piece that ends the first one
  assert np.flatnonzero(_run(m, spellings[3][0])[:, 1]).tolist() == [4]


def test_overlapping_and_repeated_occurrences_match_the_string_search():
  m = TextMatcher.build(TAGS, VOCAB)
  rng = np.random.default_rng(0)
  for _ in range(200):
    ids = rng.integers(0, len(VOCAB), rng.integers(1, 30)).tolist()
    _check(m, VOCAB, ids)
  _check(m, VOCAB, _ids("aab", "ab", "a", "b", "ab", "ab", "aab"))  # "aa" and "abab" overlap


def test_batched_advance_keeps_rows_that_wrote_nothing():
  m = TextMatcher.build(TAGS, VOCAB)
  rows = [_ids("<End", " Calling Sub", " Searches>"), _ids("a", "a", "x")]
  s = m.init((2,))
  hits = []
  for t in range(3):
    valid = jnp.array([True, t != 1])
    tok = jnp.array([rows[0][t], rows[1][t]])
    s, h = jax.jit(m.advance)(s, tok, valid)
    hits.append(np.asarray(h))
  # row 1 skipped its second token: its text is "a" + "x", no "aa"
  assert [bool(h[0, 0]) for h in hits] == [False, False, True]
  assert not any(bool(h[1, 2]) for h in hits)


def test_tags_found_in_a_trained_tokenizers_streams(tmp_path):
  """A sentencepiece BPE trained on the original APR traces (no tags added): the matcher
  finds a tag in each of its spellings, and every occurrence the decoded calls hold."""
  from apr_jax.tasks import countdown as cd
  from apr_jax.tasks.countdown import data
  from apr_jax.tasks.countdown import original as orig
  train, _ = cd.splits(cd.SMALL, 40, 1, seed=3)
  tok = data.train_tokenizer(data.texts_for_tokenizer(train, cd.SMALL, "apr_original"),
                             str(tmp_path), 400, tags=())
  texts = tok.token_texts()
  m = TextMatcher.build(TAGS[:2], texts)
  tag = TAGS[0]
  # the model may sample any spelling: the canonical one, or the tag cut anywhere and each
  # part encoded on its own (a piece boundary inside a word, single characters)
  spellings = {tuple(tok.encode(tag[:c]) + tok.encode(tag[c:])) for c in range(1, len(tag))}
  spellings.add(tuple(i for ch in tag for i in tok.encode(ch)))
  assert len(spellings) >= 5
  for sp in sorted(spellings):
    ids = tok.encode("Node #0,1\n") + list(sp) + tok.encode("\n")
    hits = _run(m, ids)[:, 0]
    assert np.flatnonzero(hits).tolist() == [len(ids) - 2], [texts[i] for i in ids]
  n_found = 0
  for p in train[:10]:
    t = orig.solve_apr_original(p, data.original_rng(p))
    for call in t.calls:
      ids = tok.encode(call)
      assert tok.decode(ids) == call
      hits = _run(m, ids)
      for k, tg in enumerate(m.tags):
        want = reference_hits(tg, texts, ids)
        assert hits[:, k].tolist() == want
        assert sum(want) == call.count(tg)
        n_found += sum(want)
  assert n_found >= 5


def test_bad_tags_are_clear_errors():
  with pytest.raises(UserError, match="empty"):
    TextMatcher.build(["x", ""], VOCAB)
  with pytest.raises(UserError, match="at least one"):
    TextMatcher.build([], VOCAB)
