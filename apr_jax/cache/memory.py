"""Device memory for the tree engine: what an engine needs per device, what a device has
free, and how many KV slots fit (`slots="auto"`).

The estimate, per device of the mesh (lanes split over its data axis, KV heads over its
model axis, as the engine shards them):
- the KV pool: lanes x slots x 2 (k, v) x layers x kv_heads x head_dim x dtype bytes;
- the lane tables (thread table, forced queues, token log, slot bookkeeping), sized exactly
  from the engine state's shapes;
- the activations of the largest step: every lane's `chunk` tokens scoring every slot in
  float32 (scores and probabilities; the dense layout's cost, an upper bound for the tree
  layout), a layer's hidden and feed-forward activations, and the logits of every row; or,
  when larger, a prefill call's (one lane's `prefill` tokens per device);
The parameters are not counted: they are already on the device, so the device's free
memory (`memory_stats()`: bytes_limit - bytes_in_use on GPU and TPU; on CPU the host's
available memory, split over the engine's devices) is what is left after them. A margin
(10%) covers XLA's temporaries and fragmentation.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from apr_jax.errors import UserError

MARGIN = 0.10
GiB = 1024 ** 3


def free_bytes(devices) -> int | None:
  """The least free memory of this process's `devices` in bytes, or None when it cannot be
  told. (Each process of a multi-process run reads its own devices: pass the engine an
  explicit pool size there, so that every process builds the same program.)"""
  devices = [d for d in devices if d.process_index == jax.process_index()]
  out = []
  for d in devices:
    stats = None
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001 - some backends do not implement it
      stats = None
    if stats and "bytes_limit" in stats:
      out.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    elif d.platform == "cpu":
      host = _host_available()
      if host is None:
        return None
      out.append(host // max(1, sum(1 for x in devices if x.platform == "cpu")))
    else:
      return None
  return min(out) if out else None


def _host_available() -> int | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


@dataclasses.dataclass(frozen=True)
class Need:
  """Bytes per device an engine needs, by part."""
  kv: int
  tables: int
  activations: int

  @property
  def total(self) -> int:
    return self.kv + self.tables + self.activations

  def describe(self, slots: int, lanes: int) -> str:
    g = lambda b: f"{b / GiB:.2f} GiB"
    return (f"{g(self.total)} per device: KV pool {g(self.kv)} ({lanes} lane(s) x {slots} slots), "
            f"engine tables {g(self.tables)}, activations {g(self.activations)}")


def _split(n: int, parts: int) -> int:
  """A dimension of n per device over an axis of `parts` (not divisible: replicated)."""
  return n // parts if n % parts == 0 else n


def _per_device_heads(cfg, model: int) -> tuple[int, int]:
  """(q heads, KV heads) per device of a model axis of `model`."""
  return _split(cfg.n_heads, model), _split(cfg.n_kv_heads, model)


def kv_bytes_per_token(cfg, cache_dtype, kv_heads: int | None = None) -> int:
  """K and V bytes of one token over every layer (`kv_heads`: per device; default all)."""
  kv_heads = cfg.n_kv_heads if kv_heads is None else kv_heads
  return 2 * cfg.n_layers * kv_heads * cfg.head_dim * jnp.dtype(cache_dtype).itemsize


def _layer_act(cfg, tokens: int) -> int:
  """float32 bytes of one layer's hidden and feed-forward activations for `tokens`."""
  return tokens * (4 * cfg.dim + 3 * cfg.ffn_dim) * 4


def _mesh_axes(mesh) -> tuple[int, int]:
  shape = dict(mesh.shape) if mesh is not None else {}
  return shape.get("data", 1), shape.get("model", 1)


def _free(mesh, free):
  if free is not None:
    return free
  return free_bytes(mesh.devices.flat if mesh is not None else jax.local_devices()[:1])


def need(spec, cfg, cache_dtype, data: int = 1, model: int = 1) -> Need:
  """What an engine with `spec` needs on each device of a (data, model) mesh."""
  from apr_jax.engine.tree.state import empty_lane
  lanes = _split(spec.lanes, data)
  heads, kv_heads = _per_device_heads(cfg, model)
  kv = lanes * spec.slots * kv_bytes_per_token(cfg, cache_dtype, kv_heads)
  lane = jax.eval_shape(lambda: empty_lane(spec, cfg.vocab_size))
  per_lane = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(lane))
  scores = lanes * heads * spec.chunk * spec.slots * 4 * 2
  logits = lanes * spec.rows * cfg.vocab_size * 4 * 2
  act = scores + logits + _layer_act(cfg, lanes * spec.chunk)
  if spec.prefill:  # one lane per device: its scores, its KV picked, every lane's new KV
    per_token = kv_bytes_per_token(cfg, cache_dtype, kv_heads)
    act = max(act, heads * spec.prefill * spec.slots * 4 * 2 + _layer_act(cfg, spec.prefill) +
              spec.slots * per_token + lanes * spec.prefill * per_token)
  return Need(kv=int(kv), tables=int(per_lane * lanes), activations=int(act))


def check(spec, cfg, cache_dtype, mesh, free: int | None = None) -> Need:
  """Raises a UserError when an engine with `spec` cannot fit in the devices' free memory
  (when that can be told). Returns the estimate."""
  data, model = _mesh_axes(mesh)
  n = need(spec, cfg, cache_dtype, data, model)
  free = _free(mesh, free)
  if free is not None and n.total > (1 - MARGIN) * free:
    raise UserError(
        f"the engine does not fit in device memory: it needs about {n.describe(spec.slots, spec.lanes)}, "
        f"and the device has {free / GiB:.2f} GiB free ({MARGIN:.0%} kept as margin); use fewer "
        "KV slots or lanes, or slots='auto' (the most that fit)")
  return n


def check_batch(cfg, cache_dtype, batch: int, prompt_len: int, slots: int, mesh, what: str,
                free: int | None = None):
  """Sequential decoding (`Generator`): its KV cache [batch, slots] and its prefill's
  scores [batch, heads, prompt_len, slots] must fit; else a UserError naming `what`."""
  data, model = _mesh_axes(mesh)
  rows = _split(batch, data)  # a batch that does not split is replicated
  heads, kv_heads = _per_device_heads(cfg, model)
  kv = rows * slots * kv_bytes_per_token(cfg, cache_dtype, kv_heads)
  act = rows * heads * prompt_len * slots * 4 * 2 + _layer_act(cfg, rows * prompt_len)
  free = _free(mesh, free)
  if free is not None and kv + act > (1 - MARGIN) * free:
    raise UserError(f"{what} does not fit in device memory: its KV cache ({batch} rows x {slots} "
                    f"slots) needs {kv / GiB:.2f} GiB and its prefill {act / GiB:.2f} GiB per device, "
                    f"and the device has {free / GiB:.2f} GiB free; use fewer prompts at once or "
                    "fewer tokens")


def auto_slots(make_spec: Callable[[int], object], cfg, cache_dtype, mesh, cap: int,
               block: int = 64, free: int | None = None) -> int:
  """The most KV slots per lane (a multiple of `block`, at most `cap` rounded up to one)
  for which `make_spec(slots)` fits in free device memory with the margin. `cap` is what
  the engine's budgets can use, so a large device does not get a pool no request fills.
  On a platform that does not report its free memory, `cap`."""
  data, model = _mesh_axes(mesh)
  free = _free(mesh, free)
  top = max(1, -(-cap // block))
  if free is None:
    return top * block
  budget = (1 - MARGIN) * free
  fits = lambda k: need(make_spec(k * block), cfg, cache_dtype, data, model).total <= budget
  if not fits(1):
    n = need(make_spec(block), cfg, cache_dtype, data, model)
    raise UserError(f"not even {block} KV slots per lane fit in device memory: that needs about "
                    f"{n.describe(block, make_spec(block).lanes)}, and the device has "
                    f"{free / GiB:.2f} GiB free; use fewer lanes")
  lo, hi = 1, top  # fits(lo); the answer is in [lo, hi]
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid - 1
  return lo * block
