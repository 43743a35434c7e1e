"""Generate text with a model: `python -m apr_jax.run --prompt "What is 2+3?"`.

The default model is the embedded SmolLM2-135M-Instruct. `--json` prints one JSON object.
"""
from __future__ import annotations

import json
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from apr_jax.errors import UserError, cli_main

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "", "A .gguf file, a Hugging Face model directory, or an apr_jax "
                    "checkpoint directory. Empty: the embedded SmolLM2-135M-Instruct.")
flags.DEFINE_string("tokenizer", "", "Tokenizer override: tokenizer.json dir, .model or .gguf.")
flags.DEFINE_multi_string("prompt", ["What is 2+3?"], "Prompt text; repeat for a batch.")
flags.DEFINE_boolean("chat", True, "Wrap each prompt in the model's chat template.")
flags.DEFINE_integer("max_new_tokens", 128, "Maximum tokens to generate per prompt.", lower_bound=1)
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.", lower_bound=0.0)
flags.DEFINE_integer("top_k", 0, "Top-k sampling; 0 = off.", lower_bound=0)
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1]; 1 = off.")
flags.DEFINE_integer("seed", 0, "Random seed for sampling.", lower_bound=0)
flags.DEFINE_boolean("json", False, "Print one JSON object (text, token_ids, stats) and nothing else.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and cache dtype.")
flags.DEFINE_string("mesh", "1x1", "Device mesh DATAxMODEL, e.g. 2x4.")
flags.DEFINE_integer("stream_every", 16, "Decode steps per streamed segment (text mode).",
                     lower_bound=1)
config_flags.DEFINE_config_file("config", None, "Optional ml_collections config file from "
                                "configs/ whose values fill flags not given explicitly.")
flags.register_validator("top_p", lambda v: 0 < v <= 1, "--top_p must be in (0, 1]")


def _stats(gen, results, wall_s) -> dict:
  s = gen.stats
  n = sum(len(r.token_ids) for r in results)
  steps = max(s.get("decode_steps", 0), 1)
  return {
      "prompt_tokens": [r.prompt_tokens for r in results],
      "generated_tokens": n,
      "compile_s": round(s.get("compile_s", 0.0), 3),
      "prefill_s": round(s["prefill_s"], 4),
      "decode_s": round(s["decode_s"], 4),
      "decode_tokens_per_s": round(len(results) * steps / s["decode_s"], 2) if s["decode_s"] else None,
      "tokens_per_s": round(n / (s["prefill_s"] + s["decode_s"]), 2),
      "wall_s": round(wall_s, 3),
  }


@cli_main
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])} (quote the prompt: --prompt \"...\")")
  from apr_jax import utils
  utils.quiet_logs()
  utils.apply_config_file(flags, FLAGS.config)
  utils.setup_jax()
  import jax.numpy as jnp
  from apr_jax import checkpoint
  from apr_jax.default_model import smollm2_path
  from apr_jax.engine.generate import Generator
  from apr_jax.engine.sampling import SamplingConfig
  from apr_jax.model.sharding import make_mesh, parse_mesh

  t0 = time.perf_counter()
  prompts = list(FLAGS.prompt)
  if not prompts or any(not p for p in prompts):
    raise UserError("--prompt must not be empty")
  sampling = SamplingConfig(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
  mesh = make_mesh(*parse_mesh(FLAGS.mesh))
  path = FLAGS.model or smollm2_path()
  log = (lambda *a: None) if FLAGS.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
  log(f"loading {path}")
  model, tok = checkpoint.load(path, dtype=jnp.dtype(FLAGS.dtype), mesh=mesh,
                               tokenizer=FLAGS.tokenizer or None)
  if tok is None:
    raise UserError(f"{path} has no tokenizer; pass --tokenizer")
  gen = Generator(model, tok, mesh=mesh)
  if mesh.shape["data"] > 1 and len(prompts) % mesh.shape["data"]:
    raise UserError(f"{len(prompts)} prompts do not split over a data axis of {mesh.shape['data']}")

  stream = not FLAGS.json and len(prompts) == 1
  printed = [""]
  gen_stop = set(tok.stop_ids())

  def on_segment(state):
    import numpy as np
    ids = np.asarray(state.tokens[0, :int(state.n_gen[0])])
    ids = [int(i) for i in ids if int(i) not in gen_stop]
    text = tok.decode(ids)
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
      return
    sys.stdout.write(text[len(printed[0]):])
    sys.stdout.flush()
    printed[0] = text

  log("compiling (cached for later runs)...")
  results = gen.generate(prompts, chat=FLAGS.chat, max_new_tokens=FLAGS.max_new_tokens,
                         sampling=sampling, seed=FLAGS.seed,
                         on_segment=on_segment if stream else None,
                         segment=FLAGS.stream_every if stream else 0)
  stats = _stats(gen, results, time.perf_counter() - t0)
  if FLAGS.json:
    rows = [{"text": r.text, "token_ids": r.token_ids, "stop_reason": r.stop_reason,
             "prompt_tokens": r.prompt_tokens} for r in results]
    out = dict(rows[0]) if len(rows) == 1 else {"results": rows}
    out["stats"] = stats
    out["model"] = path
    print(json.dumps(out))
    return 0
  if stream:
    rest = results[0].text[len(printed[0]):]
    print(rest)
  else:
    for i, r in enumerate(results):
      print(f"--- [{i}] {prompts[i]!r}\n{r.text}")
  log(f"[{stats['generated_tokens']} tokens | decode {stats['decode_tokens_per_s']} tok/s | "
      f"prefill {stats['prefill_s']:.3f} s | compile {stats['compile_s']:.1f} s | "
      f"stop: {results[0].stop_reason}]")
  return 0


if __name__ == "__main__":
  app.run(main)
