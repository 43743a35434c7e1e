"""The fork/join engine: a tree KV cache and one compiled decode loop for every thread of
every request.

Layout. The device batch is `lanes` lanes x `rows` thread rows. A lane holds up to
`requests` requests that share its rows (the threads of every request in the lane are
scheduled onto one pool of rows), its thread table, its token log and its pool of `slots` KV
slots (per layer [lanes, kv_heads, slots, head_dim]). A token's KV is written once, into any
free slot, with its owner thread and its position. A thread sees slot s iff
`vis[thread, owner[s]]` (itself and, for shared contexts, its ancestors: never another
request's threads) and `pos[s] <= its position`. So

- the prompt and every ancestor token are stored once; a child never copies its prefix;
- fork = new entries in the thread table (taken from its free entries) and `vis` rows; no KV
  moves;
- stitch join (Multiverse) = relabel the children's slots to the parent: O(slots) integer
  work, no recompute, the paths keep their positions;
- flat join (ThreadWeaver) = free the children's slots and queue their tokens (gathered from
  the lane's token log on device) for re-prefill into the parent at sequential positions;
- results join (APR) = free the spawn block and the children's slots, queue the results
  block (children's result spans gathered on device).

Memory is `slots` per lane, shared by all the threads of all its requests: it grows with the
tokens stored, not with threads x max length (freed slots are reused; a request's slots are
freed the step it ends). `lanes=1` is one pool of rows, threads and KV for every request;
more lanes bound the attention work (a token scans only its own lane's slots) and shard
over the mesh's data axis.

Every step packs up to M tokens of the lane's running threads (its last sample, or a chunk
of its forced queue: prompt, forced prefix, re-prefill, results block), runs the model once
over [lanes, M] with a per-token mask over the lane's slots, samples for the threads whose
queue drained, and runs the protocol state machine. M is one of a few variants (1, rows,
..., `chunk`; `step_sizes`), picked per step by `lax.switch` in the same compiled program:
by default the smallest that covers the busiest lane; optionally the one that writes the
most tokens per unit of cost, with the costs measured on the running machine
(`runner.StepCosts`), work beyond M waiting for a later step. The model only reads the KV
pool inside the switch; the new tokens' KV is written after it, in place (a buffer
returned by a `lax.cond` is copied whole each step).

The host runs the loop in segments (continuous batching: requests enter free request slots
of a lane and leave between segments; deadlines are checked there). Everything else - forks,
joins, scheduling of waiting threads onto free rows, budgets - happens on the device.

The package, in the order a step runs:
- `state`: `TreeSpec`, the vocabularies (`ThreadState`, `StopReason`, `Limit`, ...) and the
  typed tables of a lane (`Requests`, `Scripts`, `Threads`, `Rows`, `Slots`, `Log`, `Lane`,
  `EngineState`), each with its shapes;
- `requests`: a request admitted, closed, released;
- `packing`: threads onto rows, the step's tokens packed, their slots booked, their masks;
- `budgets`: sampling, the token budgets, the protocol's state machine, race and pruning;
- `forkjoin`: children created, threads finished, parents joined;
- `loop`: one step, the step variants, the `while_loop` segment, and the whole-state
  `init` / `admit` / `cancel` / `release` the host calls between segments;
- `prefill`: long forced queues (prompts, re-prefills) written in large chunks by a
  program apart from the loop, one lane per data shard per call, between segments.
"""
from __future__ import annotations

from apr_jax.engine.tree.loop import admit, cancel, init, release, segment, step_sizes
from apr_jax.engine.tree.prefill import prefill, work as prefill_work
from apr_jax.engine.tree.state import (LABEL_DIGITS, LIMITS, REASONS, STATE_NAMES, EngineState, Lane, Limit,
                                       LogKind, Log, Next, Requests, Rows, Scripts, Slots,
                                       StopReason, ThreadState, Threads, TreeSpec, empty_lane,
                                       label_tokens, log_bound)

__all__ = ["LABEL_DIGITS", "LIMITS", "REASONS", "STATE_NAMES", "EngineState", "Lane", "Limit", "Log", "LogKind",
           "Next", "Requests", "Rows", "Scripts", "Slots", "StopReason", "ThreadState", "Threads",
           "TreeSpec", "admit", "cancel", "empty_lane", "init", "label_tokens", "log_bound",
           "prefill", "prefill_work", "release", "segment", "step_sizes"]
