"""Where `nmattn.patterns.topk_blocks`'s time goes, phase by phase (issue 20).

Each phase is jitted and timed alone on the same inputs, in one process:
  * `means`: the block means of q and k as `topk_blocks` takes them (one
    pass over each);
  * `means_sum_f32`, `means_dot`: the same means by a float32-accumulating
    sum and by a contraction with a vector of ones, the two other ways to
    write that pass (candidates, checked against `means`);
  * `pooled`: `means` plus the pooled `[B, H, nq, nk]` scores;
  * `rank_argsort`: the count highest pooled scores per row by two stable
    argsorts (rank of every entry), on a ready `[B, H, nq, nk]` array;
  * `rank_top_k`: the same choice by `lax.top_k` and a scatter, as
    `topk_blocks` makes it;
  * `topk_blocks`: the whole library call, and `topk_blocks_aot` the same
    call compiled ahead of time and timed over at least 0.05 s, as
    `experiments.bench.patterns` times its `pattern_ms`.
The two ranking phases must choose the same blocks; the tool checks it.

  python -m tools.topk_cost --seq 16384 --density 0.25
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from experiments.bench.attention import inputs
from experiments.bench.patterns import block_count
from experiments.bench.timing import median_seconds
from nmattn import patterns


def rank_argsort(values, count: int):
  """bool: the `count` largest entries of the last axis, by the rank of every entry.

  What `topk_blocks` did before it used `lax.top_k` (`patterns._top`).
  """
  order = jnp.argsort(-values, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True) < count


def phases(*, block: int, count: int):
  """The jitted phases, each a function of (q, k)."""

  def means(q, k):
    return (patterns._block_means(q, block),  # pylint: disable=protected-access
            patterns._block_means(k, block))  # pylint: disable=protected-access

  def means_sum_f32(q, k):
    return tuple(_blocks(x, block).sum(axis=2, dtype=jnp.float32) / block
                 for x in (q, k))

  def means_dot(q, k):
    ones = jnp.full((block,), 1 / block, q.dtype)
    return tuple(jnp.einsum("bnlhd,l->bnhd", _blocks(x, block), ones,
                            preferred_element_type=jnp.float32) for x in (q, k))

  def pooled(q, k):
    return patterns._scores(*means(q, k))  # pylint: disable=protected-access

  def whole(q, k):
    return patterns.topk_blocks(q, k, block_q=block, block_k=block, k=count).modes

  return {"means": jax.jit(means), "means_sum_f32": jax.jit(means_sum_f32),
          "means_dot": jax.jit(means_dot), "pooled": jax.jit(pooled),
          "topk_blocks": jax.jit(whole)}


def _blocks(x, block: int):
  """`[batch, length, heads, dim]` -> `[batch, length // block, block, heads, dim]`."""
  batch, length, heads, dim = x.shape
  if length % block:
    raise ValueError(f"--seq must be a multiple of --block; got {length} and {block}")
  return x.reshape(batch, length // block, block, heads, dim)


def run(args) -> list[dict]:
  q, k, _, _ = inputs(args.seq, args.head_dim, args.seq, args.heads, seed=0)
  count = block_count(args.seq, args.block, args.density)
  timed = phases(block=args.block, count=count)
  records = [{"phase": name, "ms": 1e3 * median_seconds(fn, q, k, iters=args.iters)}
             for name, fn in timed.items()]
  want = timed["means"](q, k)
  for name in ("means_sum_f32", "means_dot"):
    for got, ref in zip(timed[name](q, k), want):
      err = float(jnp.max(jnp.abs(got - ref.astype(jnp.float32))))
      if err > 1e-2:
        raise SystemExit(f"{name} differs from the library's block means by {err}")
  aot = timed["topk_blocks"].lower(q, k).compile()
  records.insert(len(timed), {"phase": "topk_blocks_aot", "ms": 1e3 * median_seconds(
      aot, q, k, warmup=1, iters=args.iters, min_seconds=0.05)})
  pooled = timed["pooled"](q, k)
  by_sort = jax.jit(rank_argsort, static_argnums=1)
  by_top_k = jax.jit(patterns._top, static_argnums=1)  # pylint: disable=protected-access
  if not jnp.array_equal(by_sort(pooled, count), by_top_k(pooled, count)):
    raise SystemExit("rank_argsort and rank_top_k chose different blocks")
  for name, fn in (("rank_argsort", by_sort), ("rank_top_k", by_top_k)):
    records.append({"phase": name,
                    "ms": 1e3 * median_seconds(fn, pooled, count, iters=args.iters)})
  for r in records:
    r.update(seq=args.seq, heads=args.heads, block=args.block, count=count,
             device=jax.devices()[0].device_kind, jax=jax.__version__)
  return records


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq", type=int, default=16384)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--block", type=int, default=128)
  p.add_argument("--density", type=float, default=0.25)
  p.add_argument("--iters", type=int, default=50)
  p.add_argument("--json", default=None)
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  records = run(args)
  for r in records:
    print(f"{r['phase']:>14} {r['ms']:8.4f} ms  (S {r['seq']}, keep {r['count']} blocks)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(records, f, indent=1)


if __name__ == "__main__":
  main()
