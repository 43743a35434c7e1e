"""Supervised training: `python -m apr_jax.train --config configs/countdown_small_apr.py`.

Builds the task's trajectories in the config's format (sequential SoS, APR, ThreadWeaver or
Multiverse, or the original SoS+ and APR formats: `apr_original` trains each call of the
original's search as its own sequence, as the original does), trains a tokenizer (or grows a pretrained one with the protocol tags), packs each
thread tree into rows with its tree mask, trains with AdamW (warmup + cosine), checkpoints
with orbax (an interrupted run resumes where it stopped), and writes the final model as an
apr_jax checkpoint in WORKDIR/model (with its tokenizer) that `run` and `eval` load.
Any config value can be overridden: `--config.train.steps=100 --config.workdir=/tmp/x`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time

from absl import app, flags

from apr_jax import config_files
from apr_jax.errors import UserError, cli_main, parse_flags

FLAGS = flags.FLAGS
config_files.DEFINE_config_file("config", "train", "A training config from configs/, e.g. "
                                "configs/countdown_small_apr.py.")
flags.DEFINE_boolean("export_only", False, "Write the latest checkpoint of WORKDIR as an apr_jax "
                     "model in WORKDIR/model without training (e.g. while a run is going).")


def _log(*a):
  print(*a, file=sys.stderr, flush=True)


def build_data(c, tok, log=_log):
  """Packed rows of the training split in the config's format."""
  import numpy as np
  from apr_jax.protocols import reference
  from apr_jax.tasks import countdown as cd
  from apr_jax.tasks.countdown import data
  from apr_jax.training import packing
  setting = cd.SETTINGS[c.setting]
  if c.get("beam"):
    setting = dataclasses.replace(setting, beam=c.beam)
  pr = data.protocol_for(c.format, tok)
  # the packed rows are cached in the workdir (a resumed run skips rebuilding them)
  key = json.dumps([dataclasses.asdict(setting), c.format, c.n_train, c.n_test, c.data_seed, c.seq_len,
                    c.max_groups, tok.vocab_size, [tok.decode([i]) for i in range(tok.vocab_size)]])
  cache = os.path.join(c.workdir, f"data-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz")
  if os.path.exists(cache):
    with np.load(cache) as z:
      rows = packing.Rows(**{k: z[k] for k in z.files})
    log(f"data: {rows.tokens.shape[0]} packed rows from {cache}")
    return rows, pr
  train, _ = cd.splits(setting, c.n_train, c.n_test, seed=c.data_seed)
  items, t0 = [], time.perf_counter()
  for i, p in enumerate(train):
    for prompt, scripts in data.sequences(tok, c.format, p, setting)[0]:
      trace = reference.simulate(pr, prompt, scripts, eos_ids=(tok.eos_id,), text=(tok.decode, tok.encode))
      items.extend(packing.split_components(packing.pack_trace(trace)))
    if (i + 1) % 2000 == 0:
      log(f"  trajectories {i + 1}/{len(train)} ({time.perf_counter() - t0:.0f} s)")
  rows, skipped = packing.pack_rows(items, c.seq_len, c.max_groups)
  lens = [len(x) for x in items]
  log(f"data: {len(train)} {c.format} trajectories, {len(items)} sequences (median {int(np.median(lens))} tokens, "
      f"{skipped} longer than {c.seq_len} skipped) -> {rows.tokens.shape[0]} rows")
  os.makedirs(c.workdir, exist_ok=True)
  np.savez_compressed(cache + ".tmp.npz", **dataclasses.asdict(rows))
  os.replace(cache + ".tmp.npz", cache)
  return rows, pr


def build_model(c, log=_log):
  """(model, tokenizer): from scratch with a tokenizer trained on the traces, or a
  pretrained checkpoint grown with the protocol tags."""
  from flax import nnx
  from apr_jax.model.config import ModelConfig
  from apr_jax.model.transformer import Transformer
  from apr_jax.tasks import countdown as cd
  from apr_jax.tasks.countdown import data
  data.check_format(c.format)
  tok_dir = os.path.join(c.workdir, "tokenizer")
  if c.init_from:
    from apr_jax import checkpoint
    from apr_jax.default_model import smollm2_path
    from apr_jax.model.vocab import add_tokens
    path = smollm2_path() if c.init_from == "smollm2" else c.init_from
    model, tok = checkpoint.load(path)
    if data.tags_for(c.format):
      model, _ = add_tokens(model, tok, data.tags_for(c.format))
    return model, tok
  if os.path.exists(os.path.join(tok_dir, "tokenizer.model")):
    from apr_jax.tokenizer import load_tokenizer
    tok = load_tokenizer(tok_dir)  # a resumed run keeps its tokenizer
  else:
    setting = cd.SETTINGS[c.setting]
    train, _ = cd.splits(setting, min(c.n_train, 2000), c.n_test, seed=c.data_seed)
    tok = data.train_tokenizer(data.texts_for_tokenizer(train, setting, c.format), tok_dir,
                               c.vocab_size, tags=data.tags_for(c.format))
    log(f"tokenizer: {tok.vocab_size} pieces -> {tok_dir}")
  m = dict(c.model)
  cfg = ModelConfig(arch=m.pop("arch", "llama"), vocab_size=tok.vocab_size, bos_id=tok.bos_id,
                    eos_ids=(tok.eos_id,), **m)
  model = Transformer(cfg, rngs=nnx.Rngs(c.train.seed))
  log(f"model: {cfg.num_params() / 1e6:.2f}M params, {cfg.n_layers} layers, dim {cfg.dim}")
  return model, tok


@cli_main
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  c = FLAGS.config
  if c is None:
    raise UserError("--config is required, e.g. --config configs/countdown_small_apr.py")
  from apr_jax import utils
  utils.quiet_logs()
  utils.setup_jax()
  from apr_jax.checkpoint import orbax_io
  from apr_jax.tasks.countdown import data
  from apr_jax.training.trainer import TrainConfig, train
  data.check_format(c.format)
  os.makedirs(c.workdir, exist_ok=True)
  with open(os.path.join(c.workdir, "config.json"), "w") as f:
    f.write(c.to_json_best_effort(indent=1))
  model, tok = build_model(c)
  if FLAGS.export_only:
    from apr_jax.training.trainer import restore_latest
    model, step = restore_latest(model, TrainConfig(**dict(c.train)), c.workdir)
    _log(f"exporting step {step}")
  else:
    rows, _ = build_data(c, tok)
    tc = TrainConfig(**dict(c.train))
    model, _ = train(model, rows, tc, c.workdir)
  out = os.path.join(c.workdir, "model")
  orbax_io.save(out, model, tok, extra={"task": c.task, "setting": c.setting, "format": c.format,
                                        "protocol": data.PROTOCOL_OF[c.format]})
  _log(f"saved {out}")
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
