"""Sampling: greedy, temperature, top-k, top-p. A frozen (hashable) config, static under jit."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from apr_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0            # 0 = off
  top_p: float = 1.0        # 1 = off

  def __post_init__(self):
    if not self.temperature >= 0:
      raise UserError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise UserError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def sample(logits: jax.Array, keys: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """logits [B, V] float32, keys [B] (one PRNG key per row) -> token ids [B] int32.

  One key per row makes a row's sample independent of what it is batched with.
  """
  if cfg.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / cfg.temperature
  if cfg.top_k:
    kth = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if cfg.top_p < 1.0:
    srt = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least the top token)
    n_keep = jnp.sum(cum - jax.nn.softmax(srt, axis=-1) < cfg.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(srt, n_keep - 1, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, logits).astype(jnp.int32)


def derive(seed: int, i: int) -> int:
  """The seed of item i under `seed` (a request of a batch, a sample of a request): a 31-bit
  splitmix64 mix, so neighbouring items get unrelated streams and nothing depends on the
  process (never Python's `hash`)."""
  m = (1 << 64) - 1
  x = (int(seed) * 0x9E3779B97F4A7C15 + int(i) + 1) & m
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
  return (x ^ (x >> 31)) & 0x7FFFFFFF
