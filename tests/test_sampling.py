"""Sampling against plain numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apr_jax.engine.sampling import SamplingConfig, sample
from apr_jax.errors import UserError


def draw(logits, cfg, n=400):
  keys = jax.random.split(jax.random.key(0), n)
  lg = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
  return np.asarray(jax.jit(sample, static_argnums=2)(lg, keys, cfg))


def test_greedy_is_argmax():
  lg = np.random.default_rng(0).normal(size=(5, 50)).astype(np.float32)
  keys = jax.random.split(jax.random.key(1), 5)
  assert np.array_equal(np.asarray(sample(jnp.asarray(lg), keys, SamplingConfig())), lg.argmax(-1))


def test_top_k_only_samples_the_k_best():
  lg = np.random.default_rng(1).normal(size=30)
  got = draw(lg, SamplingConfig(temperature=1.0, top_k=3))
  assert set(got) <= set(np.argsort(lg)[-3:]) and len(set(got)) == 3


def test_top_p_keeps_the_smallest_prefix_reaching_p():
  p = np.array([0.5, 0.3, 0.15, 0.05])
  got = draw(np.log(p), SamplingConfig(temperature=1.0, top_p=0.75))
  assert set(got) == {0, 1}  # 0.5 < 0.75 <= 0.8
  freq = np.mean(got == 0)
  assert abs(freq - 0.5 / 0.8) < 0.08


def test_temperature_matches_softmax_frequencies():
  lg = np.array([0.0, 1.0, 2.0])
  got = draw(lg, SamplingConfig(temperature=2.0), n=4000)
  ref = np.exp(lg / 2) / np.exp(lg / 2).sum()
  np.testing.assert_allclose(np.bincount(got, minlength=3) / len(got), ref, atol=0.03)


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2)])
def test_bad_values_are_user_errors(kw):
  with pytest.raises(UserError):
    SamplingConfig(**kw)
