"""Hugging Face safetensors checkpoints (one file or a sharded index), memory-mapped.

A small reader of the format (8-byte little-endian header size, JSON header, raw data) so
that bfloat16 works with numpy (via ml_dtypes) and every tensor is a lazy memmap view:
nothing is copied until a device asks for it. Never unpickles anything.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from apr_jax.checkpoint.build import TensorSource
from apr_jax.errors import UserError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str) -> dict[str, TensorSource]:
  """{name: TensorSource} of one .safetensors file, validated against the file size."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise UserError(f"corrupt safetensors file {path}: shorter than its header")
      (n,) = struct.unpack("<Q", head)
      if n > size - 8 or n > 100 * 2**20:
        raise UserError(f"corrupt or truncated safetensors file {path}: header size {n} "
                        f"does not fit a file of {size} bytes")
      header = json.loads(f.read(n))
  except FileNotFoundError:
    raise UserError(f"safetensors file not found: {path}") from None
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise UserError(f"corrupt safetensors file {path}: header is not valid JSON") from None
  if not isinstance(header, dict):
    raise UserError(f"corrupt safetensors file {path}: header is not a JSON object")
  base = 8 + n
  mm = np.memmap(path, dtype=np.uint8, mode="r") if size > base else np.zeros(0, np.uint8)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dt = np.dtype(_DTYPES[info["dtype"]])
      shape = tuple(int(s) for s in info["shape"])
      start, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise UserError(f"corrupt safetensors file {path}: bad entry for tensor {name!r}") from None
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if end - start != nbytes or start < 0 or base + end > size:
      raise UserError(f"corrupt or truncated safetensors file {path}: tensor {name!r} "
                      f"[{start}, {end}) lies outside the {size - base}-byte data section")
    def load(start=start, end=end, dt=dt, shape=shape):
      return mm[base + start:base + end].view(dt).reshape(shape)
    out[name] = TensorSource(shape, load)
  return out


def read_hf_dir(path: str) -> dict[str, TensorSource]:
  """All tensors of an HF model directory: model.safetensors or a sharded index."""
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
      raise UserError(f"corrupt safetensors index {index}") from None
    out = {}
    for shard in sorted(set(weight_map.values())):
      shard_path = os.path.join(path, shard)
      if not os.path.exists(shard_path):
        raise UserError(f"safetensors index names {shard}, which is missing from {path}")
      out.update(read_safetensors(shard_path))
    missing = set(weight_map) - set(out)
    if missing:
      raise UserError(f"safetensors shards lack tensors listed in the index: {sorted(missing)[:3]}")
    return out
  if os.path.exists(single):
    return read_safetensors(single)
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if files:
    out = {}
    for f in files:
      out.update(read_safetensors(os.path.join(path, f)))
    return out
  if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(path)):
    raise UserError(f"{path} holds only pickle (.bin/.pt) weights; apr_jax never unpickles "
                    "untrusted files: convert them to safetensors first")
  raise UserError(f"no .safetensors weights in {path}")
