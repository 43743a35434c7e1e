"""Reference scorers for tests: a fresh stdlib-only re-implementation of the original projects' scoring
(APR: src/eval/parallel_infernce_utils.py, src/countdown_utils.py, src/data/generate_apr.py; ThreadWeaver:
threadweaver_rl/deepscaler/rewards/math_rewardv2.py, data_generation/src/filter-format-correct-and-
obtain-stats.py). Same verdicts as the originals, quirks included (noted per function); raises where the
original raises on malformed input."""
import ast
import operator
import os
import re
from collections import Counter

# ----------------------------------------------------------------- APR: strict check (eval_apr.py)

_PREFIX_STATE = re.compile(r"Current State:\s*(\d+):\[(.*?)\]")
_STRICT_STEP = re.compile(
    r"Exploring Operation:\s*([\d]+)([\+\-\*/])([\d]+)=(\d+),\s*Resulting Numbers:\s*\[(.*?)\]")
GOAL = "Goal Reached"
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def _int_list(s: str) -> list[int]:  # "5, 50" -> [5, 50]; "" -> []; garbage raises, as there
  return [int(x.strip()) for x in s.split(",")] if s.strip() else []


def apr_prefix(target: int, nums) -> str:
  """The root prompt eval_apr.get_prefix builds, and passes to check_solution as `prefix`."""
  return f"Moving to Node #0\nCurrent State: {target}:{list(nums)}, Operations: []"


def check_solution(prefix: str, solution: str | None) -> bool:
  """APR check_solution; None -> False (as eval_apr). Target/numbers: first "Current State: T:[..]" in
  prefix. Each solution line matching "Exploring Operation: XoY=Z, Resulting Numbers: [..]" is replayed:
  X, Y removed once each from the current multiset, XoY == Z ('/' is true division: 6/3=2 passes, 7/2=3
  and Y=0 fail), current - {X,Y} + Z == stated list as sorted multisets; the stated list becomes current.
  The first line containing "Goal Reached" decides: current == [target]; none -> False.
  Quirks: X, Y are looked up by value anywhere in the list, so b+a / b*a pass like a+b / a*b; Current
  State and Generated Node lines are ignored; lines not matching (e.g. a swapped subtraction's negative
  result, spaces around the operator) are skipped silently."""
  if solution is None or not (m := _PREFIX_STATE.search(prefix)):
    return False
  target, current = int(m.group(1)), _int_list(m.group(2))
  for line in solution.splitlines():
    if step := _STRICT_STEP.search(line := line.strip()):
      x, op, y, z = int(step.group(1)), step.group(2), int(step.group(3)), int(step.group(4))
      stated = _int_list(step.group(5))
      have, used = Counter(current), Counter((x, y))
      if (used - have or (op == "/" and y == 0) or _OPS[op](x, y) != z
          or have - used + Counter((z,)) != Counter(stated)):
        return False
      current = stated
    if GOAL in line:
      return current == [target]
  return False


def get_search_result(trace: str) -> str | None:
  """APR get_search_result: None unless "Goal Reached" occurs twice or more (anywhere, "<Goal Reached in
  Sub Search ..>" too); else from the second-to-last occurrence, stripped, minus 13 characters
  (meant as "Goal Reached\\n", whatever they are)."""
  if trace.count(GOAL) < 2:
    return None
  idx = trace.rfind(GOAL, 0, trace.rfind(GOAL))  # occurrences cannot overlap
  return trace[idx:].strip()[13:]


def strict_correct(prefix: str, trace: str) -> bool:
  """eval_apr's "true success": check_solution(prefix, get_search_result(final main-call trace))."""
  return check_solution(prefix, get_search_result(trace))


# ------------------------------------------------------- APR: lenient rating (countdown_utils.py)

_FIRST_STATE = re.compile(r"Current State: (\d+):\[(.*?)\]")
_GOAL_LINE = re.compile(r"\d+,\d+ equal: Goal Reached")
_EXPLORE = re.compile(r"Exploring Operation: (.*?=\d+), Resulting Numbers: \[(.*?)\]")
_STATE_OPS = re.compile(r"Current State: \d+:\[.*?\], Operations: \[(.*?)\]")
_MAX_NODES = {2: 4, 3: 48, 4: 1152, 5: 46080}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}


def _arith(src: str):
  """The original's eval(src) for arithmetic, without eval: like eval, drop leading spaces/tabs and
  parse with the same compiler (same SyntaxError messages); int/float literals, unary +/-, + - * / // %
  and parentheses use Python's operators (same values and ZeroDivisionError messages). Anything else
  (names, calls, **, strings) raises ValueError("unsupported expression") where the original would run
  it as Python: the one place this module can disagree with the original."""
  def ev(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
      return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in (ast.UAdd, ast.USub):
      return ev(node.operand) if isinstance(node.op, ast.UAdd) else -ev(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
      left = ev(node.left)  # left first, as Python evaluates
      return _BINOPS[type(node.op)](left, ev(node.right))
    raise ValueError("unsupported expression")
  return ev(compile(src.lstrip(" \t"), "<string>", "eval", ast.PyCF_ONLY_AST).body)


def _parse_trajectory(path: str) -> str:
  """countdown_utils.parse_trajectory (its `mode` is unused): the rating string."""
  if (start := path.find("Current State")) == -1:
    return "Invalid input: Cannot find the initial state."
  path = path[start:]
  if not (m := _FIRST_STATE.match(path.strip().split("\n")[0])):
    return "Invalid input: Cannot find the initial state in the first line."
  target, nums = int(m.group(1)), [int(n) for n in m.group(2).split(", ")]  # "[]" raises, as there
  if not (goals := list(_GOAL_LINE.finditer(path))):
    return "No goal reached statement found."
  before = path[:goals[-1].start()]  # everything before the LAST "a,b equal: Goal Reached"
  if not (explored := _EXPLORE.findall(before)):
    return "No operations found leading to the goal."
  final = explored[-1][0]  # last explored operation before that goal line
  try:
    claimed = int(final.split("=")[1])
  except Exception:
    return "Couldnt parse last op"
  if claimed != target:
    return "Invalid path: Final operation does not result in target."
  if len(pieces := before.split("Goal Reached\n")) < 2:
    return "Invalid path: no summarized answer."
  # Text between the first and second "Goal Reached\n" (the summary path): its last Current State's
  # Operations list plus the final operation are checked. IndexError if it has none, as there.
  listed = _STATE_OPS.findall(pieces[1])[-1].split(", ")
  steps = [s.replace("'", "") for s in listed] + [final]  # "[]" gives [""] -> "Could not split"
  available = list(nums)
  for step in steps:
    if len(parts := step.split("=")) != 2:
      return "Could not split operation into lhs, rhs"
    left, right = parts
    try:
      if _arith(left) != int(right):
        return f"Invalid operation: {step}"
    except Exception as e:
      return f"Error in evaluating operation {step}: {e}"
    for n in re.findall(r"\d+", left):
      if int(n) not in available:
        return f"Invalid operation: {step}, number {n} not available in {available}"
    # Quirk: the original removes used numbers with `n not in used_numbers` where used_numbers are
    # strings, so nothing is ever removed: numbers may be reused, and any earlier result stays usable.
    available.append(int(right))
  return "Valid path."


def metric_fn(trace: str, mode: str = "sft") -> tuple[float, str]:
  """countdown_utils.metric_fn (eval_sosp passes mode="sft"; mode changes nothing). If the rating is
  "Valid path.": max(1 - simple_rating / max_nodes, 0), simple_rating = 1 + #"Exploring Operation" in the
  text from the first "Current State" (whole search, not the summary), max_nodes 4/48/1152/46080 for
  2/3/4/5 numbers (others raise: KeyError here, UnboundLocalError there); else (0.0, rating).
  Lenient: numbers may be reused; only the summary (last Operations list + final operation) is checked."""
  rating = _parse_trajectory(trace)
  if rating != "Valid path.":
    return 0.0, rating
  path = trace[trace.find("Current State"):]
  first = path.strip().split("\n")[0]
  if "->" in first:
    first = first.split("->")[1]
  n_nums = len(_FIRST_STATE.match(first).group(2).split(", "))
  return max(1.0 - (path.count("Exploring Operation") + 1) / _MAX_NODES[n_nums], 0.0), rating


# ------------------------------------------------------------ APR: token accounting (generate_apr.py)

ROOT = "Moving to Node #0\n"


def add_all_calls(trace_dict: dict) -> list[str]:
  """add_all_calls: main_calls, then each sub-call trace_dict recursively, in order."""
  out = list(trace_dict["main_calls"])
  for group in trace_dict.get("sub_calls", []):
    for sub in group:
      out += add_all_calls(sub)
  return out


def llama2_counters(n_body):
  """(seq_tokens, prefix_tokens) for the original's HF Llama-2 tokenizer, from n_body(text) = tokens of
  text alone. encode("<s>" + seq + "</s>") adds its own BOS and parses the literal <s>, </s> as BOS/EOS:
  2 BOS + 1 EOS = n_body + 3. A shared prefix counts len(encode(prefix)) - 2 ("subtract BOS/EOS"), but
  encode adds only a BOS, so n_body - 1: one real token too few is deducted per adjacent root pair.
  (Assumes text tokenizes the same alone as between special tokens: Llama-2 normalizes each segment.)"""
  return (lambda s: n_body(s) + 3), (lambda s: n_body(s) + 1)


def token_counts(calls: list[str], sub_calls: list[str], seq_tokens, prefix_tokens) -> dict:
  """generate_apr.calculate_token_counts over seqs = calls + sub_calls (in add_all_calls order: main
  calls, then sub calls). seq_tokens(s) = len(tokenizer.encode(bos + s + eos)), a call with BOS/EOS as
  the original counts it; prefix_tokens(p) = len(tokenizer.encode(p)), a bare prefix (see llama2_counters).
  Roots: seqs starting "Moving to Node #0\\n" (re-classified, whichever list held them), stably sorted by
  length; each adjacent pair deducts max(0, prefix_tokens(common character prefix) - 2).
  token_count = sum(seq_tokens) - deductions, longest_seq_token_count = max, avg_seq_token_count =
  token_count / len(seqs), avg_sub_seq_token_count = mean over non-roots (0 if none), sub_call_count =
  #non-roots / (#roots - 1) (ZeroDivisionError for one root with subs, as there). One seq: all its count.
  (eval_apr.calculate_tokens differs: roots by `in`, average over #subs + 1, no sub stats.)"""
  seqs = [*calls, *sub_calls]
  if len(seqs) <= 1:
    n = seq_tokens(seqs[0])
    return dict(token_count=n, longest_seq_token_count=n, avg_seq_token_count=n,
                avg_sub_seq_token_count=0, sub_call_count=0)
  roots = sorted((s for s in seqs if s.startswith(ROOT)), key=len)
  subs = [s for s in seqs if not s.startswith(ROOT)]
  sub_call_count = len(subs) / (len(roots) - 1)
  lens, sub_lens = [seq_tokens(s) for s in seqs], [seq_tokens(s) for s in subs]
  shared = (os.path.commonprefix([a, b]) for a, b in zip(roots, roots[1:]))
  count = sum(lens) - sum(max(0, prefix_tokens(p) - 2) for p in shared if p)
  return dict(token_count=count, longest_seq_token_count=max(lens),
              avg_seq_token_count=count / len(seqs),
              avg_sub_seq_token_count=sum(sub_lens) / len(sub_lens) if sub_lens else 0,
              sub_call_count=sub_call_count)


# --------------------------------------------------------------- ThreadWeaver: get_parallel_stats

_PAR_TAGS = re.compile(r"(<Parallel>|</Parallel>|<Thread>|</Thread>)")


def _stats(items) -> dict:
  """get_parallel_stats' one-pass state machine over items: a tag string (one token) or an int n
  (n ordinary tokens; all that matters for them is where they fall)."""
  outside = blocks_seq = blocks_par = 0
  in_par = in_thread = False
  blk_seq, threads, cur = 0, [], 0
  n_par, per_block = 0, []

  def close():
    nonlocal blocks_seq, blocks_par
    blocks_seq += blk_seq + sum(threads)
    blocks_par += blk_seq + max(threads, default=0)
    per_block.append(len(threads))

  for it in items:
    n = 1 if isinstance(it, str) else it
    if not in_par:  # outside blocks everything is sequential; <Parallel> opens a block
      outside += n
      if it == "<Parallel>":
        n_par, in_par, in_thread, blk_seq, threads, cur = n_par + 1, True, False, 0, [], 0
    elif it == "</Parallel>" and not in_thread:  # closes only outside a thread; counts as outside
      close()
      outside, in_par = outside + 1, False
    elif it == "<Thread>" and not in_thread:  # wrapper counts as the block's sequential part
      in_thread, cur, blk_seq = True, 0, blk_seq + 1
    elif it == "</Thread>" and in_thread:
      in_thread, blk_seq = False, blk_seq + 1
      threads.append(cur)
    elif in_thread:  # nested <Thread>, </Parallel>, <Parallel>: literal thread content
      cur += n
    else:  # stray </Thread>, nested <Parallel>, text between threads: sequential in the block
      blk_seq += n
  if in_par:  # unterminated block (and thread) at EOF is flushed as if closed, no </Parallel> counted
    if in_thread:
      threads.append(cur)
    close()
  total = outside + blocks_seq
  longest = outside + blocks_par
  return {"total_num_tokens": total, "num_tokens_in_the_longest_thread": longest,
          "with_parallel": n_par > 0, "parallel_count": n_par,
          "parallel_ratio": blocks_seq / total if total > 0 else 0.0,
          "acceleration_ratio": 1 - longest / total if total > 0 else 0.0,
          "avg_tokens_per_parallel_block": blocks_seq / len(per_block) if per_block else 0.0,
          "thread_counts_per_block": sum(per_block) / len(per_block) if per_block else 0,  # a mean
          "parallel_format_correct": True, "parallel_format_correct_v2": True}  # constants there too


def parallel_stats(text: str, count_tokens) -> dict:
  """ThreadWeaver get_parallel_stats, keys as there. The original walks the token ids of the WHOLE
  response (encode(text, add_special_tokens=False), or the sampled ids in RL), looking only at the ids
  of <Parallel> </Parallel> <Thread> </Thread>. Here the text is split at those four tags (1 token each)
  and count_tokens(span) counts each span between: the same when the tags are single added tokens that
  the tokenizer splits on first (HF does). Other tags (<Outline>...) are plain tokens inside spans."""
  return _stats(p if p in ("<Parallel>", "</Parallel>", "<Thread>", "</Thread>") else count_tokens(p)
                for p in _PAR_TAGS.split(text) if p)


def parallel_stats_ids(ids, special_ids: dict) -> dict:
  """Same on token ids; special_ids maps the four tag strings to their (distinct) ids, as there."""
  tag_of = {special_ids[t]: t for t in ("</Thread>", "<Thread>", "</Parallel>", "<Parallel>")}
  return _stats(tag_of.get(i, 1) for i in ids)


# ----------------------------------------------------- ThreadWeaver: is_parallel_format_correct_v2

_BLOCK = re.compile(r"<Parallel>(.*?)</Parallel>", re.DOTALL)
_ANY_TAG = re.compile(r"<(/?)(\w+)>")
_HEAD = r"^\s*<Outlines>(?P<outlines>.*?)</Outlines>\s*(?P<threads>(?:<Thread>.*?</Thread>)+)\s*"
_WITH_CONCL = re.compile(_HEAD + r"<Conclusion>(?P<conclusion>.*?)</Conclusion>\s*$", re.DOTALL)
_NO_CONCL = re.compile(_HEAD + r"$", re.DOTALL)
_NUMBERED = re.compile(r"^\s*(\d+):\s*(.+)$", re.DOTALL)


def _number(body: str) -> int | None:
  """n of an outline/thread body "n: text" (checked on the stripped body); None if malformed or tagged."""
  num = _NUMBERED.match(body.strip())
  return None if _ANY_TAG.search(body) or not num else int(num.group(1))


def format_correct_v2(text: str, *, treat_no_parallel_as_format_error: bool = False,
                      allow_nonempty_whitespace: bool = False, skip_conclusion_check: bool = False) -> bool:
  """is_parallel_format_correct_v2, verbose prints dropped. Defaults: the function's own (the first flag
  has none; callers pass False, the RL server example True); ThreadWeaver's data filter (step5.sh) runs
  allow_nonempty_whitespace=True, skip_conclusion_check=True. No <Parallel> at all passes unless
  treat_no_parallel_as_format_error. Each lazy <Parallel>..</Parallel> block: no nested Parallel; only
  Outlines/Outline/Thread/Conclusion tags (checked case-insensitively, counted case-sensitively);
  #Outline == #Thread, opens == closes, one Conclusion unless skipped, <= 50 outlines; ^Outlines Thread+
  Conclusion$ (no Conclusion allowed when skipped; several pass when skipped, the lazy .*? spans them);
  outlines/threads "n: text", tag-free, numbered 1..k; allow_nonempty_whitespace=False allows NOTHING,
  not even whitespace, between </Thread><Thread>; conclusion (unless skipped) non-empty, tag-free.
  Text outside blocks is not checked."""
  if not ("<Parallel>" in text and "</Parallel>" in text) and treat_no_parallel_as_format_error:
    return False
  if text.count("<Parallel>") != text.count("</Parallel>"):
    return False
  for bm in _BLOCK.finditer(text):
    block = bm.group(1)
    if "<Parallel>" in block or "</Parallel>" in block:
      return False
    if any(name.lower() not in ("outlines", "outline", "thread", "conclusion")
           for _, name in _ANY_TAG.findall(block)):
      return False
    n_ol, n_th, n_co = block.count("<Outline>"), block.count("<Thread>"), block.count("<Conclusion>")
    if (n_ol != n_th or n_ol != block.count("</Outline>") or n_th != block.count("</Thread>")
        or n_co != block.count("</Conclusion>") or (not skip_conclusion_check and n_co != 1) or n_ol > 50):
      return False
    m = (_WITH_CONCL if n_co > 0 else _NO_CONCL).match(block)
    if not m:
      return False
    outlines = [_number(b) for b in re.findall(r"<Outline>(.*?)</Outline>", m.group("outlines"), re.DOTALL)]
    threads_text = m.group("threads")
    threads = list(re.finditer(r"<Thread>(.*?)</Thread>", threads_text, re.DOTALL))
    # outlines numbered 1..k, and the threads numbered the same (so also k of them)
    if not outlines or outlines != list(range(1, len(outlines) + 1)):
      return False
    if [_number(t.group(1)) for t in threads] != outlines:
      return False
    if not allow_nonempty_whitespace and any(
        threads_text[a.end():b.start()] != "" for a, b in zip(threads, threads[1:])):
      return False
    if not skip_conclusion_check:
      concl = m.group("conclusion").strip()
      if not concl or _ANY_TAG.search(concl):
        return False
  return True
