"""What key importance costs beside the attention forward, in one process.

  python -m experiments.bench.importance                 # S 512, 4k, 16k
  python -m experiments.bench.importance --seq 512 --causal True

Rows on the same bf16 inputs (`[batch, seq, heads, head_dim]`, batch * seq
fixed by `--tokens`): the `pallas_triton` forward alone; the forward with
its importance (`nmattn.nm_attention_with_importance`, the importance
kernel on the forward's lse); and the same through "xla". `extra` is a row's
time over the Triton forward's, minus one. Prints a table; writes JSON to
$OUT (or `--json`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax

import nmattn
from experiments.bench.attention import inputs
from experiments.bench.timing import median_seconds


def measure(seq: int, causal: bool, *, heads: int, head_dim: int, tokens: int,
            n: int, m: int, iters: int) -> list[dict]:
  batch = max(1, tokens // seq)
  q, k, v, _ = inputs(seq, head_dim, tokens, heads, seed=0)
  kwargs = dict(is_causal=causal, n=n, m=m)
  rows = {
      "pallas_triton forward": functools.partial(
          nmattn.nm_attention, implementation="pallas_triton", **kwargs),
      "pallas_triton forward + importance": functools.partial(
          nmattn.nm_attention_with_importance, implementation="pallas_triton",
          **kwargs),
      "xla forward + importance": functools.partial(
          nmattn.nm_attention_with_importance, implementation="xla", **kwargs),
  }
  times = {name: median_seconds(jax.jit(fn), q, k, v, iters=iters)
           for name, fn in rows.items()}
  base = times["pallas_triton forward"]
  return [dict(seq=seq, batch=batch, heads=heads, head_dim=head_dim,
               causal=causal, nm=f"{n}:{m}", row=name, ms=t * 1e3,
               extra=t / base - 1.0) for name, t in times.items()]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq", type=int, nargs="+", default=[512, 4096, 16384])
  parser.add_argument("--causal", type=lambda s: s == "True", nargs="+",
                      default=[False])
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--tokens", type=int, default=16384, help="batch * seq")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  records = []
  for seq in args.seq:
    for causal in args.causal:
      for r in measure(seq, causal, heads=args.heads, head_dim=args.head_dim,
                       tokens=args.tokens, n=2, m=4, iters=args.iters):
        records.append(r)
        print(f"S={r['seq']:6d} causal={r['causal']!s:5s} {r['row']:36s} "
              f"{r['ms']:9.3f} ms  extra {r['extra']:+.1%}", flush=True)
  path = args.json or (os.path.join(os.environ["OUT"], "importance.json")
                       if os.environ.get("OUT") else None)
  if path:
    with open(path, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind,
                 "jax": jax.__version__, "records": records}, f, indent=1)
  return records


if __name__ == "__main__":
  main()
