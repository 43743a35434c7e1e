"""Supervised training on (parallel) trajectories: packed thread trees, AdamW with warmup +
cosine, orbax checkpoints that resume exactly, a progress line and JSONL metrics.

The data order is a pure function of (seed, step), so a run resumed from a checkpoint
continues the same loss curve as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from apr_jax.errors import UserError
from apr_jax.model.transformer import Transformer
from apr_jax.training import packing


def make_optimizer(lr: float, warmup: int, steps: int, weight_decay: float, clip: float):
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1), lr * 0.1)
  return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(sched, b1=0.9, b2=0.95,
                                                                   weight_decay=weight_decay)), sched


def loss_fn(model: Transformer, batch, remat: bool = False):
  """Mean cross-entropy over the labelled (sampled) tokens of packed rows. remat: recompute
  each layer's activations in the backward instead of keeping them (long rows, big models)."""
  tree = packing.TreeMask(batch["groups"], batch["vis"])
  logits = model.train_logits(batch["tokens"], batch["positions"], tree, remat=remat)
  labels = batch["labels"]
  mask = labels >= 0
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
  return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1)


def make_step(graphdef, rest, tx, remat: bool = False, replicated=None, compute_dtype=None):
  """The jitted training step. `replicated`: a sharding for params and optimizer state (data
  parallelism: the batch comes sharded over the devices, the gradients are all-reduced).
  compute_dtype (e.g. "bfloat16"): mixed precision - the forward and backward run on a copy
  of the params in that dtype (activations follow it; attention softmax, logits and loss stay
  float32), the float32 params, gradients and optimizer state are what is stored."""
  cast = None
  if compute_dtype is not None and jnp.dtype(compute_dtype) != jnp.float32:
    dt = jnp.dtype(compute_dtype)
    cast = lambda p: jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, p)

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(
        lambda p: loss_fn(nnx.merge(graphdef, cast(p) if cast else p, rest), batch, remat))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)
  # params and optimizer state are donated: updated in place, not double-buffered
  if replicated is None:
    return jax.jit(step, donate_argnums=(0, 1))
  return jax.jit(step, out_shardings=(replicated, replicated, replicated, replicated),
                 donate_argnums=(0, 1))


def data_mesh(n: int, batch_size: int):
  """A 1-D ("data",) mesh over the first n devices (0: all of them), or None for one device."""
  from jax.sharding import Mesh
  devices = jax.devices()
  n = n or len(devices)
  if n > len(devices):
    raise UserError(f"train.data_parallel={n}, but there are {len(devices)} devices")
  if batch_size % n:
    raise UserError(f"train.batch_size={batch_size} is not divisible by the {n} data-parallel devices")
  return Mesh(np.array(devices[:n]), ("data",)) if n > 1 else None


def _put_batch(arrays: dict, mesh):
  """Host arrays (the same on every process) -> device arrays, rows sharded over `mesh`."""
  if mesh is None:
    return {k: jnp.asarray(a) for k, a in arrays.items()}
  from jax.sharding import NamedSharding, PartitionSpec
  sh = NamedSharding(mesh, PartitionSpec("data"))
  return {k: jax.make_array_from_callback(a.shape, sh, lambda idx, a=a: a[idx])
          for k, a in arrays.items()}


def batch_indices(n_rows: int, batch: int, step: int, seed: int) -> np.ndarray:
  """Rows of batch `step`: epochs are seeded permutations, so any step can be recomputed."""
  per_epoch = max(n_rows // batch, 1)
  epoch, k = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
  idx = perm[k * batch:(k + 1) * batch]
  if len(idx) < batch:  # fewer rows than a batch: wrap around
    idx = np.resize(perm, batch)
  return idx


@dataclasses.dataclass
class TrainConfig:
  steps: int = 1000
  batch_size: int = 8
  lr: float = 1e-3
  warmup: int = 100
  weight_decay: float = 0.01
  clip: float = 1.0
  seed: int = 0
  ckpt_every: int = 200
  keep: int = 3
  log_every: int = 10
  stop_at: int = 0  # >0: stop after this step; the schedule still spans `steps` (a cut-short run)
  data_parallel: int = 1  # devices the batch is split over (0: all); params are replicated
  remat: bool = False  # recompute layer activations in the backward (saves memory on GPU/TPU;
                       # XLA:CPU's scheduler runs the recomputation early: no saving measured)
  compute_dtype: str = "float32"  # "bfloat16": mixed precision on float32 master weights


def train_config(**overrides):
  """A config's `train` section (ml_collections) holding every `TrainConfig` field, so that
  any of them can be overridden on the command line (`--config.train.remat=True`)."""
  from ml_collections import ConfigDict
  unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)}
  if unknown:
    raise ValueError(f"unknown train settings: {sorted(unknown)}")
  return ConfigDict(dataclasses.asdict(TrainConfig(**overrides)))


def _check(tc: TrainConfig):
  for name in ("steps", "batch_size", "log_every", "ckpt_every", "keep"):
    if getattr(tc, name) < 1:
      raise UserError(f"train.{name} must be >= 1, got {getattr(tc, name)}")
  if not tc.lr > 0 or tc.warmup < 0 or tc.weight_decay < 0 or not tc.clip > 0:
    raise UserError(f"train: need lr > 0, warmup >= 0, weight_decay >= 0, clip > 0 "
                    f"(got {tc.lr}, {tc.warmup}, {tc.weight_decay}, {tc.clip})")
  if tc.data_parallel < 0 or tc.stop_at < 0:
    raise UserError("train.data_parallel and train.stop_at must be >= 0")
  if tc.compute_dtype not in ("float32", "bfloat16"):  # float16 would need loss scaling
    raise UserError(f"train.compute_dtype={tc.compute_dtype!r}: use float32 or bfloat16")


def train(model: Transformer, rows: packing.Rows, tc: TrainConfig, workdir: str,
          log: Callable = None) -> tuple[Transformer, list]:
  """Trains `model` on packed `rows`; checkpoints in workdir/ckpt (resumes from the latest);
  metrics appended to workdir/metrics.jsonl. Returns (trained model, losses of this call)."""
  import orbax.checkpoint as ocp
  log = log or (lambda s: print(s, file=sys.stderr, flush=True))
  _check(tc)
  if rows.tokens.shape[0] == 0:
    raise UserError("no training sequence fits: raise seq_len (or max_groups)")
  os.makedirs(workdir, exist_ok=True)
  mesh = data_mesh(tc.data_parallel, tc.batch_size)
  replicated = None
  if mesh is not None:
    from jax.sharding import NamedSharding, PartitionSpec
    replicated = NamedSharding(mesh, PartitionSpec())
    log(f"data parallel over {mesh.size} devices ({tc.batch_size // mesh.size} rows each)")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx, sched = make_optimizer(tc.lr, tc.warmup, tc.steps, tc.weight_decay, tc.clip)
  if replicated is None:  # the step donates its params: the caller's model keeps its own
    params = jax.tree.map(jnp.copy, params)
    opt_state = tx.init(params)
  else:  # (the optimizer's step counters are created on one device)
    params, rest = jax.device_put((params, rest), replicated)
    opt_state = jax.device_put(tx.init(params), replicated)
  mgr = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "ckpt")),
      options=ocp.CheckpointManagerOptions(max_to_keep=tc.keep, save_interval_steps=tc.ckpt_every,
                                           enable_async_checkpointing=False))
  start = 0
  if mgr.latest_step() is not None:
    start = mgr.latest_step()
    target = {"params": params, "opt_state": opt_state}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = mgr.restore(start, args=ocp.args.StandardRestore(abstract))
    params, opt_state = restored["params"], restored["opt_state"]
    log(f"resumed from step {start}")
  step_fn = make_step(graphdef, rest, tx, tc.remat, replicated, tc.compute_dtype)
  n_rows = rows.tokens.shape[0]
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  losses = []
  t0 = time.perf_counter()
  tokens_done = 0
  end = min(tc.stop_at, tc.steps) if tc.stop_at > 0 else tc.steps
  if start >= end:
    log(f"the latest checkpoint (step {start}) is at or past the last step to run ({end}): "
        "nothing to train")
  for step in range(start, end):
    idx = batch_indices(n_rows, tc.batch_size, step, tc.seed)
    batch = _put_batch({k: getattr(rows, k)[idx] for k in ("tokens", "positions", "groups", "vis", "labels")},
                       mesh)
    params, opt_state, loss, gnorm = step_fn(params, opt_state, batch)
    tokens_done += int((rows.groups[idx] >= 0).sum())
    s = step + 1
    if s % tc.log_every == 0 or s == end or s == start + 1:
      loss_f = float(loss)
      losses.append((s, loss_f))
      dt = time.perf_counter() - t0
      tps = tokens_done / dt
      eta = (end - s) * dt / max(s - start, 1)
      rec = {"step": s, "loss": round(loss_f, 5), "grad_norm": round(float(gnorm), 4),
             "lr": float(sched(step)), "tokens_per_s": round(tps, 1), "elapsed_s": round(dt, 1)}
      with open(metrics_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
      bar = "#" * int(20 * s / end)
      log(f"[{bar:20s}] step {s}/{end} loss {loss_f:.4f} | {tps:,.0f} tok/s | "
          f"ETA {eta / 60:.1f} min")
    mgr.save(s, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
             force=s == end)
  mgr.wait_until_finished()
  return nnx.merge(graphdef, params, rest), losses


def restore_latest(model: Transformer, tc: TrainConfig, workdir: str):
  """(model with the latest checkpoint's params, its step)."""
  import orbax.checkpoint as ocp
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx, _ = make_optimizer(tc.lr, tc.warmup, tc.steps, tc.weight_decay, tc.clip)
  mgr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "ckpt")))
  step = mgr.latest_step()
  if step is None:
    raise UserError(f"no checkpoint in {workdir}/ckpt")
  target = {"params": params, "opt_state": tx.init(params)}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
  return nnx.merge(graphdef, restored["params"], rest), step
