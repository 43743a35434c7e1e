"""The fork/join engine on the real SmolLM2 (protocol tags added): exact per-thread logits on
a short teacher-forced ThreadWeaver trajectory."""
from apr_jax import checkpoint
from apr_jax.engine.runner import Request, TreeEngine
from apr_jax.engine.tree import TreeSpec
from apr_jax.model.vocab import add_tokens
from apr_jax.protocols import THREADWEAVER_TAGS, build, reference
from tests import tree_fixtures as tf


def test_smollm2_threadweaver_exact(smollm2_path):
  model, tok = checkpoint.load(smollm2_path)  # a fresh tokenizer: tags are added to it
  model, _ = add_tokens(model, tok, THREADWEAVER_TAGS)
  pr = build("threadweaver", tok)
  prompt = tok.encode(tok.apply_chat([{"role": "user", "content": "What is 2+3?"}]) +
                      "<Parallel>\n<Outlines>\n<Outline>1: add</Outline>\n<Outline>2: check"
                      "</Outline>\n</Outlines>")
  thread_end = tok.token_id("</Thread>")
  scripts = {(0,): tok.encode(" 2 plus 3 is 5") + [thread_end],
             (1,): tok.encode(" 5 minus 3 is 2") + [thread_end],
             (): tok.encode("</Parallel>\nThe answer is 5.") + [tok.token_id("<|im_end|>")]}
  spec = TreeSpec(protocol=pr, root_stop=tuple(tok.stop_ids()), lanes=1, rows=2, threads=4,
                  slots=192, chunk=32, script=16, script_rows=4, record_logits=True)
  res = TreeEngine(model, tok, spec).run([Request(prompt, script=scripts)])[0]
  trace = reference.simulate(pr, prompt, scripts, eos_ids=tok.stop_ids(), text=(tok.decode, tok.encode))
  assert res.forks == 1 and res.stop_reason == "stop"
  tf.check_exact(model, res, trace, len(prompt), rel_tol=1e-4)
  assert "<Thread>\n1: 2 plus 3 is 5</Thread>" in res.text.replace("\n</Thread>", "</Thread>")
