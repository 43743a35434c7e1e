"""Countdown as the original APR repository writes and scores it: the original SoS+ and APR
trace formats, the target-first generator, and apr_jax's verifier against an independent
re-implementation of the original scorers (`tests/original_scorers.py`)."""
import random
import re
import zlib

import pytest

from apr_jax.errors import UserError
from apr_jax.evaluation import accounting
from apr_jax.tasks import countdown as cd
from apr_jax.tasks.countdown import original as orig
from tests import original_scorers as scorers


def _problems(n, seed=0):
  return cd.generate(cd.APR, n, seed=seed)


def _sos_traces(n, seed=0):
  rng = random.Random(zlib.crc32(b"sos_original") + seed)
  out = []
  for p in _problems(n, seed):
    prompt, completion, solved = orig.solve_sos_original(p, rng)
    out.append((p, prompt, prompt + completion, solved))
  return out


def test_target_first_draw_matches_the_original_distribution():
  """The original draws the target uniformly first: targets 90..100 are 11/91 = 12.1% of the
  problems; drawing numbers and target together favours reachable (small) targets."""
  first = cd.generate(cd.Setting(draw="target_first"), 4000, seed=0)
  joint = cd.generate(cd.SMALL, 4000, seed=0)
  high = lambda ps: sum(p.target >= 90 for p in ps) / len(ps)
  assert 0.105 <= high(first) <= 0.137
  assert high(joint) < 0.08
  assert cd.APR.draw == "target_first" and cd.SMALL.draw == "joint"
  # the joint draw is the one the shipped models' splits were made with: unchanged
  assert cd.generate(cd.SMALL, 3, seed=3) == [cd.Problem((23, 16, 18), 80), cd.Problem((2, 10, 25), 13),
                                                cd.Problem((12, 26, 3), 62)]
  with pytest.raises(UserError, match="draw"):
    cd.Setting(draw="nums_first")


def test_sos_original_traces_have_the_original_shape():
  traces = _sos_traces(60)
  widths = set()
  for p, prompt, text, solved in traces:
    assert prompt == f"Current State: {p.target}:{list(p.nums)}, Operations: []"
    if solved:
      path = re.sub(r"(\nExit Sub Search at level \d+)+$", "", cd.summary_path(text))  # as the original
      assert path.startswith("Moving to Node #0\n") and path.endswith(f"{p.target},{p.target} equal: Goal Reached")
    else:
      assert "Goal Reached" not in text and text.rstrip().endswith("No solution found.")
    widths.add(max(len(re.findall(r"Generated Node #0,\d+:", text)), 1))
  assert len(widths) >= 3  # the beam width is drawn per trace
  assert 0.3 < sum(t[3] for t in traces) / len(traces) < 0.9
  assert any("Start Sub Search at level 1: Moving to Node" in t[2] for t in traces)
  # reproducible from the seed
  assert [t[2] for t in _sos_traces(5)] == [t[2] for t in traces[:5]]


def test_verifier_agrees_with_the_original_strict_scorer():
  """200 sos_original traces read as written: apr_jax's verifier and the original
  `check_solution(prompt, get_search_result(trace))` agree on at least 98% of them, and the
  verifier accepts at least 95% of those the original accepts."""
  traces = _sos_traces(200, seed=1)
  ours = [cd.verify(p, text, check_lines=False)[0] for p, _, text, _ in traces]
  theirs = [scorers.strict_correct(prompt, text) for _, prompt, text, _ in traces]
  agree = sum(a == b for a, b in zip(ours, theirs)) / len(traces)
  accepted = [a for a, b in zip(ours, theirs) if b]
  assert sum(theirs) >= 60
  assert agree >= 0.98 and sum(accepted) / len(accepted) >= 0.95
  # the solver's own claim, and every line of the trace checks out too
  assert ours == [t[3] for t in traces]
  assert all(cd.verify(p, text)[0] == solved for p, _, text, solved in traces)
  # traces written with the smaller operand first are right (the old verifier rejected them)
  smaller_first = lambda text: any(int(a) < int(b) for a, b in
                                   re.findall(r"Exploring Operation: (\d+)[+*](\d+)=", text))
  assert sum(smaller_first(t[2]) for t in traces if t[3]) >= 20


def _solved_sos(seed=2):
  return next(t for t in _sos_traces(40, seed=seed) if t[3] and t[2].endswith("Goal Reached\n"))


CORRUPTIONS = {
    # the summary path uses a number that is not there
    "invented number": (r"(Moving to Node #0\nCurrent State: \d+:\[[^\]]*\], Operations: \[\]\n"
                        r"Exploring Operation: )(\d+)", lambda m: m[1] + str(int(m[2]) + 1)),
    # the summary's last operation claims the target with wrong arithmetic
    "wrong arithmetic": (r"Exploring Operation: (\d+)([-+*/])(\d+)=(\d+), Resulting Numbers: \[(\d+)\]\n"
                         r"(\d+),\6 equal: Goal Reached\n?$",
                         lambda m: f"Exploring Operation: {m[1]}{m[2]}{int(m[3]) + 1}={m[4]}, Resulting "
                                   f"Numbers: [{m[5]}]\n{m[6]},{m[6]} equal: Goal Reached\n"),
    # the summary path is cut before its goal line
    "truncated summary": (r"\d+,\d+ equal: Goal Reached\n?$", lambda m: ""),
    # no summary at all: one goal claim only
    "no summary": (r"(Goal Reached\n)Moving to Node #0\n[\s\S]*$", lambda m: m[1]),
    # resulting numbers that do not follow
    "wrong resulting numbers": (r"(Moving to Node #0\nCurrent State: [^\n]*\nExploring Operation: [^,]*, "
                                r"Resulting Numbers: \[)(\d+)", lambda m: m[1] + str(int(m[2]) + 2)),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_verifier_and_the_original_reject_corrupted_answers(name):
  p, prompt, text, _ = _solved_sos()
  assert cd.verify(p, text)[0] and scorers.strict_correct(prompt, text)
  pattern, repl = CORRUPTIONS[name]
  bad, n = re.subn(pattern, repl, text, count=1)
  assert n == 1, name
  assert not cd.verify(p, bad, check_lines=False)[0]
  assert not scorers.strict_correct(prompt, bad)


def _line_corruptions(p, text):
  """Corruptions of search lines that a full check (`check_lines=True`) must reject."""
  target = p.target
  m = re.search(r"Exploring Operation: (\d+)\+(\d+)=(\d+)", text)
  yield "wrong sum", text.replace(m[0], f"Exploring Operation: {m[1]}+{m[2]}={int(m[3]) + 1}", 1)
  m = re.search(r"Exploring Operation: (\d+)([-+*/])(\d+)=", text)
  yield "reused number", text.replace(m[0], f"Exploring Operation: {m[1]}{m[2]}{m[1]}=", 1)
  m = re.search(r"Exploring Operation: (\d+)([-+*/])(\d+)=", text)
  yield "invented number", text.replace(m[0], f"Exploring Operation: {int(m[1]) + 100}{m[2]}{m[3]}=", 1)
  m = re.search(rf"(\d+),{target} unequal: No Solution", text)
  if m:
    yield "false goal claim", text.replace(m[0], f"{m[1]},{target} equal: Goal Reached", 1)
  m = re.search(r"Generated Node (#[0-9,]+): (\d+):\[(\d+)", text)
  yield "wrong node state", text.replace(m[0], f"Generated Node {m[1]}: {m[2]}:[{int(m[3]) + 1}", 1)
  yield "wrong target", text.replace(f"Current State: {target}:", f"Current State: {target + 1}:", 1)


def test_full_check_rejects_corrupted_search_lines():
  p, _, text, _ = next(t for t in _sos_traces(60, seed=3)
                       if t[3] and "unequal" in t[2] and re.search(r"Operation: \d+\+\d+=", t[2]))
  names = []
  for name, bad in _line_corruptions(p, text):
    assert bad != text, name
    assert not cd.verify(p, bad)[0], name
    names.append(name)
  assert len(names) == 6
  assert len(names) + len(CORRUPTIONS) >= 10


def test_apr_original_traces_spawn_and_join_as_the_original():
  rng = random.Random(zlib.crc32(b"apr_original"))
  n_spawn = n_solved = 0
  for p in _problems(60, seed=4):
    t = orig.solve_apr_original(p, rng)
    assert t.calls[0].startswith(t.prompt) and t.prompt.startswith("Moving to Node #0\nCurrent State: ")
    for k, (texts, prompts) in enumerate(zip(t.children, t.child_prompts)):
      n_spawn += 1
      spawn = t.calls[k]
      assert spawn.endswith("<End Calling Sub Searches>\n")
      block = spawn[spawn.rindex("<Calling Sub Searches>\n"):]
      ids = re.findall(r"<Start Sub Search (\d+) at level 1> Moving to Node (#[0-9,]+)", block)
      assert [int(i) for i, _ in ids] == list(range(len(texts)))
      for (_, node), cp, text in zip(ids, prompts, texts):
        # the child's prompt is rebuilt from the parent's own Generated Node line
        gen = re.search(rf"Generated Node {node}: (\d+):\[([^\]]*)\] Operation: (\S+)", spawn)
        assert gen, node
        assert cp.startswith(f"Moving to Node {node}\nCurrent State: {gen[1]}:[{gen[2]}], Operations: [")
        assert cp.endswith(f"'{gen[3]}']") and text.startswith(cp)
      nxt = t.calls[k + 1]
      assert nxt.startswith(spawn[:spawn.rindex("<Calling Sub Searches>\n")] + "<Sub Searches>\n")
      assert "<End Sub Searches>\n" in nxt
    n_solved += t.solved
    texts = [t.calls[-1]] + [c for spawn in t.children for c in spawn]
    assert cd.verify(p, texts)[0] == t.solved
    assert scorers.strict_correct(t.prompt, t.calls[-1]) == t.solved
  assert n_spawn >= 30 and n_solved >= 20


def _n_tokens(s):
  """A simple stand-in tokenizer: words, digits runs, punctuation and whitespace each count."""
  return len(re.findall(r"\w+|[^\w\s]|\s", s))


def test_apr_accounting_matches_the_original_definition():
  """`accounting.apr_root_calls` recovers the root's calls from the text apr_jax renders
  (spawn block, then the results block that replaced it); `apr_token_counts` equals the
  independent re-implementation of `calculate_token_counts` with BOS/EOS counted once."""
  rng = random.Random(zlib.crc32(b"apr_accounting"))
  checked = 0
  for p in _problems(40, seed=5):
    t = orig.solve_apr_original(p, rng)
    rendered = t.calls[0]
    for prev, call in zip(t.calls, t.calls[1:]):
      kept = prev[:prev.rindex("<Calling Sub Searches>")]
      assert call.startswith(kept)
      rendered += call[len(kept):]
    assert accounting.apr_root_calls(rendered) == t.calls
    subs = [c for spawn in t.children for c in spawn]
    ours = accounting.apr_token_counts(t.calls, subs, _n_tokens)
    if len(t.calls) + len(subs) > 1 and len(t.calls) > 1:
      ref = scorers.token_counts(t.calls, subs, lambda s: _n_tokens(s) + 2, lambda s: _n_tokens(s) + 2)
      assert ours == {k: ref[k] for k in ours}
      checked += 1
    # every child prompt and spawn block adds to what the root's final call holds
    assert ours["token_count"] >= _n_tokens(t.calls[-1]) + 2 + sum(_n_tokens(c) + 2 for c in subs)
  assert checked >= 20


def test_threadweaver_critical_path_matches_get_parallel_stats():
  """`accounting.threadweaver_stats` on random token streams (well-formed blocks, unfinished
  ones, stray tags) equals the independent re-implementation of `get_parallel_stats`."""
  P, EP, T, ET = 100, 101, 102, 103
  rng = random.Random(zlib.crc32(b"parallel_stats"))
  for _ in range(300):
    ids = []
    for _ in range(rng.randint(0, 3)):
      ids += [5] * rng.randint(0, 4) + [P] + [6] * rng.randint(0, 3)
      for _ in range(rng.randint(0, 4)):
        ids += [T] + [7] * rng.randint(0, 9) + [ET]
      ids += [8] * rng.randint(0, 2) + [EP]
    for _ in range(rng.randint(0, 3)):  # corruption: drop, or insert a stray tag
      if ids and rng.random() < 0.5:
        del ids[rng.randrange(len(ids))]
      else:
        ids.insert(rng.randint(0, len(ids)), rng.choice([P, EP, T, ET]))
    ours = accounting.threadweaver_stats(ids, P, EP, T, ET)
    ref = scorers.parallel_stats_ids(ids, {"<Parallel>": P, "</Parallel>": EP, "<Thread>": T,
                                           "</Thread>": ET})
    assert ours == {"total_tokens": ref["total_num_tokens"],
                    "critical_path": ref["num_tokens_in_the_longest_thread"]}, ids


def test_sos_original_format_trains_and_evaluates_as_written(tmp_path):
  """`format="sos_original"`: a tokenizer trained on its traces round-trips them, the
  training trajectories are the original solver's text (a fixed stream per problem), the
  evaluation prompt is the original's, and the verifier reads its answers."""
  from apr_jax.protocols import reference
  from apr_jax.tasks.countdown import data
  train, _ = cd.splits(cd.SMALL, 60, 1, seed=3)
  tok = data.train_tokenizer(data.texts_for_tokenizer(train, cd.SMALL, "sos_original"),
                             str(tmp_path), 400)
  pr = data.protocol_for("sos_original", tok)
  assert not pr.forks
  n_solved = 0
  for p in train[:30]:
    prompt, scripts, solved = data.encode(tok, "sos_original", p)
    again = data.encode(tok, "sos_original", p)
    assert (prompt, scripts) == again[:2]                      # the same trace every run
    assert prompt == [tok.bos_id] + tok.encode(orig.sos_prompt(p))
    assert tok.decode(prompt[1:]) == data.prompt_text("sos_original", p)
    text = tok.decode(prompt[1:] + scripts[()][:-1])
    assert scripts[()][-1] == tok.eos_id
    want = orig.solve_sos_original(p, data.original_rng(p))
    assert text == want[0] + want[1]
    assert cd.verify(p, [text])[0] == solved
    trace = reference.simulate(pr, prompt, scripts, eos_ids=(tok.eos_id,))
    assert [e[0] for e in trace.final_context] == prompt + scripts[()]
    n_solved += solved
  assert n_solved >= 10
  with pytest.raises(UserError, match="unknown Countdown format"):
    data.encode(tok, "sos_orig", train[0])


def test_apr_original_format_trains_every_call_as_the_original_sends_it(tmp_path):
  """`format="apr_original"`: a tokenizer with no tags; one sequence per call (the root's
  calls, then every child), each the context the original orchestration gives the call
  (BOS + the prompt, the reference's join of the previous call with its children's results,
  or the child prompt) and what the model writes + EOS."""
  from apr_jax.protocols import reference
  from apr_jax.tasks.countdown import data
  train, _ = cd.splits(cd.SMALL, 60, 1, seed=3)
  tok = data.train_tokenizer(data.texts_for_tokenizer(train, cd.SMALL, "apr_original"),
                             str(tmp_path), 400, tags=data.tags_for("apr_original"))
  assert tok.token_id("<Calling Sub Searches>") is None and tok.token_id("<Sub Search>") is None
  assert not data.protocol_for("apr_original", tok).forks
  n_spawns = 0
  for p in train[:30]:
    seqs, solved = data.sequences(tok, "apr_original", p)
    assert data.sequences(tok, "apr_original", p) == (seqs, solved)  # a fixed trace per problem
    t = orig.solve_apr_original(p, data.original_rng(p))
    kids = [k for spawn in t.children for k in spawn]
    assert solved == t.solved and len(seqs) == len(t.calls) + len(kids)
    texts = [tok.decode(prompt[1:] + s[()][:-1]) for prompt, s in seqs]
    assert texts == t.calls + kids
    assert all(prompt[0] == tok.bos_id and s[()][-1] == tok.eos_id for prompt, s in seqs)
    assert seqs[0][0] == [tok.bos_id] + tok.encode(data.prompt_text("apr_original", p))
    for k, (spawn, prompts) in enumerate(zip(t.children, t.child_prompts)):
      n_spawns += 1
      ids = [cp.split("\n")[0].split("#")[1] for cp in prompts]
      joined = reference.apr_join(t.calls[k], ids, [reference.apr_search_result(c) for c in spawn])
      assert tok.decode(seqs[k + 1][0][1:]) == joined
      assert reference.apr_children(t.calls[k]) == (ids, prompts)
  assert n_spawns >= 10
  with pytest.raises(UserError, match="one sequence per call"):
    data.encode(tok, "apr_original", train[0])


def test_apr_original_checkpoint_trains_and_evaluates_through_the_original_calls(tmp_path):
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, APR_JAX_CACHE_DIR="off", PYTHONPATH=root)
  env.pop("XLA_FLAGS", None)
  run = lambda *a: subprocess.run([sys.executable, "-m", *a], capture_output=True, text=True,
                                  cwd=root, env=env, timeout=900)
  work = tmp_path / "w"
  p = run("apr_jax.train", "--config", "configs/countdown_small_sos.py", f"--config.workdir={work}",
          "--config.format=apr_original", "--config.n_train=40", "--config.train.steps=2",
          "--config.train.log_every=1", "--config.seq_len=512")
  assert p.returncode == 0, p.stderr
  assert "apr_original trajectories" in p.stderr
  from apr_jax import checkpoint
  _, tok = checkpoint.load(str(work / "model"))
  assert tok.token_id("<End Calling Sub Searches>") is None
  # engine "tree" in the config: eval sees the checkpoint's format and runs the original protocol
  # (on device: its tokenizer holds newline as a symbol, as the protocol needs)
  p = run("apr_jax.eval", "--config", "configs/eval_apr_original.py",
          f"--config.methods.apr.path={work / 'model'}", "--config.methods.apr.engine=tree",
          "--config.setting=small", "--config.max_call_tokens=24", "--config.batch=2",
          "--config.lanes=1", "--config.slots=2048",
          "--num_problems", "2", "--out", str(tmp_path / "e"))
  assert p.returncode == 0, p.stderr
  m = json.load(open(tmp_path / "e" / "results.json"))["methods"]["apr"]
  assert m["engine"] == "apr_device" and m["problems"] == 2 and m["total_tokens_mean"] > 0
  p = run("apr_jax.run", "--task", "countdown", "--model", str(work / "model"))
  assert p.returncode == 2 and "--protocol apr and" in p.stderr and "Traceback" not in p.stderr
