"""Why a thread or a request stopped: one vocabulary for `TreeEngine` and `Generator`,
and its mapping onto the OpenAI API's `finish_reason` (docs/engine.md)."""
from __future__ import annotations

import enum


class StopReason(enum.IntEnum):
  """Why a thread or a request stopped: one vocabulary for `TreeEngine` and `Generator`."""
  NONE = 0           # still running
  STOP = 1           # wrote a stop token (a child: its close tag)
  BUDGET = 2         # a child at its max_thread_tokens or the critical path (closed by the engine)
  CANCELLED = 3      # a sibling reached the goal first (race)
  TOTAL_BUDGET = 4   # the request's max_total_tokens
  OUT_OF_MEMORY = 5  # KV slots, token log or a forced queue ran out
  DEADLINE = 6       # the request's deadline_s passed
  PRUNED = 7         # trailed its best sibling's mean log-prob (pruning)
  LENGTH = 8         # the root at its max_thread_tokens or the critical path
  CONTEXT = 9        # a thread reached the model's context length
  MALFORMED = 10     # a spawn the protocol cannot read (the original APR's search ends)

  @property
  def label(self) -> str:
    """The name reported in results ("" for NONE)."""
    return "" if self is StopReason.NONE else self.name.lower()

  @property
  def finish_reason(self) -> str:
    """OpenAI's `finish_reason`, always one of its values: "stop" where the text ended by
    itself (a stop token; a thread cancelled because a sibling won, or pruned: its search
    is over), "length" where the output was cut (a token, time, memory or context budget)."""
    return FINISH_REASONS[self]


FINISH_REASONS = {
    StopReason.NONE: "", StopReason.STOP: "stop", StopReason.BUDGET: "length",
    StopReason.CANCELLED: "stop", StopReason.TOTAL_BUDGET: "length",
    StopReason.OUT_OF_MEMORY: "length", StopReason.DEADLINE: "length",
    StopReason.PRUNED: "stop", StopReason.LENGTH: "length", StopReason.CONTEXT: "length",
    StopReason.MALFORMED: "stop"}
REASONS = tuple(r.label for r in StopReason)


def finish_reason(label: str) -> str:
  """OpenAI's finish_reason for a reported stop reason (`StopReason.label`)."""
  return StopReason[label.upper()].finish_reason if label else ""
