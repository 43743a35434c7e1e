"""Numerical building blocks shared by the model and its attention paths: matmul precision,
float32-accumulating dots, the two GEMM orientations of `linear`, RMSNorm."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully-masked rows give a uniform softmax instead of NaN


def precision_for(*xs):
  """float32 operands get true float32 matmuls: GPUs would otherwise use TF32 for them
  (measured on an H100: ~1.2e-3 x the logit range off transformers, vs 1e-5 here).
  Lower-precision operands keep the backend default."""
  return jax.lax.Precision.HIGHEST if all(x.dtype == jnp.float32 for x in xs) else None


def dot_f32(a, b, dims, precision=None, preferred_element_type=None, **unused):
  """dot_general accumulating (and returning) float32 for any input dtype.

  XLA:CPU has no bf16 x bf16 -> f32 dot, so when the program is lowered for CPU the operands
  are upcast first; GPU/TPU keep bf16 operands with f32 accumulation. (The signature lets
  `jnp.einsum(..., _dot_general=dot_f32)` use it.)
  """
  dot = lambda x, y: jax.lax.dot_general(x, y, dims, precision=precision or precision_for(a, b),
                                         preferred_element_type=jnp.float32)
  if a.dtype == jnp.float32 and b.dtype == jnp.float32:
    return dot(a, b)
  return jax.lax.platform_dependent(
      a, b, cpu=lambda x, y: dot(x.astype(jnp.float32), y.astype(jnp.float32)), default=dot)


ROWS_MAJOR_MIN = 1024  # from this many rows of x on, x @ W^T instead of W @ x^T


def times_wt(x, w, dot):
  """x [..., in] times w [out, in] transposed -> [..., out], with `dot(a, b, dims)`.

  Few rows (decode): computed as W @ x^T, which on XLA:CPU streams the weights faster than
  x @ W^T (Eigen's small-M GEMM is the bottleneck there). Many rows (prefill, training): x is
  flattened to [rows, in] and multiplied by W^T, with no transpose of the output; at
  8192 x 192 -> 512 that is 2.3x faster than W @ x^T here. On accelerators both are GEMMs.
  """
  rows = math.prod(x.shape[:-1])
  if rows >= ROWS_MAJOR_MIN:
    y = dot(x.reshape(rows, x.shape[-1]), w, (((1,), (1,)), ((), ())))
    return y.reshape(*x.shape[:-1], w.shape[0])
  return jnp.moveaxis(dot(w, x, (((1,), (x.ndim - 1,)), ((), ()))), 0, -1)


def linear(x, w):
  """x [..., in] times a kernel stored [out, in] (the HF layout) -> [..., out] (`times_wt`)."""
  dot = lambda a, b, dims: jax.lax.dot_general(a, b, dims, precision=precision_for(w))
  return times_wt(x.astype(w.dtype), w, dot).astype(x.dtype)


def rms_norm(x, w, eps):
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (xf * w.astype(jnp.float32)).astype(x.dtype)
