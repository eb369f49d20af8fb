"""Device checks and timings of the Hopper kernel, in one process.

  python -m tools.mosaic_probe --out DIR [--sections micro,correct,select,time]
      [--sizes 4096,8192,16384] [--variants "2:4 sparse-pv,4:4 dense"] [--causal false,true]
      [--rounds 2] [--head-dim 64] [--calls 20] [--baseline DIR]

Sections:
  micro    one `wgmma.mma_async.sp` per selector on operands encoded on the
           host by `sparse_fragments.encode_sparse_a` (the PTX layout facts);
  correct  relative error and log-sum-exp against `nmattn.reference`;
  select   fraction of N:M groups the kernel selects differently from the
           reference (the kernel's P read out through one-hot values);
  time     forward milliseconds and dense-equivalent TFLOP/s against cuDNN;
  profile  mean time per step of each named region of the 2:4 sparse-PV
           kernel (Mosaic GPU profiler; trace JSON under DIR/profile);
  sass     per `--variants` kernel: ptxas registers and spills, and every
           loop's static schedule from the SASS control bits (stall cycles,
           scoreboard waits by producer; `tools.sass_schedule`);
           needs ptxas and cuobjdump on PATH; PTX and cubins under DIR/sass;
  ir       (CPU is enough) op counts of each `--variants` kernel's Mosaic GPU
           IR at head_dim 128, non-causal: comparisons, selects, min/max,
           float adds and multiplies, shuffles, inline PTX by mnemonic;
  ncu      each of cuDNN, the `--variants` and the Triton 2:4 kernel once per
           size and causal flag inside one CUDA profiler range, for Nsight
           Compute (measures nothing itself):
             XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --profile-from-start off \
                 --clock-control none --set full --import-source no -o REPORT \
                 python -m ...probe --sections ncu
           (without the variable ncu saves and restores JAX's whole memory
           pool around every replay: minutes per kernel)
           then `ncu -i REPORT.ncu-rep --page source --csv --print-source sass`
           and `summarize_ncu_source` for the stall reasons per instruction.
Writes DIR/probe.json (and DIR/micro.npz) and prints a short table last.
"""

from __future__ import annotations

import argparse
import collections
import csv
import ctypes
import functools
import io
import json
import math
import os
import re
import time
import traceback
from types import ModuleType
from typing import Callable, NamedTuple
from unittest import mock

import jax
import jax.numpy as jnp
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import ml_dtypes
import numpy as np

from experiments.bench.timing import attention_flops, median_seconds
import nmattn
from nmattn import masking, reference
from nmattn._validation import canonicalize
from pallas_kernels.mosaic_gpu import forward as fw
from pallas_kernels.mosaic_gpu import sparse_fragments as sf
from tools import mosaic_ir


def _micro_call(n_cols: int):
  """`acc = A_sparse @ V` for a 64x64 A (two K blocks, selectors 0 and 1)."""
  from jaxlib.mlir import ir  # pylint: disable=g-import-not-at-top
  from jaxlib.mlir.dialects import arith, memref  # pylint: disable=g-import-not-at-top
  from jax.experimental.mosaic.gpu import fragmented_array as fa  # pylint: disable=g-import-not-at-top
  from pallas_kernels.mosaic_gpu import mlir_ops  # pylint: disable=g-import-not-at-top
  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)

  @plgpu.inline_mgpu(
      arg_types=(plgpu.RefType(), plgpu.RefType(),
                 plgpu.RefType(transforms=(tiling, swizzle))),
      return_type=plgpu.ShapeDtypeStruct((64, n_cols), jnp.float32,
                                         plgpu.Layout.WGMMA))
  def mma(ctx, a_ref, meta_ref, v_smem):
    del ctx
    ops = mlir_ops.MlirOps()
    index = ir.IndexType.get()
    idx = lambda x: arith.index_cast(index, x)
    tid = idx(ops.thread_id())
    a_regs = [[memref.load(a_ref, [tid, idx(ops.i32(kb)), idx(ops.i32(i))])
               for i in range(4)] for kb in range(2)]
    words = [memref.load(meta_ref, [tid])]
    acc = fa.FragmentedArray.splat(ops.f32(0.0), (64, n_cols), fa.WGMMA_LAYOUT)
    return mlir_ops.sparse_mma(acc, a_regs, words, v_smem, swizzle=128)

  def body(a_ref, meta_ref, v_ref, out_ref):
    def scoped(v_smem, out_smem, bar):
      plgpu.copy_gmem_to_smem(v_ref, v_smem, bar)
      plgpu.barrier_wait(bar)
      out_smem[...] = mma(a_ref, meta_ref, v_smem)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_smem, out_ref)
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped,
                  plgpu.SMEM((64, n_cols), jnp.bfloat16, transforms=(tiling, swizzle)),
                  plgpu.SMEM((64, n_cols), jnp.float32,
                             transforms=(plgpu.TilingTransform((8, 32)),
                                         plgpu.SwizzleTransform(128))),
                  plgpu.Barrier())

  return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((64, n_cols), jnp.float32))


def section_micro(rng, out_dir):
  """Both selectors, head widths 64 and 128, metadata positions either way round."""
  rows = []
  for n_cols, descending in ((64, False), (128, False), (128, True)):
    dense = rng.standard_normal((64, 64)).astype(ml_dtypes.bfloat16)
    keep = np.zeros((64, 64), bool)
    for row in range(64):
      for chunk in range(16):
        keep[row, 4 * chunk + rng.choice(4, size=2, replace=False)] = True
    dense = np.where(keep, dense, 0).astype(ml_dtypes.bfloat16)
    v = rng.standard_normal((64, n_cols)).astype(ml_dtypes.bfloat16)
    a0, m0 = sf.encode_sparse_a(dense[:, :32], 0, descending=descending)
    a1, m1 = sf.encode_sparse_a(dense[:, 32:], 1, descending=descending)
    a_regs = np.stack([a0, a1], axis=1).view(np.int32)
    meta = (m0 | m1).view(np.int32)
    got = np.asarray(jax.jit(_micro_call(n_cols))(a_regs, meta, jnp.asarray(v)))
    want = dense.astype(np.float64) @ v.astype(np.float64)
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    order = "descending" if descending else "ascending"
    np.savez(os.path.join(out_dir, f"micro_{n_cols}_{order}.npz"),
             dense=dense.view(np.uint16), v=v.view(np.uint16), a_regs=a_regs,
             meta=meta, got=got)
    rows.append(dict(section="micro", n=n_cols, positions=order, rel_err=err))
  return rows


def _inputs(key, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype):
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (batch, q_len, heads, head_dim), dtype)
  k = jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim), dtype)
  v = jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim), dtype)
  return q, k, v


class Version(NamedTuple):
  """A kernel version: its row label, forward module and the `canonicalize` of its `nmattn`."""
  label: str
  forward: ModuleType
  canonicalize: Callable


# The versions whose variants the time, sass, ir and ncu sections run.
TREE = (Version("mosaic", fw, canonicalize),)


def _kernel_fn(tuning=None, *, is_causal=False, window=None, n=2, m=4,
               profile_dir=None, version=None):
  """The jitted kernel: `(q, k, v, bias, mask, q_lengths, kv_lengths) -> (out, lse)`.

  `version`: this tree's (default) or a `--baseline` copy's `Version`.
  """
  version = version or TREE[0]

  def kernel(q, k, v, bias, mask, q_lengths, kv_lengths):
    call, _ = version.canonicalize(
        q, k, v, bias, mask, is_causal=is_causal, query_seq_lengths=q_lengths,
        key_value_seq_lengths=kv_lengths, local_window_size=window, n=n, m=m)
    return version.forward.nm_flash_attention_fwd(call, tuning=tuning,
                                                  profile_dir=profile_dir)

  return jax.jit(kernel)


def _run_kernel(q, k, v, tuning, *, bias=None, mask=None, q_lengths=None,
                kv_lengths=None, **kwargs):
  return _kernel_fn(tuning, **kwargs)(q, k, v, bias, mask, q_lengths, kv_lengths)


CORRECT_CASES = [
    ("2:4 sparse-pv", {}, {}),
    ("2:4 dense-pv", {}, dict(sparse_pv=False)),
    ("4:4 dense", dict(n=4, m=4), {}),
    ("1:2 sparse-pv causal", dict(n=1, m=2, is_causal=True), {}),
    ("3:8 causal", dict(n=3, m=8, is_causal=True), {}),
    ("2:4 D64 fp16 gqa", dict(head_dim=64, dtype=jnp.float16, kv_heads=2), {}),
    ("2:4 ragged lengths", dict(q_len=300, kv_len=333, lengths=True), {}),
    ("2:4 bias+mask window", dict(extras=True, window=(70, 9)), {}),
]


def section_correct(key, tune_all=None):
  """`CORRECT_CASES`, each with its tuning updated by `tune_all`."""
  rows = []
  for name, case, tune in CORRECT_CASES:
    case, tune = dict(case), {**tune, **(tune_all or {})}
    shape = dict(batch=2, q_len=case.pop("q_len", 512), kv_len=case.pop("kv_len", 512),
                 heads=4, kv_heads=case.pop("kv_heads", 4),
                 head_dim=case.pop("head_dim", 128),
                 dtype=case.pop("dtype", jnp.bfloat16))
    key, k1, k2, k3 = jax.random.split(key, 4)
    q, k, v = _inputs(k1, **shape)
    kwargs = dict(is_causal=case.pop("is_causal", False),
                  window=case.pop("window", None), n=case.pop("n", 2),
                  m=case.pop("m", 4))
    extra = {}
    if case.pop("lengths", False):
      extra["q_lengths"] = jnp.array([shape["q_len"], 123], jnp.int32)
      extra["kv_lengths"] = jnp.array([shape["kv_len"] - 5, 200], jnp.int32)
    if case.pop("extras", False):
      extra["bias"] = jax.random.normal(k2, (1, 4, shape["q_len"], shape["kv_len"]))
      extra["mask"] = jax.random.uniform(k3, (2, 1, shape["q_len"], shape["kv_len"])) < 0.8
    assert not case, case
    try:
      out, lse = _run_kernel(q, k, v, fw.MosaicTuning(**tune), **extra, **kwargs)
      ref_kwargs = dict(bias=extra.get("bias"), mask=extra.get("mask"),
                        query_seq_lengths=extra.get("q_lengths"),
                        key_value_seq_lengths=extra.get("kv_lengths"),
                        is_causal=kwargs["is_causal"],
                        local_window_size=kwargs["window"], n=kwargs["n"],
                        m=kwargs["m"])
      ref = reference.nm_attention_reference(q, k, v, **ref_kwargs)
      call, _ = canonicalize(q, k, v, **ref_kwargs)
      s = reference.call_scores(call)
      kept = jnp.where(masking.nm_mask(s, kwargs["n"], kwargs["m"]), s, -jnp.inf)
      ref_lse = jax.nn.logsumexp(kept, axis=-1)
      finite = jnp.isfinite(ref_lse)
      err = float(jnp.linalg.norm((out - ref).astype(jnp.float32))
                  / jnp.linalg.norm(ref.astype(jnp.float32)))
      lse_err = float(jnp.max(jnp.where(finite, jnp.abs(lse - ref_lse), 0.0)))
      empty_ok = bool(jnp.all(jnp.where(finite, True, lse == jnp.inf)))
      rows.append(dict(section="correct", case=name, tune=tune, rel_err=err,
                       lse_max_abs_err=lse_err, empty_rows_inf=empty_ok,
                       finite=bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))))
    except Exception as e:  # pylint: disable=broad-except
      rows.append(dict(section="correct", case=name, error=f"{type(e).__name__}: {e}"[:4000],
                       trace=traceback.format_exc()[-4000:]))
  return rows


def section_select(key):
  """Reads the kernel's P through one-hot values (kv_len == head_dim == 128)."""
  rows = []
  batch, q_len, heads, kv_len = 4, 512, 8, 128
  for name, tune, (n, m) in (("2:4 sparse-pv", {}, (2, 4)),
                             ("2:4 dense-pv", dict(sparse_pv=False), (2, 4)),
                             ("3:8 dense-pv", {}, (3, 8))):
    key, k1 = jax.random.split(key)
    q, k, _ = _inputs(k1, batch, q_len, kv_len, heads, heads, 128, jnp.bfloat16)
    eye = jnp.eye(kv_len, 128, dtype=jnp.bfloat16)
    v = jnp.broadcast_to(eye[None, :, None, :], (batch, kv_len, heads, 128))
    try:
      out, _ = _run_kernel(q, k, v, fw.MosaicTuning(**tune), n=n, m=m)
      got_keep = jnp.transpose(out != 0, (0, 2, 1, 3))  # [B, H, T, S]
      call, _ = canonicalize(q, k, v, n=n, m=m)
      s = reference.call_scores(call)
      want_keep = masking.nm_mask(s, n, m)
      differ = jnp.any((got_keep != want_keep).reshape(batch, heads, q_len, -1, m), -1)
      weights = reference.call_weights(call)
      p_err = float(jnp.linalg.norm(jnp.transpose(out, (0, 2, 1, 3)).astype(jnp.float32)
                                    - weights) / jnp.linalg.norm(weights))
      kept_per_group = jnp.sum(got_keep.reshape(batch, heads, q_len, -1, m), -1)
      rows.append(dict(section="select", case=name,
                       group_mismatch=float(jnp.mean(differ)),
                       groups=int(differ.size), p_rel_err=p_err,
                       max_kept_per_group=int(jnp.max(kept_per_group))))
    except Exception as e:  # pylint: disable=broad-except
      rows.append(dict(section="select", case=name, error=f"{type(e).__name__}: {e}"[:4000],
                       trace=traceback.format_exc()[-4000:]))
  return rows


# (batch, heads) of the timed and profiled inputs per sequence length.
BATCH_HEADS = {4096: (4, 16), 8192: (2, 16), 16384: (1, 32)}

# Timed kernels: name -> (n, m, MosaicTuning fields); cuDNN is always timed first.
TIME_VARIANTS = {
    "2:4 sparse-pv": dict(n=2, m=4),
    "2:4 sparse-pv bk64 4-stage": dict(n=2, m=4, block_kv=64,
                                       max_concurrent_steps=4),
    "2:4 sparse-pv bk256": dict(n=2, m=4, block_kv=256),
    "2:4 dense-pv": dict(n=2, m=4, sparse_pv=False),
    "1:2 sparse-pv": dict(n=1, m=2),
    "4:4 dense": dict(n=4, m=4),
}
DEFAULT_TIME_VARIANTS = "2:4 sparse-pv,2:4 dense-pv,4:4 dense"


def _variant_kernel(cfg, version, is_causal=False):
  """`_kernel_fn` of a TIME_VARIANTS entry (n, m and MosaicTuning fields)."""
  tuning = {k: v for k, v in cfg.items() if k not in ("n", "m")}
  return _kernel_fn(version.forward.MosaicTuning(**tuning), is_causal=is_causal,
                    n=cfg["n"], m=cfg["m"], version=version)


def _time_fn(cfg, causal, version=None):
  if cfg is None:
    return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn"))
  kernel = _variant_kernel(cfg, version or TREE[0], causal)
  return lambda q, k, v: kernel(q, k, v, None, None, None, None)[0]


def _variants(names, versions):
  """`(row label, TIME_VARIANTS entry, Version)` for each name and version."""
  return [(f"{version.label} {name}", TIME_VARIANTS[name], version)
          for name in names for version in versions]


def section_time(key, sizes, names, causals=(False, True), rounds=1,
                 head_dim=128, calls=1, versions=TREE):
  """Every variant `rounds` times in turn (cuDNN first in each round).

  `calls`: calls per synchronisation (`median_seconds`); 1 gives the
  synchronised per-call wall clock, 20 the per-call time with dispatch
  overlapped (closer to the kernels' own, and less noisy).
  """
  rows = []
  variants = [("cudnn", None, None)] + _variants(names, versions)
  for seq in sizes:
    batch, heads = BATCH_HEADS[seq]
    key, k1 = jax.random.split(key)
    q, k, v = _inputs(k1, batch, seq, seq, heads, heads, head_dim, jnp.bfloat16)
    for causal in causals:
      flops = attention_flops(batch, heads, seq, seq, head_dim, causal=causal)
      base = None
      fns, compile_s = {}, {}
      for rnd, (name, cfg, version) in ((r, v) for r in range(rounds)
                                        for v in variants):
        try:
          if name not in fns:
            fns[name] = _time_fn(cfg, causal, version)
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name](q, k, v))
            compile_s[name] = time.perf_counter() - t0
          sec = median_seconds(fns[name], q, k, v, warmup=2, iters=10,
                               calls=calls)
          base = sec if cfg is None else base
          rows.append(dict(section="time", seq=seq, batch=batch, heads=heads,
                           head_dim=head_dim, causal=causal, variant=name,
                           round=rnd, calls=calls, ms=sec * 1e3,
                           tflops=flops / sec / 1e12, compile_s=compile_s[name],
                           vs_cudnn=None if base is None else base / sec))
        except Exception as e:  # pylint: disable=broad-except
          rows.append(dict(section="time", seq=seq, causal=causal, variant=name,
                           error=f"{type(e).__name__}: {e}"[:2000]))
  return rows


# IR op names (or inline-PTX mnemonics) counted by the ir section, by kind.
IR_KINDS = {
    "compare": ("arith.cmpf", "arith.cmpi"),
    "select": ("arith.select",),
    "min/max": ("max.NaN.f32", "min.NaN.f32", "arith.maximumf", "arith.minimumf"),
    "fadd": ("arith.addf", "arith.subf"),
    "fmul": ("arith.mulf",),
    "int": ("arith.addi", "arith.subi", "arith.muli", "arith.andi", "arith.ori",
            "arith.xori", "arith.shli", "arith.shrui"),
    "shuffle": ("gpu.shuffle", "nvvm.shfl.sync"),
}


def count_ir_ops(text: str) -> dict[str, int]:
  """Op names and inline-PTX mnemonics of an MLIR module's text, with counts."""
  counts = collections.Counter(re.findall(r"= ([a-z_]+\.[a-z_.0-9]+)[ (<]", text))
  counts.update(re.findall(
      r'llvm\.inline_asm (?:has_side_effects )?"([a-z][a-zA-Z0-9_.]*)', text))
  return dict(counts)


def section_ir(names, head_dim=128, seq=1024, versions=TREE):
  """Per variant: its kernel IR's op counts by `IR_KINDS`, and the total."""
  rows = []
  q = jax.ShapeDtypeStruct((1, seq, 2, head_dim), jnp.bfloat16)
  for name, cfg, version in _variants(names, versions):
    kernel = _variant_kernel(cfg, version)
    with mosaic_ir.captured_mosaic_gpu_modules() as texts:
      jax.export.export(kernel, platforms=["cuda"])(q, q, q, None, None, None,
                                                    None)
    counts = count_ir_ops(texts[-1])
    row = dict(section="ir", variant=name, head_dim=head_dim,
               total=sum(counts.values()))
    row.update({kind: sum(counts.get(op, 0) for op in ops)
                for kind, ops in IR_KINDS.items()})
    rows.append(row)
  return rows


def section_sass(names, out_dir, head_dim=128, seq=1024, versions=TREE):
  """Per variant: ptxas resources and the static schedule of every loop.

  Compiles each kernel with its PTX dumped (`MOSAIC_GPU_DUMP_TO`, read at
  every compilation), assembles it with the local ptxas and reads the SASS
  control bits (`tools.sass_schedule`).
  """
  from tools import sass_schedule  # pylint: disable=g-import-not-at-top
  rows = []
  q = jnp.ones((1, seq, 2, head_dim), jnp.bfloat16)
  for name, cfg, version in _variants(names, versions):
    dump = os.path.join(out_dir, "sass", re.sub(r"\W+", "_", name))
    os.makedirs(dump, exist_ok=True)
    with mock.patch.dict(os.environ, MOSAIC_GPU_DUMP_TO=dump):
      jax.block_until_ready(_variant_kernel(cfg, version)(q, q, q, None, None,
                                                          None, None))
    ptx = sorted(f for f in os.listdir(dump) if f.endswith(".ptx"))
    if not ptx:
      raise ValueError(f"no PTX was dumped into {dump} for {name}")
    for f in ptx:
      cubin, log = sass_schedule.assemble(os.path.join(dump, f))
      loops = sass_schedule.report(sass_schedule.parse_sass(
          sass_schedule.read_sass(cubin)))
      rows.append(dict(section="sass", variant=name, ptx=f,
                       **sass_schedule.ptxas_resources(log), loops=loops))
  return rows


ALU_REGIONS = ("select", "softmax")


def _overlap_ns(a, b):
  """Total length of the intersection of two sorted lists of intervals."""
  total, i, j = 0.0, 0, 0
  while i < len(a) and j < len(b):
    total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
    if a[i][1] < b[j][1]:
      i += 1
    else:
      j += 1
  return total


def summarize_trace(path, tracks_per_block=3):
  """Per region: count, mean ns, ns per step; and how the warpgroups overlap.

  Tracks are warpgroups (`tracks_per_block` per CTA, the consumers first).
  Returns `(regions, tracks, overlap)` where `overlap` is the fraction of
  the time some consumer warpgroup of a CTA spends in `ALU_REGIONS` during
  which both of the first two do.
  """
  with open(path) as f:
    events = json.load(f)["traceEvents"]
  durations, open_regions, alu = {}, {}, {}
  for e in events:  # "B"/"E" pairs per track (one warpgroup of one CTA)
    track = e["tid"]
    if e["ph"] == "B":
      open_regions.setdefault(track, []).append((e["name"], e["ts"]))
      continue
    name, start = open_regions[track].pop()
    durations.setdefault(name, []).append((e["ts"] - start) * 1e3)
    if name in ALU_REGIONS:
      alu.setdefault(track, []).append((start, e["ts"]))
  steps = len(durations.get("wait_k", ())) or 1
  regions = {name: dict(count=len(d), mean_ns=float(np.mean(d)),
                        ns_per_step=float(np.sum(d)) / steps)
             for name, d in durations.items()}
  both = either = 0.0
  for track, intervals in alu.items():
    if (track - 1) % tracks_per_block != 0:
      continue
    first, second = sorted(intervals), sorted(alu.get(track + 1, []))
    common = _overlap_ns(first, second)
    both += common
    either += (sum(b - a for a, b in first) + sum(b - a for a, b in second)
               - common)
  tracks = len({e["tid"] for e in events})
  return regions, tracks, both / either if either else 0.0


def section_profile(key, out_dir, seq=4096, heads=16, tune_all=None):
  rows = []
  tuning = fw.MosaicTuning(**(tune_all or {}))
  for causal in (False, True):
    trace_dir = os.path.join(out_dir, "profile", "causal" if causal else "full")
    os.makedirs(trace_dir, exist_ok=True)
    q, k, v = _inputs(key, 1, seq, seq, heads, heads, 128, jnp.bfloat16)
    jax.block_until_ready(_run_kernel(q, k, v, tuning, is_causal=causal,
                                      profile_dir=trace_dir))
    traces = sorted(os.listdir(trace_dir))
    regions, tracks, overlap = summarize_trace(
        os.path.join(trace_dir, traces[-1]))
    for name, stats in sorted(regions.items()):
      rows.append(dict(section="profile", seq=seq, causal=causal, region=name,
                       tracks=tracks, **stats))
    rows.append(dict(section="profile", seq=seq, causal=causal,
                     both_warpgroups_in_alu=overlap))
  return rows


def section_ncu(key, sizes, names, causals, head_dim=128, versions=TREE):
  """Every kernel once per (size, causal) between cuProfilerStart and Stop."""
  cuda = ctypes.CDLL("libcuda.so.1")
  rows = []
  for seq in sizes:
    batch, heads = BATCH_HEADS[seq]
    key, k1 = jax.random.split(key)
    q, k, v = _inputs(k1, batch, seq, seq, heads, heads, head_dim, jnp.bfloat16)
    for causal in causals:
      fns = {"cudnn": _time_fn(None, causal)}
      fns.update({name: _time_fn(cfg, causal, version)
                  for name, cfg, version in _variants(names, versions)})
      fns["triton 2:4"] = jax.jit(functools.partial(
          nmattn.nm_attention, is_causal=causal, n=2, m=4,
          implementation="pallas_triton"))
      for fn in fns.values():  # compile and warm up outside the range
        jax.block_until_ready(fn(q, k, v))
      cuda.cuProfilerStart()
      for fn in fns.values():
        jax.block_until_ready(fn(q, k, v))
      cuda.cuProfilerStop()
      rows.append(dict(section="ncu", seq=seq, causal=causal, kernels=list(fns)))
  return rows


def summarize_ncu_source(csv_text, top=10):
  """Warp-stall summary of `ncu --page source --csv --print-source sass` output.

  Returns one dict per kernel in the report: its name, instruction and
  sample counts, the share of all stall samples per reason, and the `top`
  instructions by samples (address, SASS, samples, executions, their three
  largest reasons).
  """
  number = lambda x: float(x.replace(",", "")) if x.strip() else 0.0
  rows = list(csv.reader(io.StringIO(csv_text)))
  starts = [i for i, r in enumerate(rows) if r and r[0] == "Kernel Name"]
  kernels = []
  for begin, end in zip(starts, starts[1:] + [len(rows)]):
    header = rows[begin + 1]
    col = {h: i for i, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "(" not in h]
    body = [r for r in rows[begin + 2:end] if len(r) == len(header)]
    samples = [number(r[col["Warp Stall Sampling (All Samples)"]]) for r in body]
    total = sum(samples) or 1.0
    shares = {h[len("stall_"):]: sum(number(r[col[h]]) for r in body) / total
              for h in reasons}
    ranked = sorted(zip(samples, body), key=lambda x: -x[0])[:top]
    kernels.append(dict(
        kernel=rows[begin][1], instructions=len(body), samples=sum(samples),
        stall_shares=dict(sorted(shares.items(), key=lambda x: -x[1])),
        top=[dict(address=r[col["Address"]], sass=r[col["Source"]].strip(),
                  samples=n, executed=number(r[col["Instructions Executed"]]),
                  reasons=sorted(((number(r[col[h]]), h[len("stall_"):])
                                  for h in reasons), reverse=True)[:3])
             for n, r in ranked]))
  return kernels


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--sections", default="micro,correct,select,time")
  parser.add_argument("--sizes", default="4096")
  parser.add_argument("--variants", default=DEFAULT_TIME_VARIANTS,
                      help="comma-separated keys of TIME_VARIANTS")
  parser.add_argument("--causal", default="false,true")
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--calls", type=int, default=1,
                      help="calls per synchronisation in the time section")
  parser.add_argument("--tune", default="{}",
                      help="JSON MosaicTuning fields for the correct and profile "
                           "sections")
  parser.add_argument("--baseline", default=None,
                      help="directory from `python -m tools.baseline"
                           " COMMIT DIR`: time, ir and ncu also run its kernels")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  rng = np.random.default_rng()
  key = jax.random.key(int(rng.integers(2**31)))
  rows = [dict(section="env", jax=jax.__version__,
               device=jax.devices()[0].device_kind)]
  sections = args.sections.split(",")
  sizes = [int(s) for s in args.sizes.split(",")]
  variants = args.variants.split(",")
  causals = [c == "true" for c in args.causal.split(",")]
  versions = TREE
  if args.baseline:
    from tools import baseline  # pylint: disable=g-import-not-at-top
    versions += (Version(
        "base", baseline.load(args.baseline, "pallas_kernels.mosaic_gpu.forward"),
        baseline.load(args.baseline, "nmattn._validation").canonicalize),)
  for name in sections:
    t0 = time.perf_counter()
    try:
      if name == "micro":
        rows += section_micro(rng, args.out)
      elif name == "correct":
        rows += section_correct(key, json.loads(args.tune))
      elif name == "select":
        rows += section_select(key)
      elif name == "time":
        rows += section_time(key, sizes, variants, causals, args.rounds,
                             args.head_dim, args.calls, versions)
      elif name == "profile":
        rows += section_profile(key, args.out, tune_all=json.loads(args.tune))
      elif name == "sass":
        rows += section_sass(variants, args.out, args.head_dim, versions=versions)
      elif name == "ir":
        rows += section_ir(variants, args.head_dim, versions=versions)
      elif name == "ncu":
        rows += section_ncu(key, sizes, variants, causals, args.head_dim,
                            versions)
      else:
        raise ValueError(f"unknown section {name!r}")
    except Exception as e:  # pylint: disable=broad-except
      rows.append(dict(section=name, error=f"{type(e).__name__}: {e}"[:4000],
                       trace=traceback.format_exc()[-6000:]))
    rows.append(dict(section=name, wall_s=time.perf_counter() - t0))
    with open(os.path.join(args.out, "probe.json"), "w") as f:
      json.dump(rows, f, indent=1)
  for row in rows:
    short = {k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v)
             for k, v in row.items() if k != "trace"}
    print(json.dumps(short)[:600])


if __name__ == "__main__":
  main()
