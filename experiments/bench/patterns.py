"""Block-pattern attention against cuDNN dense and cuDNN given the pattern as a mask.

  python -m experiments.bench.patterns                      # the H200 matrix (~6 minutes)
  python -m experiments.bench.patterns --seq 16384 --causal False --modes fwd
  python -m experiments.bench.patterns --patterns topk --densities 0.25 0.125

One process, the same inputs for every row of a cell (bf16, `[batch, seq,
heads, head_dim]`, batch * seq fixed by `--tokens`, as
`experiments.bench.attention`). Patterns have square blocks of `--block`
positions (128: the Triton forward tile) and modes `[batch, heads, nq, nk]`:

  * "random": per (batch, head, query block), `ceil(density * nk)` key blocks
    drawn uniformly among the reachable ones (all of them, or those on or
    below the diagonal when causal), every one `NM`;
  * "topk": `nmattn.patterns.topk_blocks(q, k, density=...)` on the cell's
    own q and k: the dense diagonal block and first key block, then the
    highest pooled scores, `NM`. Its own cost is timed too (`pattern_ms`,
    and `pattern_fraction` of each attention row's time).

The same count rule for both, so a row keeps `min(ceil(density * nk),
reachable)` blocks; `block_fraction` is the measured fraction of the
reachable blocks kept. Rows, each timed forward ("fwd") and forward +
backward ("fwd_bwd", gradients of q, k, v):

  * "cudnn dense": `jax.nn.dot_product_attention(implementation="cudnn")`,
    no pattern: the baseline of `x_dense`;
  * "nmattn pallas_triton 2:4" and "... 4:4": `nmattn.nm_attention` with the
    pattern, 2:4 inside its blocks and n == m (plain block-sparse);
  * "cudnn masked": cuDNN given the pattern's element mask, a materialised
    bool `[batch, heads, seq, seq]` (what a JAX user does today; jax turns it
    into a bf16 bias, and the backward also writes that bias's gradient).
    Where the mask would pass `--mask-limit-gib` the row is skipped, saying
    so. The mask is an input of the timed call; building it is not timed.

The pattern (modes, or mask) is an argument of the compiled call, so each
row compiles once per (seq, causal, mode) and runs every pattern
(`--constant-patterns` bakes each pattern in as a constant instead). Each
timing: one warm-up call, then the median of at least `--iters` calls and
`--seconds` of them (`experiments.bench.timing.median_seconds`). TFLOP/s are
dense-equivalent (`4*B*H*S^2*D` forward, half when causal, x3.5 with the
backward), so they exceed dense's where blocks are skipped. `over_proportional`
is a row's time over its time at density 1 of the same pattern kind, divided
by the ratio of their block fractions: 1 = time proportional to the blocks
kept. In fwd cells, `check_rel_err` compares nmattn n == m with cuDNN masked
on the same pattern (the same attention up to rounding).

Prints a table; with $OUT set (or `--json`) writes the records as JSON
(after every cell, so a cut-off run keeps its data). On a CPU the rows run
through `--implementation xla --dense-implementation xla` at tiny sizes
(tests/test_bench_patterns.py); times there say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import nmattn
from experiments.bench.attention import BENCH_BACKENDS, inputs
from experiments.bench.timing import attention_flops, median_seconds
from nmattn import patterns
from nmattn._validation import canonicalize
from nmattn.attention import resolve_implementation

DENSITIES = (1.0, 0.5, 0.25, 0.125)
PATTERN_KINDS = ("random", "topk")
NM_PAIRS = ((2, 4), (4, 4))
_BYTES_PER_MASK_ELEMENT = {"fwd": 3, "fwd_bwd": 5}  # bool + bf16 bias (+ its gradient)


def reachable_blocks(seq: int, block: int, is_causal: bool) -> np.ndarray:
  """bool `[nq, nk]`: the blocks a call can reach (on or below the diagonal if causal)."""
  nb = patterns.num_blocks(seq, block)
  if not is_causal:
    return np.ones((nb, nb), bool)
  return patterns.causal(seq, seq, block_q=block, block_k=block).modes[0, 0] != 0


def block_count(seq: int, block: int, density: float) -> int:
  """Key blocks kept per query block at `density`: topk_blocks's rule."""
  return int(math.ceil(density * patterns.num_blocks(seq, block)))


def random_modes(key, *, batch: int, heads: int, seq: int, block: int,
                 density: float, is_causal: bool):
  """int8 `[batch, heads, nq, nk]`: `block_count` reachable blocks per row, uniformly, NM."""
  reachable = reachable_blocks(seq, block, is_causal)
  priority = jax.random.uniform(key, (batch, heads) + reachable.shape)
  priority = jnp.where(reachable, priority, -1.0)
  rank = jnp.argsort(jnp.argsort(-priority, axis=-1), axis=-1)
  kept = (rank < block_count(seq, block, density)) & reachable
  return jnp.where(kept, jnp.int8(patterns.NM), jnp.int8(patterns.SKIP))


_random_modes = jax.jit(random_modes, static_argnames=(
    "batch", "heads", "seq", "block", "density", "is_causal"))


def element_mask(modes, block: int, seq: int):
  """bool `[batch, heads, seq, seq]`: True in every pair of a block that is not SKIP."""
  kept = modes != patterns.SKIP
  kept = jnp.repeat(jnp.repeat(kept, block, axis=2), block, axis=3)
  return kept[:, :, :seq, :seq]


def _forward_and_backward(attention):
  """`attention(q, k, v, *extra)` -> `(q, k, v, cotangent, *extra) -> (dq, dk, dv)`."""
  def loss(q, k, v, cotangent, *extra):
    return jnp.sum(attention(q, k, v, *extra).astype(jnp.float32) * cotangent)
  return jax.grad(loss, argnums=(0, 1, 2))


class _Row:
  """One attention row: its name, `fn(q, k, v, *extra)`, and how it takes a pattern."""

  def __init__(self, name, fn, takes, nm=None, implementation=None):
    self.name, self.fn, self.takes = name, fn, takes  # takes: None, "modes", "mask"
    self.nm = nm  # (n, m) of an nmattn row
    self.implementation = implementation  # its Backend (None: auto)


def make_rows(args, is_causal: bool) -> list[_Row]:
  """The rows of a cell, filtered by `--rows`."""
  dense_impl, block = args.dense_implementation, args.block

  def dense(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal,
                                        implementation=dense_impl)

  def masked(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                        implementation=dense_impl)

  def patterned(n, m, backend):
    def attention(q, k, v, modes):
      pattern = nmattn.BlockPattern(modes, block, block)
      return nmattn.nm_attention(q, k, v, is_causal=is_causal, n=n, m=m,
                                 block_pattern=pattern, implementation=backend)
    return attention

  rows = [_Row(f"{dense_impl} dense", dense, None)]
  for name in args.implementation:
    backend = resolve_implementation(BENCH_BACKENDS.get(name, name))
    rows += [_Row(f"nmattn {name or 'auto'} {n}:{m}", patterned(n, m, backend),
                  "modes", (n, m), backend) for n, m in args.nm]
  rows.append(_Row(f"{dense_impl} masked", masked, "mask"))
  return [r for r in rows if not args.rows or any(s in r.name for s in args.rows)]


def _unsupported(args, row, q, k, v, is_causal, modes) -> str | None:
  """Why the row's nmattn backend cannot run this patterned call, or None."""
  if row.takes != "modes" or row.implementation is None:
    return None
  n, m = row.nm
  spec = canonicalize(q, k, v, is_causal=is_causal, n=n, m=m,
                      block_pattern=nmattn.BlockPattern(modes, args.block,
                                                        args.block))[0].spec
  return row.implementation.unsupported_reason(spec)


def _timed(compiled, operands, args) -> float:
  return median_seconds(compiled, *operands, warmup=1, iters=args.iters,
                        min_seconds=args.seconds)


def _compile(fn, operands):
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*operands).compile()
  return compiled, time.perf_counter() - start


def _error(e: Exception) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def build_patterns(args, q, k, seq: int, is_causal: bool) -> list[dict]:
  """Every (kind, density) pattern of a cell: modes, block fraction, topk's own time."""
  batch, heads = q.shape[0], q.shape[2]
  reachable = reachable_blocks(seq, args.block, is_causal)
  out = []
  for kind in args.patterns:
    for i, density in enumerate(args.densities):
      entry = dict(pattern=kind, density=density)
      if kind == "random":
        modes = _random_modes(
            jax.random.fold_in(jax.random.key(args.seed + 1), i), batch=batch,
            heads=heads, seq=seq, block=args.block, density=density,
            is_causal=is_causal)
      else:
        def topk(q, k, density=density):
          return patterns.topk_blocks(q, k, block_q=args.block, block_k=args.block,
                                      density=density, is_causal=is_causal).modes
        compiled, _ = _compile(topk, (q, k))
        modes = compiled(q, k)
        entry["pattern_ms"] = _timed(compiled, (q, k), args) * 1e3
      kept = np.asarray(modes != patterns.SKIP)
      entry["modes"] = modes
      entry["block_fraction"] = float(kept.sum() / (reachable.sum() * batch * heads))
      out.append(entry)
  return out


def run_cell(args, rows, q, k, v, cotangent, seq, is_causal, mode,
             pattern_list) -> list[dict]:
  """Every row and pattern of one (seq, causal, mode) cell."""
  batch, heads, head_dim = q.shape[0], q.shape[2], q.shape[3]
  flops = attention_flops(batch, heads, seq, seq, head_dim, causal=is_causal,
                          backward=mode == "fwd_bwd")
  base = dict(seq=seq, batch=batch, heads=heads, head_dim=head_dim,
              causal=is_causal, mode=mode, block=args.block)
  mask_gib = batch * heads * seq * seq * _BYTES_PER_MASK_ELEMENT[mode] / 2**30
  mask_skip = None
  if mask_gib > args.mask_limit_gib:
    mask_skip = (f"element mask [{batch}, {heads}, {seq}, {seq}] needs ~"
                 f"{mask_gib:.0f} GiB (bool, cuDNN's bf16 bias"
                 f"{' and its gradient' if mode == 'fwd_bwd' else ''}) > "
                 f"--mask-limit-gib {args.mask_limit_gib:g}")
  # nmattn n == m outputs kept for the masked row's check (fwd only).
  check = mode == "fwd" and mask_skip is None and any(r.takes == "mask" for r in rows)
  records, block_sparse = [], {}
  for row in rows:
    fn = row.fn if mode == "fwd" else _forward_and_backward(row.fn)
    operands = (q, k, v) if mode == "fwd" else (q, k, v, cotangent)
    compiled, compile_s = None, None
    for entry in [None] if row.takes is None else pattern_list:
      record = dict(base, row=row.name)
      if entry is not None:
        record.update({key: entry[key] for key in (
            "pattern", "density", "block_fraction", "pattern_ms") if key in entry})
      try:
        reason = mask_skip if row.takes == "mask" else None
        if reason is None and entry is not None:
          reason = _unsupported(args, row, q, k, v, is_causal, entry["modes"])
        if reason:
          record["skipped"] = reason
        else:
          extra = ()
          if row.takes == "modes":
            extra = (entry["modes"],)
          elif row.takes == "mask":
            extra = (element_mask(entry["modes"], args.block, seq),)
          if args.constant_patterns and extra:
            constant = np.asarray(extra[0])
            call = lambda *a, fn=fn, c=constant: fn(*a, c)
            compiled, compile_s = _compile(call, operands)
            timed_operands = operands
          else:
            if compiled is None:
              compiled, compile_s = _compile(fn, operands + extra)
            timed_operands = operands + extra
          sec = _timed(compiled, timed_operands, args)
          record.update(ms=sec * 1e3, tflops=flops / sec / 1e12,
                        compile_s=compile_s)
          compile_s = None  # reported once per compile
          if check and entry is not None:
            key = (entry["pattern"], entry["density"])
            if row.nm is not None and row.nm[0] == row.nm[1]:
              block_sparse[key] = (compiled(*timed_operands), record)
            elif row.takes == "mask" and key in block_sparse:
              got, target = block_sparse.pop(key)
              target["check_rel_err"] = float(
                  _rel_err(got, compiled(*timed_operands)))
          del extra, timed_operands
      except Exception as e:  # pylint: disable=broad-except
        record["error"] = _error(e)
        if args.verbose:
          import traceback  # pylint: disable=g-import-not-at-top
          traceback.print_exc()
      records.append(record)
      _print_record(record)
  return records


@jax.jit
def _rel_err(x, reference):
  x, reference = x.astype(jnp.float32), reference.astype(jnp.float32)
  return jnp.linalg.norm(x - reference) / jnp.linalg.norm(reference)


def add_ratios(records):
  """x_dense, over_proportional and pattern_fraction, within each (seq, causal, mode) cell."""
  cells = {}
  for r in records:
    cells.setdefault((r["seq"], r["causal"], r["mode"]), []).append(r)
  for cell in cells.values():
    dense = next((r for r in cell if "pattern" not in r and "ms" in r), None)
    for r in cell:
      if "ms" not in r:
        continue
      if dense is not None:
        r["x_dense"] = dense["ms"] / r["ms"]
      if "pattern" in r:
        full = next((f for f in cell if f["row"] == r["row"] and "ms" in f
                     and f["pattern"] == r["pattern"] and f["density"] == 1.0),
                    None)
        if full is not None:
          r["over_proportional"] = ((r["ms"] / full["ms"])
                                    / (r["block_fraction"] / full["block_fraction"]))
        if "pattern_ms" in r:
          r["pattern_fraction"] = r["pattern_ms"] / r["ms"]


def _print_record(r):
  head = (f"S={r['seq']} causal={r['causal']} {r['mode']} {r['row']}"
          + (f" {r['pattern']} {r['density']:g}" if "pattern" in r else ""))
  if "ms" in r:
    print(f"{head}: {r['ms']:.3f} ms {r['tflops']:.1f} TFLOP/s", flush=True)
  else:
    print(f"{head}: {r.get('skipped') or r.get('error')}", flush=True)


def print_table(records):
  print(f"\n{'S':>6} {'causal':>6} {'mode':>7} {'row':26} {'pattern':>7} "
        f"{'dens':>5} {'blocks':>6} {'ms':>9} {'TFLOP/s':>8} {'x dense':>7} "
        f"{'/prop':>6} {'topk %':>6}")
  for r in records:
    pattern = r.get("pattern", "")
    density = f"{r['density']:g}" if "density" in r else ""
    blocks = f"{r['block_fraction']:.3f}" if "block_fraction" in r else ""
    lead = (f"{r['seq']:>6} {str(r['causal']):>6} {r['mode']:>7} {r['row']:26} "
            f"{pattern:>7} {density:>5} {blocks:>6}")
    if "ms" not in r:
      why = r.get("skipped") or r.get("error")
      print(f"{lead} {'skipped' if 'skipped' in r else 'error':>9}  {why[:60]}")
      continue
    opt = lambda key, fmt: format(r[key], fmt) if key in r else ""
    topk = f"{100 * r['pattern_fraction']:.1f}" if "pattern_fraction" in r else ""
    print(f"{lead} {r['ms']:9.3f} {r['tflops']:8.1f} {opt('x_dense', '7.2f'):>7} "
          f"{opt('over_proportional', '6.2f'):>6} {topk:>6}")


def save(args, records, elapsed):
  path = args.json
  if path is None and os.environ.get("OUT"):
    path = os.path.join(os.environ["OUT"], "bench_patterns.json")
  if not path:
    return None
  device = jax.devices()[0]
  meta = dict(device=device.device_kind, platform=device.platform,
              jax=jax.__version__, date=datetime.date.today().isoformat(),
              elapsed_s=elapsed, args=vars(args))
  with open(path, "w") as f:
    json.dump(dict(meta=meta, records=records), f, indent=1)
  return path


def run(args) -> list[dict]:
  start = time.perf_counter()
  records = []
  for seq in args.seq:
    if seq % args.block:
      raise ValueError(f"--seq must be multiples of --block={args.block}; got {seq}")
    q, k, v, cotangent = inputs(seq, args.head_dim, args.tokens, args.heads,
                                args.seed)
    for is_causal in args.causal:
      over = time.perf_counter() - start > args.budget_s > 0
      pattern_list = [] if over else build_patterns(args, q, k, seq, is_causal)
      rows = make_rows(args, is_causal)
      for mode in args.modes:
        if over or time.perf_counter() - start > args.budget_s > 0:
          over = True
          records.append(dict(seq=seq, causal=is_causal, mode=mode, row="*",
                              skipped=f"--budget-s {args.budget_s:g} spent"))
          _print_record(records[-1])
          continue
        records += run_cell(args, rows, q, k, v, cotangent, seq, is_causal, mode,
                            pattern_list)
        add_ratios(records)
        save(args, records, time.perf_counter() - start)
      del pattern_list
  elapsed = time.perf_counter() - start
  print(f"elapsed {elapsed:.0f} s")
  return records, save(args, records, elapsed)


def _bool(s: str) -> bool:
  if s.lower() not in ("true", "false", "1", "0"):
    raise argparse.ArgumentTypeError(f"expected True or False; got {s!r}")
  return s.lower() in ("true", "1")


def _nm(s: str) -> tuple[int, int]:
  try:
    n, m = (int(x) for x in s.split(":"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected n:m such as 2:4; got {s!r}") from None
  return n, m


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
  parser.add_argument("--causal", type=_bool, nargs="+", default=[False, True])
  parser.add_argument("--modes", nargs="+", choices=("fwd", "fwd_bwd"),
                      default=["fwd", "fwd_bwd"])
  parser.add_argument("--patterns", nargs="+", choices=PATTERN_KINDS,
                      default=list(PATTERN_KINDS))
  parser.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
  parser.add_argument("--nm", type=_nm, nargs="+", default=list(NM_PAIRS),
                      help="n:m of the nmattn rows")
  parser.add_argument("--rows", nargs="*", default=[],
                      help="keep only rows whose name contains one of these")
  parser.add_argument("--block", type=int, default=128, help="pattern block size")
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--tokens", type=int, default=16384, help="batch * seq")
  parser.add_argument("--implementation", nargs="+", default=["pallas_triton"],
                      help="nmattn backends of the patterned rows (auto: None; "
                      "pallas_mosaic+bwd: with the Hopper backward)")
  parser.add_argument("--dense-implementation", default="cudnn",
                      choices=("cudnn", "xla"), help="jax.nn backend of the baselines")
  parser.add_argument("--mask-limit-gib", type=float, default=40.0,
                      help="skip cuDNN masked where its mask and bias pass this")
  parser.add_argument("--constant-patterns", action="store_true",
                      help="compile every pattern in as a constant")
  parser.add_argument("--iters", type=int, default=3, help="timed calls at least")
  parser.add_argument("--seconds", type=float, default=0.05,
                      help="timed calls for at least this long")
  parser.add_argument("--budget-s", type=float, default=420.0,
                      help="start no new cell after this long (0: no limit)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default=None, help="output path (default $OUT/...)")
  parser.add_argument("--verbose", action="store_true")
  args = parser.parse_args(argv)
  args.implementation = [None if i == "auto" else i for i in args.implementation]
  for density in args.densities:
    if not 0 < density <= 1:
      parser.error(f"--densities must be in (0, 1]; got {density}")
  return args


def main(argv=None):
  args = parse_args(argv)
  records, path = run(args)
  print_table(records)
  if path:
    print(f"wrote {path}")
  return records


if __name__ == "__main__":
  main()
