"""Countdown (APR's task): problems, solvers that write trajectories, a verifier.

- `problems`: settings (APR's 4 numbers in 1..99 and a small CPU one), generation, splits;
- `solvers`: the sequential Stream-of-Search trace and the fork/join formats (APR,
  ThreadWeaver, Multiverse);
- `original`: the original APR repository's SoS+ and APR trace formats;
- `verifier`: replays every search line and the claimed solution (either answer form);
- `data`: the tokenizer trained on the traces and the per-format token trajectories.
"""
from apr_jax.tasks.countdown.problems import (APR, OPS, PROGRESS_MIN, SETTINGS, SMALL, Problem,
                                              Setting, apply, generate, moves, solvable, splits,
                                              test_split)
from apr_jax.tasks.countdown.solvers import (ParallelTrace, fmt_nums, fmt_op, fmt_ops, fmt_state,
                                             node_id, prompt_text, solution_line, solve_parallel,
                                             solve_sos)
from apr_jax.tasks.countdown.verifier import (RE_EXPLORE, RE_GEN, RE_OP, RE_SOLUTION, RE_STATE,
                                              answer, replay, summary_path, verify)
from apr_jax.tasks.countdown.original import (AprOriginalTrace, solve_apr_original,
                                              solve_sos_original)

__all__ = ["APR", "OPS", "PROGRESS_MIN", "SETTINGS", "SMALL", "Problem", "Setting", "apply",
           "generate", "moves", "solvable", "splits", "test_split", "ParallelTrace", "fmt_nums",
           "fmt_op", "fmt_ops", "fmt_state",
           "node_id", "prompt_text", "solution_line", "solve_parallel", "solve_sos", "RE_EXPLORE",
           "RE_GEN", "RE_OP", "RE_SOLUTION", "RE_STATE", "answer", "replay", "summary_path", "verify",
           "AprOriginalTrace", "solve_apr_original", "solve_sos_original"]
