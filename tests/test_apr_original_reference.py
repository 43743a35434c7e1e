"""The APR original protocol's text-level reference (`protocols.reference.apr_search`): a
scripted model that writes the original solver's traces (`tasks.countdown.original`) is
searched exactly as the original's calls record it (every child with its prompt, every
results block), and the malformed cases end the way the original's loop ends them."""
import random
import zlib

import pytest

from apr_jax.protocols import reference as ref
from apr_jax.tasks import countdown as cd
from apr_jax.tasks.countdown import original as orig
from tests import original_scorers as scorers


def _trim(text):
  return text[:-1] if text.split("\n")[-1] == "" else text


class Scripted:
  """A model that continues any prefix of a text it knows with the rest of that text (then
  EOS). The root's calls are told apart by their results blocks (a model never writes one:
  a continuation that holds one belongs to a later call); children by prompt."""

  def __init__(self, texts):
    self.texts = list(texts)
    self.seen = []

  def __call__(self, prefix):
    self.seen.append(prefix)
    hits = {t[len(prefix):] for t in self.texts
            if t.startswith(prefix) and "<End Sub Searches>" not in t[len(prefix):]}
    assert len(hits) == 1, (prefix, hits)
    return hits.pop()

  def batch(self, prefixes):
    return [self(p) for p in prefixes]


def test_original_traces_are_searched_as_the_original_records_them():
  rng = random.Random(zlib.crc32(b"apr_original_reference"))
  n_children = n_spawns = n_solved = checked = 0
  for p in cd.generate(cd.APR, 200, seed=11):
    t = orig.solve_apr_original(p, rng)
    kids = [c for spawn in t.children for c in spawn]
    if len(set(c for spawn in t.child_prompts for c in spawn)) < len(kids):
      continue  # two children with one prompt: the scripted model could not tell them apart
    model = Scripted(t.calls + kids)
    s = ref.apr_search(t.prompt, model)
    assert s.error == ""
    assert s.calls == [_trim(c) for c in t.calls]
    assert s.child_prompts == t.child_prompts
    assert s.sub_calls == [[_trim(c) for c in spawn] for spawn in t.children]
    assert s.result == scorers.get_search_result(_trim(t.calls[-1]))
    assert scorers.check_solution(t.prompt, s.result) == t.solved
    n_children += len(kids)
    n_spawns += len(t.children)
    n_solved += t.solved
    checked += 1
  assert checked >= 190 and n_spawns >= 100 and n_children >= 400 and n_solved >= 60


def test_searches_in_lockstep_equal_one_at_a_time():
  rng = random.Random(zlib.crc32(b"apr_lockstep"))
  traces = [orig.solve_apr_original(p, rng) for p in cd.generate(cd.APR, 30, seed=12)]
  texts = [x for t in traces for x in t.calls + [c for spawn in t.children for c in spawn]]
  batches = []
  model = Scripted(texts)

  def batch(prefixes):
    batches.append(len(prefixes))
    return model.batch(prefixes)

  many = ref.apr_search_many([t.prompt for t in traces], batch)
  ones = [ref.apr_search(t.prompt, Scripted(texts)) for t in traces]
  assert many == ones
  assert len(batches) < sum(len(s.calls) + len(s.sub_calls) for s in ones) / 3


PROMPT = "Moving to Node #0\nCurrent State: 39:[51, 49, 25, 36], Operations: []"
ROOT = ("\nExploring Operation: 51-49=2, Resulting Numbers: [25, 36, 2]\n"
        "Generated Node #0,0: 39:[25, 36, 2] Operation: 51-49=2\n"
        "Exploring Operation: 36-25=11, Resulting Numbers: [51, 49, 11]\n"
        "Generated Node #0,1: 39:[51, 49, 11] Operation: 36-25=11\n")
SPAWN = ("<Calling Sub Searches>\n<Start Sub Search 0 at level 1> Moving to Node #0,0\n"
         "<Start Sub Search 1 at level 1> Moving to Node #0,1\n<End Calling Sub Searches>\n")


def test_child_prompts_results_block_and_the_stop_string():
  goal = ("Moving to Node #0,0\nCurrent State: 39:[25, 36, 2], Operations: ['51-49=2']\n"
          "Exploring Operation: 36+2=38, Resulting Numbers: [25, 38]\n"
          "39,39 equal: Goal Reached\nSUMMARY 39,39 equal: Goal Reached\n")
  calls = []

  def model(prefix):
    calls.append(prefix)
    if prefix == PROMPT:  # writes `<Sub Searches>` where it means to call: replaced, continued
      return ROOT + "<Sub Searches>\nignored"
    if prefix == PROMPT + ROOT + "<Calling Sub Searches>":
      return SPAWN[len("<Calling Sub Searches>"):]
    if prefix.startswith("Moving to Node #0,0\n"):
      return goal[len(prefix):]
    if prefix.startswith("Moving to Node #0,1\n"):
      return "\nNo solution here\n"
    assert prefix.endswith("<End Sub Searches>\n"), prefix
    return "done, Goal Reached\nfinal path, Goal Reached\n"

  s = ref.apr_search(PROMPT, model)
  assert s.child_prompts == [[
      "Moving to Node #0,0\nCurrent State: 39:[25, 36, 2], Operations: ['51-49=2']",
      "Moving to Node #0,1\nCurrent State: 39:[51, 49, 11], Operations: ['36-25=11']"]]
  assert calls[-1] == (PROMPT + ROOT + "<Sub Searches>\n"
                      "<Goal Reached in Sub Search 0 at level 1 at Node #0,0>\n"
                      "SUMMARY 39,39 equal: Goal Reached\n"
                      "<No Solution in Sub Search 1 at level 1 at Node #0,1>\n<End Sub Searches>\n")
  assert s.calls[0] == PROMPT + ROOT + _trim(SPAWN) and len(s.calls) == 2
  assert s.result == "final path, Goal Reached"


@pytest.mark.parametrize("bad,why", [
    (SPAWN.replace("#0,1\n<End", "#0,7\n<End"), "never generated"),        # an invented node
    (SPAWN, "parent #0,3 was never visited"),                              # an orphan node line
    (SPAWN.replace("#0,1\n<End", "#0,0\n<End"), "twice"),                  # one node, two children
    (SPAWN.replace("Node #0,1\n<End", "Node 0,1\n<End"), "names no node"),  # no '#'
])
def test_a_malformed_spawn_block_ends_the_search_unsolved(bad, why):
  root = ROOT + "Generated Node #0,3,1: 39:[2] Operation: 1+1=2\n" if "parent" in why else ROOT
  s = ref.apr_search(PROMPT, lambda prefix: root + bad if prefix == PROMPT else "")
  assert why in s.error and s.result is None and len(s.calls) == 1 and not s.sub_calls


def test_a_spawn_needs_its_end_tag_on_the_last_line():
  # the end tag followed by more text: no spawn, the call is the whole search
  s = ref.apr_search(PROMPT, lambda prefix: ROOT + SPAWN + "more\n" if prefix == PROMPT else "x")
  assert not s.sub_calls and s.calls == [PROMPT + ROOT + SPAWN + "more"]
  # two newlines after it: the last line is empty even after one is dropped
  s = ref.apr_search(PROMPT, lambda prefix: ROOT + SPAWN + "\n" if prefix == PROMPT else "x")
  assert not s.sub_calls
