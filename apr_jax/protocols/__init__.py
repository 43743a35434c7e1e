"""Fork/join protocols as data.

A `Protocol` is a small, hashable description (token ids only) that one generic on-device
state machine (`apr_jax.engine.tree`) executes (docs/protocols.md). The three families:

- ThreadWeaver: `</Outlines>` forks one thread per distinct outline number since the last
  `<Outlines>` (`protocols.outlines`); each thread shares the parent's context and is forced
  `\\n<Thread>\\n{number}:`; it ends at
  `</Thread>`; the join re-prefills the threads flat, in order, at sequential positions,
  adjacent (`</Thread><Thread>`: later threads without their leading newline), then `\\n`
  (join = "flat"). A thread that ended at EOS or a budget gets `\\n</Thread>` (its EOS left
  out), the block is closed with `\\n</Parallel>` and the request ends, as the original
  agent loop does. One nesting level.
- Multiverse: `</Goal>` forks one path per distinct outline number since `<Goal>`; paths
  share the context and all start at the same position, forced `\\n<Path>\\n{number}:`; they end at `</Path>`; the join keeps every path's KV where it was written
  (join = "stitch", no recompute) and forces `<Conclusion>\\n` at max(child end positions).
  Nesting depth <= 5.
- APR, single-token variant (`apr_tok`): `<End Calling Sub Searches>` forks one child per
  `<Sub Search>` line since
  `<Calling Sub Searches>`; a child starts from a fresh context (BOS + the text of its spawn
  line, copied on device) and runs to EOS; the join drops the spawn block from the parent and
  inserts a results block (join = "results"): `<Sub Searches>`, each child's text from its
  last `<Goal Reached>` / `<No Solution>` tag, `<End Sub Searches>`. One level.

`apr` names APR as its released checkpoints run: plain-text tags in the model's own
vocabulary, read as text on device; an EOS after `<End Calling Sub Searches>` forks, child
prompts and the results block are spliced from token spans (`protocols.apr_text`).

The single-token variants, chosen before the text tags were read on device:
tags are single tokens (added special tokens, or sentencepiece user-defined symbols); a
thread's label is spelled with digit and '.' tokens; APR's spawn line carries the child's whole prompt
(`<Sub Search> Moving to Node #0,1 Current State: ...`) instead of a node id that would
need a task-specific rewrite, and its tags are single tokens rather than
`<Start Sub Search i at level 1>` text.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from apr_jax.errors import UserError
from apr_jax.protocols import outlines
from apr_jax.protocols.outlines import OutlineReader

JOIN_MODES = ("stitch", "flat", "results")

THREADWEAVER_TAGS = ("<Think>", "</Think>", "<Parallel>", "</Parallel>", "<Outlines>", "</Outlines>",
                     "<Outline>", "</Outline>", "<Thread>", "</Thread>", "<Conclusion>",
                     "</Conclusion>")
MULTIVERSE_TAGS = ("<Think>", "</Think>", "<Parallel>", "</Parallel>", "<Goal>", "</Goal>",
                   "<Outline>", "</Outline>", "<Path>", "</Path>", "<Conclusion>", "</Conclusion>")
APR_TAGS = ("<Calling Sub Searches>", "<Sub Search>", "<End Calling Sub Searches>", "<Sub Searches>",
            "<End Sub Searches>", "<Goal Reached>", "<No Solution>")
TAGS = {"none": (), "threadweaver": THREADWEAVER_TAGS, "multiverse": MULTIVERSE_TAGS,
        "apr_tok": APR_TAGS}
# every protocol name `run --protocol` takes; "apr" is the original APR (plain-text tags, the
# original's orchestration of calls), the others are `Protocol`s built here
NAMES = ("none", "threadweaver", "multiverse", "apr", "apr_tok")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """What the state machine needs, as token ids. `fork == -1`: the protocol never forks."""
  name: str = "none"
  fork: int = -1                  # trigger: written by a thread, then its children start
  open: int = -1                  # starts a block: resets the child count, marks the block
  count: int = -1                 # one child per occurrence after `open`
  child_pre: tuple = ()           # forced at the start of each child, before its label
  child_post: tuple = ()          # forced after the label
  digits: tuple = ()              # ids of '0'..'9' to spell labels; () = no label
  label_sep: tuple = ()           # between the parent's label and a nested child's number
  context: str = "shared"         # "shared": child sees the parent's context; "fresh": own only
  child_stop: tuple = ()          # a child ends after writing one of these (EOS always does)
  child_close: tuple = ()         # forced when a child ends without a stop token (budget)
  join: str = "stitch"            # "stitch" | "flat" | "results"
  after_join: tuple = ()          # forced into the parent after the join
  join_skip_first: bool = False   # flat join: children after the first leave out their first
                                  # forced token (ThreadWeaver's `</Thread><Thread>`)
  malformed_close: tuple = ()     # flat join: if a child ended without its stop tag (EOS, a
                                  # budget), its EOS is replaced by child_close, these tokens
                                  # close the block instead of after_join and the parent ends
  results_open: tuple = ()        # results join: the block's opening tokens
  results_close: tuple = ()
  result_tags: tuple = ()         # results join: a child's result starts at its last such tag
  no_result: tuple = ()           # results join: used for a child that wrote no result tag
  goal: tuple = ()                # race joins: a child writing one of these has reached the goal
  max_depth: int = 1              # children of a thread at depth >= max_depth are not created
  outline: OutlineReader | None = None  # set: children are the distinct outline numbers
                                  # of the block (`protocols.outlines`), each labelled by its
                                  # number; else one child per `count` tag, labelled 1, 2, ...
  text: object = None             # the original APR's text protocol (`protocols.apr_text.
                                  # AprText`): an EOS after `<End Calling Sub Searches>` forks
                                  # one child per spawn line, prompts and results spliced

  def __post_init__(self):
    if self.context not in ("shared", "fresh"):
      raise UserError(f"protocol context must be shared or fresh, got {self.context!r}")
    if self.join not in JOIN_MODES:
      raise UserError(f"protocol join must be one of {JOIN_MODES}, got {self.join!r}")
    if self.fork >= 0 and self.join == "stitch" and not self.after_join:
      raise UserError("a stitch join needs after_join tokens (the parent resumes by reading them)")
    if (self.join_skip_first or self.malformed_close) and self.join != "flat":
      raise UserError("join_skip_first and malformed_close apply to flat joins only")
    if self.digits and len(self.digits) != 10:
      raise UserError("digits must list the ids of '0'..'9'")
    if self.outline is not None and (self.context != "shared" or self.outline.count != self.count):
      raise UserError("outline numbers label shared-context children announced by the count tag")

  @property
  def forks(self) -> bool:
    return self.fork >= 0

  def label(self, parent_label: Sequence[int], i: int) -> list[int]:
    """Label tokens of child number i (1-based) of a parent with `parent_label`."""
    if not self.digits:
      return []
    own = [self.digits[int(c)] for c in str(i)]
    return (list(parent_label) + list(self.label_sep) + own) if parent_label else own


def _single(tok, text: str) -> int:
  ids = tok.encode(text)
  if len(ids) != 1:
    raise UserError(f"the tokenizer spells {text!r} as {len(ids)} tokens; the protocol needs one")
  return ids[0]


def _tag(tok, tag: str) -> int:
  i = tok.token_id(tag)
  if i is None:
    raise UserError(f"the tokenizer has no {tag!r} token; add the protocol tags first "
                    f"(apr_jax.model.vocab.add_tokens; `run --protocol` adds them itself)")
  return i


def _seq(tok, parts) -> tuple:
  """parts: tags (looked up as single tokens) or plain text (encoded)."""
  out = []
  for p in parts:
    out += [_tag(tok, p)] if p.startswith("<") and p.endswith(">") else tok.encode(p)
  return tuple(out)


def build(name: str, tok) -> Protocol:
  """The named protocol for a tokenizer that already has the protocol's tags."""
  if name == "none":
    return Protocol()
  if name == "apr":
    return build_apr(tok)
  if name not in TAGS:
    raise UserError(f"unknown protocol {name!r}; choose from {', '.join(NAMES)}")
  digits = tuple(_single(tok, str(d)) for d in range(10))
  if name == "apr_tok":
    return _build_apr_tok(tok)
  sep = _seq(tok, ["."])
  outline = outlines.reader(tok.token_texts(), _tag(tok, "<Outline>"), digits, sep)
  if name == "threadweaver":
    pr = Protocol(
        name=name, fork=_tag(tok, "</Outlines>"), open=_tag(tok, "<Outlines>"),
        count=_tag(tok, "<Outline>"), child_pre=_seq(tok, ["\n", "<Thread>", "\n"]),
        child_post=_seq(tok, [":"]), digits=digits, label_sep=sep, context="shared",
        child_stop=(_tag(tok, "</Thread>"),), child_close=_seq(tok, ["\n", "</Thread>"]),
        join="flat", after_join=_seq(tok, ["\n"]), join_skip_first=True,
        malformed_close=_seq(tok, ["\n", "</Parallel>"]), max_depth=1, outline=outline)
  else:
    pr = Protocol(
        name=name, fork=_tag(tok, "</Goal>"), open=_tag(tok, "<Goal>"), count=_tag(tok, "<Outline>"),
        child_pre=_seq(tok, ["\n", "<Path>", "\n"]), child_post=_seq(tok, [":"]), digits=digits,
        label_sep=sep, context="shared", child_stop=(_tag(tok, "</Path>"),),
        child_close=_seq(tok, ["\n", "</Path>"]), join="stitch",
        after_join=_seq(tok, ["<Conclusion>", "\n"]), max_depth=5, outline=outline)
  _check_headers(pr, tok, "<Thread>" if name == "threadweaver" else "<Path>")
  return pr


def _check_headers(pr: Protocol, tok, tag: str):
  """A child's header is spelled on device (child_pre, the label's digit and '.' tokens,
  child_post); the originals encode its text. Both must give the same tokens."""
  for label in ("1", "12", "2.1", "10.3.4"):
    spelled = list(pr.child_pre) + [t for c in label for t in (
        pr.label_sep if c == "." else (pr.digits[int(c)],))] + list(pr.child_post)
    text = f"\n{tag}\n{label}:"
    if tok.encode(text) != spelled:
      raise UserError(f"this tokenizer spells the thread header {text!r} as {tok.encode(text)}, "
                      f"not as its pieces {spelled}; the {pr.name} protocol needs a tokenizer "
                      "that splits digits, '.' and ':' (as Qwen, Llama and SmolLM2 do)")


def build_apr(tok) -> Protocol:
  """The original APR (plain-text tags in the model's own vocabulary) on device: the EOS a
  thread writes after a line holding `<End Calling Sub Searches>` forks one fresh-context
  child per `<Start Sub Search i at level 1> Moving to Node #id` line of its block, each
  prompted with its node rebuilt from the parent's `Generated Node #id` line; the join
  replaces the block by the original results block (`protocols.apr_text`). Refused
  (UserError) for a tokenizer whose splices would not give its fresh encodings."""
  from apr_jax.protocols import apr_text
  if tok.eos_id is None:
    raise UserError("the APR protocol forks at an EOS: the tokenizer has none")
  return Protocol(name="apr", fork=tok.eos_id, context="fresh", child_stop=tuple(tok.stop_ids()),
                  join="results", max_depth=1, text=apr_text.build(tok))


def _build_apr_tok(tok):
  bos = () if tok.bos_id is None else (tok.bos_id,)
  return Protocol(
      name="apr_tok", fork=_tag(tok, "<End Calling Sub Searches>"), open=_tag(tok, "<Calling Sub Searches>"),
      count=_tag(tok, "<Sub Search>"), child_pre=bos, context="fresh", child_stop=tuple(tok.stop_ids()),
      child_close=(), join="results", results_open=_seq(tok, ["<Sub Searches>"]),
      results_close=_seq(tok, ["<End Sub Searches>", "\n"]),
      result_tags=(_tag(tok, "<Goal Reached>"), _tag(tok, "<No Solution>")),
      no_result=(_tag(tok, "<No Solution>"), *_seq(tok, ["\n"])),
      goal=(_tag(tok, "<Goal Reached>"),), max_depth=1)
