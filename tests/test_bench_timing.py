"""`experiments.bench.timing`: the call counts and the per-call division."""

import time

import jax.numpy as jnp
import pytest

from experiments.bench.timing import median_seconds


def test_median_seconds_batches_calls_and_divides():
  count = [0]

  def fn(x):
    count[0] += 1
    time.sleep(0.002)
    return x + 1

  sec = median_seconds(fn, jnp.ones(3), warmup=2, iters=4, calls=5)
  assert count[0] == 2 + 4 * 5
  # Each call sleeps 2 ms: the per-call figure, not the per-sample one.
  assert 0.002 <= sec < 0.005


def test_median_seconds_rejects_zero_calls():
  with pytest.raises(ValueError, match="calls=0"):
    median_seconds(lambda: None, calls=0)
