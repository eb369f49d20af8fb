"""The work tree's Triton kernels against an older commit's, in one process.

How docs/BENCHMARKS.md times a change to `pallas_kernels/triton`:

  python -m tools.baseline COMMIT DIR             # here: needs git
  python3 -m tools.triton_ab --baseline DIR --seq 4096 8192  # GPU

(`DIR` carried to the GPU machine.) For every sequence length and causal
flag, on the same random inputs: the dense row (cuDNN on a GPU, XLA
elsewhere), then the tree's and the baseline's `nm_flash_attention`, forward
and forward+backward, all `--rounds` times in turn; a time is the median of
samples of `--calls` calls each (`timing.median_seconds`). Before timing, the
two kernels' outputs and gradients are compared. Prints the medians, the
ratios to the dense row and tree / baseline; writes JSON.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics

import jax
import jax.numpy as jnp

from tools import baseline
from experiments.bench.timing import median_seconds
from pallas_kernels import triton as tree_triton

MODES = ("fwd", "fwd+bwd")


def _loss(attention, q, k, v):
  return jnp.sum(attention(q, k, v).astype(jnp.float32))


def _functions(kernels: dict, causal: bool, n: int, m: int, interpret: bool):
  """`{(row, mode): jitted fn(q, k, v)}`: dense first, then each kernel module."""
  on_gpu = jax.default_backend() == "gpu" and not interpret
  dense = functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                            implementation="cudnn" if on_gpu else "xla")
  attentions = {"cudnn dense" if on_gpu else "xla dense": dense}
  for name, module in kernels.items():
    attentions[name] = functools.partial(module.nm_flash_attention,
                                         is_causal=causal, n=n, m=m,
                                         interpret=interpret)
  fns = {}
  for row, attention in attentions.items():
    fns[row, "fwd"] = jax.jit(attention)
    fns[row, "fwd+bwd"] = jax.jit(jax.grad(functools.partial(_loss, attention),
                                           argnums=(0, 1, 2)))
  return fns


def max_relative_difference(got, want) -> float:
  """Largest `|got - want|` over `want`'s largest magnitude, across leaves."""
  worst = 0.0
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = g.astype(jnp.float32), w.astype(jnp.float32)
    scale = float(jnp.max(jnp.abs(w))) or 1.0
    worst = max(worst, float(jnp.max(jnp.abs(g - w))) / scale)
  return worst


def run(args, base_module) -> tuple[list[dict], list[dict]]:
  """(timing records, agreement records) over the grid of `args`."""
  kernels = {"tree": tree_triton, "base": base_module}
  records, agreement = [], []
  for seq in args.seq:
    batch = max(1, args.tokens // seq)
    shape = (batch, seq, args.heads, args.head_dim)
    keys = jax.random.split(jax.random.PRNGKey(args.seed + seq), 3)
    q, k, v = (jax.random.normal(key, shape, jnp.dtype(args.dtype)) for key in keys)
    for causal in args.causal:
      fns = _functions(kernels, causal, args.n, args.m, args.interpret)
      for mode in MODES:
        agreement.append(dict(seq=seq, causal=causal, mode=mode,
                              max_rel_diff=max_relative_difference(
                                  fns["tree", mode](q, k, v),
                                  fns["base", mode](q, k, v))))
      for round_ in range(args.rounds):
        for (row, mode), fn in fns.items():
          seconds = median_seconds(fn, q, k, v, warmup=1, iters=args.iters,
                                   calls=args.calls)
          records.append(dict(seq=seq, batch=batch, causal=causal, mode=mode,
                              row=row, round=round_, ms=1e3 * seconds))
  return records, agreement


def summarize(records: list[dict]) -> list[dict]:
  """Per (seq, causal, mode): median ms per row, x dense, tree / base."""
  times = collections.defaultdict(list)
  for r in records:
    times[r["seq"], r["causal"], r["mode"], r["row"]].append(r["ms"])
  cells = sorted({key[:3] for key in times})
  rows = []
  for seq, causal, mode in cells:
    med = {row: statistics.median(ms) for (s, c, md, row), ms in times.items()
           if (s, c, md) == (seq, causal, mode)}
    dense = next(row for row in med if row.endswith("dense"))
    rows.append(dict(seq=seq, causal=causal, mode=mode, dense_row=dense,
                     dense_ms=med[dense], tree_ms=med["tree"], base_ms=med["base"],
                     tree_x_dense=med[dense] / med["tree"],
                     base_x_dense=med[dense] / med["base"],
                     tree_over_base=med["tree"] / med["base"]))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--baseline", required=True,
                      help="folder holding one tools.baseline copy")
  parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192])
  parser.add_argument("--tokens", type=int, default=16384, help="batch * seq")
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--causal", type=lambda s: s.lower() in ("1", "true", "yes"),
                      nargs="+", default=[False, True])
  parser.add_argument("--n", type=int, default=2)
  parser.add_argument("--m", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--calls", type=int, default=5,
                      help="calls per synchronisation")
  parser.add_argument("--iters", type=int, default=10, help="samples per time")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--interpret", action="store_true",
                      help="Pallas interpret mode (CPU checks of this script)")
  parser.add_argument("--json", default=None,
                      help="output path (default $OUT/triton_ab.json, or ./)")
  args = parser.parse_args(argv)
  if args.rounds < 1 or args.calls < 1 or args.iters < 1:
    raise ValueError(f"rounds, calls and iters must be >= 1; got rounds="
                     f"{args.rounds}, calls={args.calls}, iters={args.iters}")

  records, agreement = run(args, baseline.load(args.baseline, "triton"))
  summary = summarize(records)
  for a in agreement:
    print(f"S={a['seq']} causal={a['causal']} {a['mode']}: tree vs base max "
          f"relative difference {a['max_rel_diff']:.3g}")
  print(f"{'S':>6} {'causal':>6} {'mode':>8} {'dense ms':>9} {'tree ms':>9} "
        f"{'x dense':>7} {'base ms':>9} {'x dense':>7} {'tree/base':>9}")
  for r in summary:
    print(f"{r['seq']:6d} {r['causal']!s:>6} {r['mode']:>8} {r['dense_ms']:9.3f} "
          f"{r['tree_ms']:9.3f} {r['tree_x_dense']:7.2f} {r['base_ms']:9.3f} "
          f"{r['base_x_dense']:7.2f} {r['tree_over_base']:9.3f}")
  path = args.json or os.path.join(os.environ.get("OUT", "."), "triton_ab.json")
  meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
              args=vars(args))
  with open(path, "w") as f:
    json.dump(dict(meta=meta, records=records, agreement=agreement,
                   summary=summary), f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
