"""Wall-clock timing of jitted JAX calls: warm-up, then the median of many calls."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, *args, warmup: int = 3, iters: int = 20,
                   min_seconds: float = 0.0) -> float:
  """Median seconds per call of `fn(*args)`, each call synchronised.

  `fn` should be jitted; the warm-up calls compile it and fill caches. At
  least `iters` calls are timed, more until `min_seconds` have elapsed.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  start = time.perf_counter()
  while len(times) < iters or time.perf_counter() - start < min_seconds:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int,
                    head_dim: int, *, causal: bool = False,
                    backward: bool = False) -> float:
  """Dense-equivalent FLOPs: 4*B*H*Sq*Sk*D forward (half when causal), x3.5 with backward."""
  flops = 4.0 * batch * heads * q_len * kv_len * head_dim
  if causal:
    flops /= 2
  return flops * (3.5 if backward else 1.0)
