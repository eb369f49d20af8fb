"""N:M attention speed against dense baselines, in one process on the same inputs.

  python -m experiments.bench.attention                      # the full matrix
  python -m experiments.bench.attention --seq 4096 --head-dims 128 --modes fwd
  python -m experiments.bench.attention --sweep --seq 4096   # TuningConfig sweep

Rows: every N:M backend of `nmattn` that can run the call here (so
"pallas_mosaic" rows appear where that backend runs), cuDNN dense
(`jax.nn.dot_product_attention(implementation="cudnn")`), XLA dense, and
tokamax's `dot_product_attention` when it imports. bf16, batch * seq fixed
(`--tokens`) so batch * heads fills the GPU at every length. Each cell: compile,
then the median of synchronised calls (at least 3, about `--seconds` of
calls). TFLOP/s counts dense FLOPs (`4*B*H*Sq*Sk*D` forward, half when causal,
x3.5 with the backward), so rows compare directly. Prints a table; with $OUT
set (or `--json`) writes the records as JSON (plot: `plot_attention.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import statistics
import time
import traceback
from typing import Callable

import jax
import jax.numpy as jnp

import nmattn
from experiments.bench.timing import attention_flops
from nmattn import backends
from nmattn._validation import canonicalize

# (label, implementation, n, m) of the nmattn rows; a row is kept where it
# can run. `None` at 4:4 is the dense path a user gets (cuDNN on a GPU);
# "pallas_mosaic" differentiates the Hopper forward as it ships (the Hopper
# backward where it takes the call), "pallas_mosaic+bwd" with the Hopper
# backward always, "pallas_mosaic+triton_bwd" with the Triton backward.
BENCH_BACKENDS = {
    "pallas_mosaic+bwd": backends.PallasMosaic(vjp=backends.MosaicBackward()),
    "pallas_mosaic+triton_bwd": backends.PallasMosaic(vjp=backends.PallasTriton())}
SPARSE_ROWS = (("pallas_mosaic", "pallas_mosaic", 2, 4),
               ("pallas_mosaic+bwd", BENCH_BACKENDS["pallas_mosaic+bwd"], 2, 4),
               ("pallas_mosaic+bwd", BENCH_BACKENDS["pallas_mosaic+bwd"], 4, 4),
               ("pallas_mosaic+triton_bwd",
                BENCH_BACKENDS["pallas_mosaic+triton_bwd"], 2, 4),
               ("pallas_triton", "pallas_triton", 2, 4),
               ("pallas_triton", "pallas_triton", 1, 2), ("xla", "xla", 2, 4),
               ("auto", None, 4, 4))


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  attention: Callable  # (q, k, v, is_causal) -> out


def _dense_rows() -> list[Row]:
  rows = [
      Row("cudnn dense", lambda q, k, v, is_causal: jax.nn.dot_product_attention(
          q, k, v, is_causal=is_causal, implementation="cudnn")),
      Row("xla dense", lambda q, k, v, is_causal: jax.nn.dot_product_attention(
          q, k, v, is_causal=is_causal, implementation="xla")),
  ]
  try:
    import tokamax  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    print(f"tokamax unavailable: {type(e).__name__}: {e}")
  else:
    from absl import flags  # pylint: disable=g-import-not-at-top
    # tokamax reads absl flags, which would otherwise parse this script's argv.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    # tokamax's Mosaic GPU kernel by name: its default falls back silently.
    rows.append(Row("tokamax mosaic", lambda q, k, v, is_causal: tokamax.dot_product_attention(
        q, k, v, is_causal=is_causal, implementation="mosaic")))
  return rows


def sparse_rows(q, k, v) -> list[Row]:
  """The N:M rows whose backend supports these shapes on this device."""
  rows = []
  for label, implementation, n, m in SPARSE_ROWS:
    spec = canonicalize(q, k, v, n=n, m=m)[0].spec
    backend = backends.BACKENDS.get(implementation, implementation)
    reason = None if backend is None else backend.unsupported_reason(spec)
    if reason is not None:
      print(f"skipping {label} {n}:{m}: {reason}")
      continue
    rows.append(Row(f"nmattn {label} {n}:{m}",
                    functools.partial(_nm_attention, implementation=implementation,
                                      n=n, m=m)))
  return rows


def _nm_attention(q, k, v, is_causal, *, implementation, n, m):
  return nmattn.nm_attention(q, k, v, is_causal=is_causal, n=n, m=m,
                             implementation=implementation)


def _with_backward(attention):
  """(q, k, v, cotangent, is_causal) -> (dq, dk, dv): forward and backward."""
  def loss(q, k, v, cotangent, is_causal):
    out = attention(q, k, v, is_causal)
    return jnp.sum(out.astype(jnp.float32) * cotangent)

  return jax.grad(loss, argnums=(0, 1, 2))


def time_compiled(fn, args, seconds: float) -> tuple[float, float, int | None]:
  """(median seconds per call, compile seconds, XLA temp bytes) of jit(fn)(*args)."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  temp_bytes = getattr(memory, "temp_size_in_bytes", None) if memory else None
  jax.block_until_ready(compiled(*args))  # warm-up
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  first = time.perf_counter() - start
  iters = max(3, min(50, int(seconds / max(first, 1e-6))))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times), compile_seconds, temp_bytes


def inputs(seq: int, head_dim: int, tokens: int, heads: int, seed: int):
  batch = max(1, tokens // seq)
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (batch, seq, heads, head_dim)
  q, k, v, cotangent = (jax.random.normal(key, shape, jnp.float32) for key in keys)
  return (q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
          cotangent)


def run_matrix(args) -> list[dict]:
  records = []
  dense = _dense_rows()
  for head_dim in args.head_dims:
    for seq in args.seq:
      q, k, v, cotangent = inputs(seq, head_dim, args.tokens, args.heads, args.seed)
      rows = [r for r in sparse_rows(q, k, v) + dense
              if not args.rows or any(sel in r.name for sel in args.rows)]
      batch = q.shape[0]
      for causal in args.causal:
        for mode in args.modes:
          flops = attention_flops(batch, args.heads, seq, seq, head_dim,
                                  causal=causal, backward=mode == "fwd_bwd")
          for row in rows:
            record = dict(row=row.name, head_dim=head_dim, seq=seq, batch=batch,
                          heads=args.heads, causal=causal, mode=mode)
            if mode == "fwd":
              fn, operands = row.attention, (q, k, v)
            else:  # the cotangent is an argument: as a constant XLA folds it.
              fn, operands = _with_backward(row.attention), (q, k, v, cotangent)
            try:
              sec, compile_sec, temp = time_compiled(
                  functools.partial(fn, is_causal=causal), operands, args.seconds)
              record.update(ms=sec * 1e3, tflops=flops / sec / 1e12,
                            compile_s=compile_sec, temp_bytes=temp)
            except Exception as e:  # pylint: disable=broad-except
              record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
              if args.verbose:
                traceback.print_exc()
            records.append(record)
            _print_record(record)
            _add_ratios(records)
            save(args, records)
  return records


def _add_ratios(records):
  """ms of cuDNN dense and of xla 2:4 over ms of each row, per cell."""
  cells = {}
  for r in records:
    cells.setdefault((r["head_dim"], r["seq"], r["causal"], r["mode"]), {})[r["row"]] = r
  for cell in cells.values():
    for base, key in (("cudnn dense", "x_cudnn"), ("nmattn xla 2:4", "x_xla_2_4")):
      if "ms" in cell.get(base, {}):
        for r in cell.values():
          if "ms" in r:
            r[key] = cell[base]["ms"] / r["ms"]


def _print_record(r):
  if "error" in r:
    print(f"D={r['head_dim']} S={r['seq']} causal={r['causal']} {r['mode']} "
          f"{r['row']}: {r['error']}", flush=True)
  else:
    print(f"D={r['head_dim']} S={r['seq']} causal={r['causal']} {r['mode']} "
          f"{r['row']}: {r['ms']:.3f} ms {r['tflops']:.1f} TFLOP/s "
          f"(compile {r['compile_s']:.1f} s)", flush=True)


def print_table(records):
  print(f"\n{'D':>4} {'S':>6} {'causal':>6} {'mode':>7} {'row':28} {'ms':>9} "
        f"{'TFLOP/s':>8} {'x cuDNN':>8} {'x xla2:4':>8}")
  for r in records:
    if "error" in r:
      print(f"{r['head_dim']:>4} {r['seq']:>6} {str(r['causal']):>6} {r['mode']:>7} "
            f"{r['row']:28} {'error':>9}  {r['error'][:40]}")
      continue
    ratio = lambda key: f"{r[key]:8.2f}" if key in r else f"{'':8}"
    print(f"{r['head_dim']:>4} {r['seq']:>6} {str(r['causal']):>6} {r['mode']:>7} "
          f"{r['row']:28} {r['ms']:9.3f} {r['tflops']:8.1f} {ratio('x_cudnn')} "
          f"{ratio('x_xla_2_4')}")


# Candidate TuningConfigs for --sweep: forward fields, then backward fields.
FORWARD_SWEEP = (
    dict(block_q=128, block_k=128, num_warps=8, num_stages=2),
    dict(block_q=128, block_k=128, num_warps=8, num_stages=3),
    dict(block_q=128, block_k=64, num_warps=4, num_stages=3),
    dict(block_q=128, block_k=64, num_warps=8, num_stages=2),
    dict(block_q=64, block_k=128, num_warps=4, num_stages=2),
    dict(block_q=128, block_k=128, num_warps=4, num_stages=2),
)
BACKWARD_SWEEP = (
    dict(block_q_dq=64, block_k_dq=128, block_q_dkv=64, block_k_dkv=128,
         num_warps_bwd=8, num_stages_bwd=2),
    dict(block_q_dq=128, block_k_dq=64, block_q_dkv=32, block_k_dkv=128,
         num_warps_bwd=8, num_stages_bwd=2),
    dict(block_q_dq=64, block_k_dq=64, block_q_dkv=64, block_k_dkv=64,
         num_warps_bwd=4, num_stages_bwd=2),
    dict(block_q_dq=128, block_k_dq=64, block_q_dkv=64, block_k_dkv=128,
         num_warps_bwd=8, num_stages_bwd=3),
    dict(block_q_dq=64, block_k_dq=128, block_q_dkv=32, block_k_dkv=64,
         num_warps_bwd=4, num_stages_bwd=3),
    # Around the best of the above (64x64 tiles, 4 warps, 2 stages).
    dict(block_q_dq=64, block_k_dq=64, block_q_dkv=64, block_k_dkv=64,
         num_warps_bwd=4, num_stages_bwd=3),
    dict(block_q_dq=64, block_k_dq=64, block_q_dkv=64, block_k_dkv=64,
         num_warps_bwd=8, num_stages_bwd=2),
    dict(block_q_dq=64, block_k_dq=64, block_q_dkv=64, block_k_dkv=64,
         num_warps_bwd=2, num_stages_bwd=2),
    dict(block_q_dq=32, block_k_dq=64, block_q_dkv=64, block_k_dkv=64,
         num_warps_bwd=4, num_stages_bwd=2),
    dict(block_q_dq=64, block_k_dq=64, block_q_dkv=32, block_k_dkv=64,
         num_warps_bwd=4, num_stages_bwd=2),
    dict(block_q_dq=128, block_k_dq=64, block_q_dkv=64, block_k_dkv=64,
         num_warps_bwd=4, num_stages_bwd=2),
    dict(block_q_dq=64, block_k_dq=128, block_q_dkv=64, block_k_dkv=64,
         num_warps_bwd=4, num_stages_bwd=2),
    dict(block_q_dq=64, block_k_dq=64, block_q_dkv=128, block_k_dkv=64,
         num_warps_bwd=4, num_stages_bwd=2),
)


def run_sweep(args) -> list[dict]:
  """Times nmattn's pallas_triton 2:4 per TuningConfig, through the API.

  Each candidate runs as `implementation=backends.PallasTriton(config=...)`:
  the forward fields timed forward only ("fwd"), the backward fields timed
  forward + backward with the default forward fields ("fwd_bwd").
  """
  from pallas_kernels import triton as nm_triton  # pylint: disable=g-import-not-at-top
  records = []
  for head_dim in args.head_dims:
    for seq in args.seq:
      q, k, v, cotangent = inputs(seq, head_dim, args.tokens, args.heads, args.seed)
      batch = q.shape[0]
      for causal in args.causal:
        for part, sweep in (("fwd", FORWARD_SWEEP), ("bwd", BACKWARD_SWEEP)):
          if part not in args.sweep_parts:
            continue
          flops = attention_flops(batch, args.heads, seq, seq, head_dim,
                                  causal=causal, backward=part == "bwd")
          for fields in sweep:
            backend = backends.PallasTriton(config=nm_triton.TuningConfig(**fields))
            attention = functools.partial(_nm_attention, implementation=backend,
                                          n=2, m=4)
            if part == "fwd":
              fn, operands = attention, (q, k, v)
            else:
              fn, operands = _with_backward(attention), (q, k, v, cotangent)
            record = dict(part=part, head_dim=head_dim, seq=seq, causal=causal,
                          tuning=fields)
            try:
              sec, compile_sec, _ = time_compiled(
                  functools.partial(fn, is_causal=causal), operands, args.seconds)
              record.update(ms=sec * 1e3, tflops=flops / sec / 1e12,
                            compile_s=compile_sec)
              print(f"{part} D={head_dim} S={seq} causal={causal} {fields}: "
                    f"{sec * 1e3:.3f} ms {flops / sec / 1e12:.1f} TFLOP/s", flush=True)
            except Exception as e:  # pylint: disable=broad-except
              record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
              print(f"{part} {fields}: {record['error']}", flush=True)
            records.append(record)
            save(args, records)
  return records


def save(args, records):
  """Writes the JSON (again after every cell, so a cut-off run keeps its data)."""
  path = args.json
  if path is None and os.environ.get("OUT"):
    path = os.path.join(os.environ["OUT"],
                        f"bench_{'sweep' if args.sweep else 'attention'}.json")
  if not path:
    return None
  device = jax.devices()[0]
  meta = dict(device=device.device_kind, platform=device.platform,
              jax=jax.__version__, date=datetime.date.today().isoformat(),
              args=vars(args))
  with open(path, "w") as f:
    json.dump(dict(meta=meta, records=records), f, indent=1)
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seq", type=int, nargs="+",
                      default=[1024, 2048, 4096, 8192, 16384])
  parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--causal", type=lambda s: s.lower() in ("1", "true", "yes"),
                      nargs="+", default=[False, True])
  parser.add_argument("--modes", nargs="+", choices=("fwd", "fwd_bwd"),
                      default=["fwd", "fwd_bwd"])
  parser.add_argument("--rows", nargs="*", default=[],
                      help="keep only rows whose name contains one of these")
  parser.add_argument("--tokens", type=int, default=16384, help="batch * seq")
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--seconds", type=float, default=0.3,
                      help="about this long of timed calls per cell")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--sweep", action="store_true",
                      help="time TuningConfigs of the Triton kernel instead")
  parser.add_argument("--sweep-parts", nargs="+", choices=("fwd", "bwd"),
                      default=["fwd", "bwd"], help="kernels --sweep times")
  parser.add_argument("--json", default=None, help="output path (default $OUT/...)")
  parser.add_argument("--verbose", action="store_true")
  args = parser.parse_args(argv)

  records = run_sweep(args) if args.sweep else run_matrix(args)
  if not args.sweep:
    print_table(records)
  path = save(args, records)
  if path:
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
