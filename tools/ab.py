"""The work tree's `nm_attention` against an older commit's, in one process.

How docs/BENCHMARKS.md times a change to `nmattn` or `pallas_kernels`:

  python -m tools.baseline COMMIT DIR                      # here: needs git
  python3 -m tools.ab --baseline DIR --seq 4096 8192 \\
      --impl pallas_triton pallas_mosaic --nm 2:4 4:4      # GPU, DIR carried

For every sequence length and causal flag, on the same random inputs: the
dense row (`jax.nn.dot_product_attention`, cuDNN on a GPU for 16-bit inputs,
XLA otherwise), then for each `--impl` and `--nm` the tree's and the
baseline's `nm_attention(..., n=, m=, implementation=)`, forward and
forward+backward. Only the public API is called, the same in both versions.
First the two versions' outputs and gradients are compared (the run stops
if they differ by more than `--max-diff`); then every row is timed
`--rounds` times in turn, the tree twice per round (tree, base, tree again)
so that tree / tree shows the noise beside tree / base. A time is the median
of samples of `--calls` calls each (`timing.median_seconds`). Prints the
medians and ratios; writes JSON to `--json`, else `$OUT/ab.json`.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import math
import os
import statistics

import jax
import jax.numpy as jnp

from experiments.bench.timing import median_seconds
import nmattn
from tools import baseline

MODES = ("fwd", "fwd+bwd")
IMPLEMENTATIONS = ("pallas_triton", "pallas_mosaic", "None", "xla")
# Timed per (impl, n:m) cell and round, in this order.
VERSIONS = ("tree", "base", "tree again")


def parse_nm(text: str) -> tuple[int, int]:
  """`"2:4"` -> `(2, 4)`."""
  n, sep, m = text.partition(":")
  if not (sep and n.isdigit() and m.isdigit()):
    raise ValueError(f"--nm must be n:m with integers n and m; got {text!r}")
  return int(n), int(m)


def _dense_row(dtype) -> tuple[str, str]:
  """(row label, `jax.nn.dot_product_attention` implementation) of the dense row."""
  if jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16):
    return "cudnn dense", "cudnn"
  return "xla dense", "xla"


def _jitted(attention) -> dict:
  """`{mode: jitted fn}`; fwd+bwd takes the output's cotangent as a fourth input."""

  def loss(q, k, v, cotangent):
    return jnp.sum(attention(q, k, v).astype(jnp.float32) * cotangent)

  return {"fwd": jax.jit(attention),
          "fwd+bwd": jax.jit(jax.grad(loss, argnums=(0, 1, 2)))}


def max_relative_difference(got, want) -> float:
  """Largest `|got - want|` over `want`'s largest magnitude, across leaves (NaN if any is)."""
  worst = 0.0
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = g.astype(jnp.float32), w.astype(jnp.float32)
    scale = float(jnp.max(jnp.abs(w))) or 1.0
    diff = float(jnp.max(jnp.abs(g - w))) / scale
    if math.isnan(diff):
      return math.nan
    worst = max(worst, diff)
  return worst


def check_agreement(agreement: list[dict], max_diff: float) -> None:
  """Raises ValueError naming the first cell whose tree and base differ beyond `max_diff`."""
  for a in agreement:
    if not a["max_rel_diff"] <= max_diff:  # a NaN fails too
      raise ValueError(
          f"tree and base disagree at S={a['seq']} causal={a['causal']} "
          f"impl={a['impl']} nm={a['nm']} {a['mode']}: max relative difference "
          f"{a['max_rel_diff']:.3g} > --max-diff={max_diff:g}; nothing timed")


def run(args, base_nmattn) -> tuple[list[dict], list[dict]]:
  """(timing records, agreement records) over the grid of `args`."""
  dtype = jnp.dtype(args.dtype)
  dense_label, dense_impl = _dense_row(dtype)
  records, agreement = [], []
  for seq in args.seq:
    batch = max(1, args.tokens // seq)
    shape = (batch, seq, args.heads, args.head_dim)
    keys = jax.random.split(jax.random.PRNGKey(args.seed + seq), 4)
    q, k, v, cotangent = (jax.random.normal(key, shape, dtype) for key in keys)
    inputs = {"fwd": (q, k, v), "fwd+bwd": (q, k, v, cotangent)}
    for causal in args.causal:
      # (impl, nm, version) -> {mode: fn}; the dense row's impl and nm are None.
      rows = {(None, None, "dense"): _jitted(functools.partial(
          jax.nn.dot_product_attention, is_causal=causal,
          implementation=dense_impl))}
      for impl in args.impl:
        for n, m in args.nm:
          versions = {}
          for version, module in (("tree", nmattn), ("base", base_nmattn)):
            versions[version] = _jitted(functools.partial(
                module.nm_attention, is_causal=causal, n=n, m=m,
                implementation=None if impl == "None" else impl))
          versions["tree again"] = versions["tree"]
          cell = []
          for mode in MODES:
            cell.append(dict(seq=seq, causal=causal, impl=impl, nm=f"{n}:{m}",
                             mode=mode, max_rel_diff=max_relative_difference(
                                 versions["tree"][mode](*inputs[mode]),
                                 versions["base"][mode](*inputs[mode]))))
          check_agreement(cell, args.max_diff)
          agreement += cell
          rows.update({(impl, f"{n}:{m}", version): versions[version]
                       for version in VERSIONS})
      for round_ in range(args.rounds):
        for (impl, nm, version), fns in rows.items():
          for mode in MODES:
            seconds = median_seconds(fns[mode], *inputs[mode], warmup=1,
                                     iters=args.iters, calls=args.calls)
            records.append(dict(seq=seq, batch=batch, causal=causal, mode=mode,
                                impl=impl, nm=nm, version=version,
                                row=dense_label if version == "dense" else version,
                                round=round_, ms=1e3 * seconds))
  return records, agreement


def summarize(records: list[dict]) -> list[dict]:
  """Per (seq, causal, mode, impl, nm): median ms per version, x dense, tree / base, tree / tree."""
  times = collections.defaultdict(list)
  dense = {}
  for r in records:
    if r["version"] == "dense":
      dense.setdefault((r["seq"], r["causal"], r["mode"]), (r["row"], []))[1].append(r["ms"])
    else:
      times[r["seq"], r["causal"], r["mode"], r["impl"], r["nm"], r["version"]].append(r["ms"])
  cells = sorted({key[:5] for key in times}, key=lambda c: (c[0], c[1], MODES.index(c[2]), c[3], c[4]))
  rows = []
  for seq, causal, mode, impl, nm in cells:
    med = {version: statistics.median(times[seq, causal, mode, impl, nm, version])
           for version in VERSIONS}
    dense_label, dense_ms = dense[seq, causal, mode]
    dense_ms = statistics.median(dense_ms)
    rows.append(dict(seq=seq, causal=causal, mode=mode, impl=impl, nm=nm,
                     dense_row=dense_label, dense_ms=dense_ms,
                     tree_ms=med["tree"], tree_again_ms=med["tree again"],
                     base_ms=med["base"], tree_x_dense=dense_ms / med["tree"],
                     base_x_dense=dense_ms / med["base"],
                     tree_over_base=med["tree"] / med["base"],
                     tree_over_tree=med["tree again"] / med["tree"]))
  return rows


def format_table(summary: list[dict]) -> str:
  lines = [f"{'S':>6} {'causal':>6} {'mode':>8} {'impl':>13} {'n:m':>5} "
           f"{'dense ms':>9} {'tree ms':>9} {'x dense':>7} {'base ms':>9} "
           f"{'x dense':>7} {'tree/base':>9} {'tree/tree':>9}"]
  for r in summary:
    lines.append(
        f"{r['seq']:6d} {r['causal']!s:>6} {r['mode']:>8} {r['impl']:>13} "
        f"{r['nm']:>5} {r['dense_ms']:9.3f} {r['tree_ms']:9.3f} "
        f"{r['tree_x_dense']:7.2f} {r['base_ms']:9.3f} {r['base_x_dense']:7.2f} "
        f"{r['tree_over_base']:9.3f} {r['tree_over_tree']:9.3f}")
  return "\n".join(lines)


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
  parser.add_argument("--impl", nargs="+", choices=IMPLEMENTATIONS,
                      default=["pallas_triton"],
                      help="nm_attention implementation; None is the default dispatch")
  parser.add_argument("--nm", type=parse_nm, nargs="+", default=[(2, 4)],
                      help="n:m pairs, e.g. 2:4 4:4")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--calls", type=int, default=5,
                      help="calls per synchronisation")
  parser.add_argument("--iters", type=int, default=10, help="samples per time")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max-diff", type=float, default=2e-2,
                      help="largest tree vs base relative difference accepted")
  parser.add_argument("--json", default=None,
                      help="output path (default $OUT/ab.json, or ./ab.json)")
  args = parser.parse_args(argv)
  if args.rounds < 1 or args.calls < 1 or args.iters < 1:
    raise ValueError(f"rounds, calls and iters must be >= 1; got rounds="
                     f"{args.rounds}, calls={args.calls}, iters={args.iters}")
  if not args.max_diff >= 0:
    raise ValueError(f"--max-diff must be >= 0; got {args.max_diff}")

  base_nmattn = baseline.load(args.baseline, "nmattn")
  records, agreement = run(args, base_nmattn)
  summary = summarize(records)
  for a in agreement:
    print(f"S={a['seq']} causal={a['causal']} {a['impl']} {a['nm']} {a['mode']}: "
          f"tree vs base max relative difference {a['max_rel_diff']:.3g}")
  print(format_table(summary))
  path = args.json or os.path.join(os.environ.get("OUT", "."), "ab.json")
  meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
              baseline=base_nmattn.__name__,
              args=dict(vars(args), nm=[f"{n}:{m}" for n, m in args.nm]))
  with open(path, "w") as f:
    json.dump(dict(meta=meta, records=records, agreement=agreement,
                   summary=summary), f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
