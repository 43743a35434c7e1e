"""Sharding as data: logical axis names -> mesh axes.

Every parameter and cache array carries a tuple of logical axis names (`axes` metadata on
the nnx.Param, or a constant next to the cache code). `ShardingRules` maps those names to
mesh axes. A dimension that the mesh axis does not divide (e.g. SmolLM2's 3 KV heads on a
4-way model axis) is replicated instead; that keeps every checkpoint loadable on every mesh.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from apr_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Logical axis name -> mesh axis name (or None for replicated)."""
  batch: str | None = "data"
  vocab: str | None = "model"
  embed: str | None = None
  q_heads: str | None = "model"
  kv_heads: str | None = "model"
  head_dim: str | None = None
  mlp: str | None = "model"
  sequence: str | None = None

  def mesh_axis(self, logical: str | None) -> str | None:
    if logical is None:
      return None
    if not hasattr(self, logical):
      raise ValueError(f"unknown logical axis {logical!r}")
    return getattr(self, logical)

  def spec(self, axes: Sequence[str | None], shape: Sequence[int] | None = None,
           mesh: Mesh | None = None) -> P:
    """PartitionSpec for `axes`; with shape+mesh, undivisible dims are replicated."""
    out, used = [], set()
    for i, name in enumerate(axes):
      ax = self.mesh_axis(name)
      if ax is not None and mesh is not None:
        if ax not in mesh.shape or ax in used:
          ax = None
        elif shape is not None and shape[i] % mesh.shape[ax]:
          ax = None
      if ax is not None:
        used.add(ax)
      out.append(ax)
    return P(*out)

  def sharding(self, mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, self.spec(axes, shape, mesh))


def make_mesh(data: int = 1, model: int = 1, devices=None) -> Mesh:
  """A (data, model) mesh. data*model must equal the number of devices used."""
  devices = list(devices if devices is not None else jax.devices())
  need = data * model
  if need > len(devices):
    raise UserError(f"mesh {data}x{model} needs {need} devices, only {len(devices)} available")
  arr = np.array(devices[:need]).reshape(data, model)
  return Mesh(arr, ("data", "model"))


def parse_mesh(spec: str) -> tuple[int, int]:
  """'2x4' -> (2, 4); '' or 'auto' -> (1, 1)."""
  if not spec or spec == "auto":
    return 1, 1
  try:
    d, m = (int(x) for x in spec.lower().split("x"))
  except ValueError:
    raise UserError(f"--mesh must look like DATAxMODEL (e.g. 2x4), got {spec!r}") from None
  if d <= 0 or m <= 0:
    raise UserError(f"--mesh sizes must be positive, got {spec!r}")
  return d, m


def single_device_mesh() -> Mesh:
  return make_mesh(1, 1)

