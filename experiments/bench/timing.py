"""Wall-clock timing of jitted JAX calls: warm-up, then the median of many calls."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, *args, warmup: int = 3, iters: int = 20,
                   min_seconds: float = 0.0, calls: int = 1) -> float:
  """Median seconds per call of `fn(*args)`, synchronised.

  `fn` should be jitted; the warm-up calls compile it and fill caches. At
  least `iters` samples are timed, more until `min_seconds` have elapsed.
  A sample is `calls` calls dispatched back to back and synchronised once,
  divided by `calls`: with `calls > 1` the host's per-call dispatch and
  synchronisation overlap the device work instead of adding to each call.
  """
  if calls < 1:
    raise ValueError(f"calls must be >= 1; got calls={calls}")
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  start = time.perf_counter()
  while len(times) < iters or time.perf_counter() - start < min_seconds:
    t0 = time.perf_counter()
    jax.block_until_ready([fn(*args) for _ in range(calls)])
    times.append((time.perf_counter() - t0) / calls)
  return statistics.median(times)


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int,
                    head_dim: int, *, causal: bool = False,
                    backward: bool = False) -> float:
  """Dense-equivalent FLOPs: 4*B*H*Sq*Sk*D forward (half when causal), x3.5 with backward."""
  flops = 4.0 * batch * heads * q_len * kv_len * head_dim
  if causal:
    flops /= 2
  return flops * (3.5 if backward else 1.0)
