"""Forward N:M flash attention for Hopper, written with Pallas' Mosaic GPU backend.

One CTA computes 128 query rows of one (batch, head): two consumer warpgroups
own 64 rows each, a producer warpgroup streams key and value tiles by TMA into
a ring of `max_concurrent_steps` shared-memory stages. Per key tile a consumer

1. computes `S = Q K^T` with dense `wgmma` (float32 accumulator in registers);
2. scales, masks and N:M-selects `S` on its own registers (`tile_select`,
   emitted through `plgpu.inline_mgpu`). Keys reach shared memory permuted
   (`sparse_fragments.key_order`) so that every group of `m` keys of a row
   lies in one thread's registers: selection needs no shuffles;
3. runs the online softmax on the survivors and
4. accumulates `P V`: with `wgmma.mma_async.sp` (P compressed 2:4 in
   registers with its metadata, V from shared memory) when the pattern keeps
   at most two of every four keys (2:4, 1:4, 1:2) and `sparse_pv` is on,
   else with dense `wgmma` on the pruned `P`.

With a block pattern the producer streams only the key tiles of the CTA's
list (`tile_plan.pattern_tiles`, made once per call, rows of 128 queries)
and the consumers walk it segment by segment, each with its own body:
positional masks only in partial tiles, no selection and dense `P V` in
`DENSE` tiles (from a second copy of V in the keys' permuted order when the
N:M tiles take `P V` sparse).

Returns `(out [B, T, H, D], lse [B, H, T] float32)`, `lse` the natural log of
the sum of exp of the kept scores, +inf for rows without a valid key (so that
`exp(s - lse)` is 0 there, as the Triton backward expects).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels import tile_plan
from pallas_kernels.call import (SUPPORTED_M, AttentionCall, AttentionSpec,
                                 pad_axis, round_up)
from pallas_kernels.mosaic_gpu import mlir_ops
from pallas_kernels.mosaic_gpu import scores
from pallas_kernels.mosaic_gpu import tile_select as ts

BLOCK_Q = scores.BLOCK_Q  # query rows per consumer warpgroup (the wgmma M)
COMPUTE_WGS = 2       # consumer warpgroups per CTA
CTA_ROWS = COMPUTE_WGS * BLOCK_Q  # query rows per CTA (a tile list's row)
SWIZZLE = 128         # bytes; 16-bit tiles of (8, 64)
HEAD_DIMS = (64, 128)
DTYPES = (jnp.bfloat16, jnp.float16)
LN2 = math.log(2.0)
SMEM_LIMIT = 227 * 1024  # bytes of shared memory a Hopper CTA may use


@dataclasses.dataclass(frozen=True)
class MosaicTuning:
  """Tuning of the Hopper forward kernel.

  block_kv: keys per pipeline step (multiple of 64, at most 256).
  max_concurrent_steps: shared-memory stages of the key/value ring (>= 2).
  sparse_pv: run `P V` on the 2:4 sparse tensor cores when the pattern fits.
  consumer_registers: registers per thread of the consumer warpgroups.
  """
  block_kv: int = 128
  max_concurrent_steps: int = 2
  sparse_pv: bool = True
  consumer_registers: int = 232

  def __post_init__(self):
    if self.block_kv % 64 or not 64 <= self.block_kv <= 256:
      raise ValueError(f"block_kv must be a multiple of 64 in [64, 256]; got "
                       f"block_kv={self.block_kv}")
    if self.max_concurrent_steps < 2:
      raise ValueError("max_concurrent_steps must be >= 2; got "
                       f"max_concurrent_steps={self.max_concurrent_steps}")
    if self.consumer_registers % 8 or not 24 <= self.consumer_registers <= 256:
      raise ValueError("consumer_registers must be a multiple of 8 in [24, 256]; "
                       f"got consumer_registers={self.consumer_registers}")


class _Config(NamedTuple):
  """One kernel instance: the call's spec, the tuning, and what follows."""
  spec: AttentionSpec
  tuning: MosaicTuning
  q_pad: int
  kv_pad: int
  tile: scores.ScoreTile  # the score tiles' layout, shared with the backward
  sparse: bool        # P V on the sparse tensor cores
  pattern_shape: tuple[int, int, int, int] | None  # tile lists [B', H', rows, cols]


def pattern_unsupported_reason(spec: AttentionSpec,
                               tuning: MosaicTuning) -> str | None:
  """Why the kernel's tiles cannot walk `spec`'s block pattern (None if they can).

  A CTA's 128 query rows and a pipeline step's `block_kv` keys are the
  tiles of the lists, so they must divide the pattern's blocks.
  """
  if not spec.has_pattern:
    return None
  if spec.block_q % CTA_ROWS:
    return (f"block_pattern.block_q={spec.block_q} (it needs a multiple of "
            f"{CTA_ROWS}, the query rows of a CTA)")
  if spec.block_k % tuning.block_kv:
    return (f"block_pattern.block_k={spec.block_k} (it needs a multiple of "
            f"block_kv={tuning.block_kv})")
  return None


def shape_unsupported_reason(dtype, head_dim: int, m: int,
                             tuning: MosaicTuning) -> str | None:
  """Why the kernel cannot run this dtype / head_dim / m / tuning (None if it can)."""
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in DTYPES]:
    return f"dtype {jnp.dtype(dtype).name} (supported: bfloat16, float16)"
  if head_dim not in HEAD_DIMS:
    return f"head_dim={head_dim} (supported: {HEAD_DIMS})"
  if m not in SUPPORTED_M:
    return f"m={m}"
  if smem_bytes(head_dim, tuning) > SMEM_LIMIT:
    return (f"head_dim={head_dim} with {tuning}: {smem_bytes(head_dim, tuning)} "
            f"bytes of shared memory > {SMEM_LIMIT}")
  return None


# Alignment padding and Mosaic GPU's own scratch on top of our allocations
# (2680 bytes measured with jax 0.10.2 at block_kv 128, 3 stages).
SMEM_OVERHEAD = 4096


def smem_bytes(head_dim: int, tuning: MosaicTuning) -> int:
  """Shared memory the kernel needs (tiles, log-sum-exp, barriers, padding)."""
  tiles = (CTA_ROWS + 2 * tuning.max_concurrent_steps
           * tuning.block_kv) * head_dim * 2
  return (tiles + CTA_ROWS * 4
          + 8 * (4 * tuning.max_concurrent_steps + 3) + SMEM_OVERHEAD)


def nm_flash_attention_fwd(call: AttentionCall,
                           tuning: MosaicTuning | None = None,
                           profile_dir: str | None = None):
  """N:M attention forward on a Hopper GPU: `(out, lse)`.

  Args:
    call: the canonical call; its spec must pass `shape_unsupported_reason`
      (bfloat16 or float16, head_dim 64 or 128).
    tuning: `MosaicTuning`; the default when None.
    profile_dir: write a Mosaic GPU profiler trace (named regions per
      warpgroup, JSON) of each call into this directory; for diagnostics.

  Returns:
    `out [B, T, H, D]` in the dtype of the query and `lse [B, H, T]` float32
    (+inf where a row has no valid key).
  """
  spec = call.spec
  tuning = tuning or MosaicTuning()
  width = scores.key_width(spec)
  sparse = tuning.sparse_pv and width == 4 and ts.sparse_pattern_fits(spec.n,
                                                                      spec.m)
  q_pad = round_up(spec.q_len, CTA_ROWS)
  kv_pad = round_up(spec.kv_len, max(tuning.block_kv, 4 * width))
  extra = scores.combine_extra(call.bias, call.mask, q_pad, kv_pad)
  pattern = None
  if spec.has_pattern:
    pattern = tile_plan.pattern_tiles(
        spec, call.block_modes, CTA_ROWS, tuning.block_kv, q_pad // CTA_ROWS,
        kv_pad // tuning.block_kv, call.q_lengths, call.kv_lengths,
        masks_queries=False)
  tile = scores.ScoreTile(spec=spec, width=width, block_kv=tuning.block_kv,
                          kv_pad=kv_pad,
                          extra_shape=None if extra is None else tuple(extra.shape))
  cfg = _Config(spec=spec, tuning=tuning, q_pad=q_pad, kv_pad=kv_pad, tile=tile,
                sparse=sparse, pattern_shape=None if pattern is None else tuple(pattern.tiles.shape))

  # Scores come out in permuted key order; the sparse operand's metadata
  # restores natural order for P V, dense P V needs V permuted like K.
  keys = pad_axis(call.key, 1, kv_pad)
  values = pad_axis(call.value, 1, kv_pad)
  inputs = [pad_axis(call.query, 1, q_pad), scores.permute_keys(keys, width),
            values if sparse else scores.permute_keys(values, width)]
  if sparse and pattern is not None:  # for the DENSE tiles' dense P V
    inputs.append(scores.permute_keys(values, width))
  if extra is not None:
    inputs.append(extra)
  if call.kv_lengths is not None:
    inputs.append(call.kv_lengths)
  if pattern is not None:
    inputs += [pattern.tiles, pattern.bounds]
  out, lse = _call(cfg, *inputs, profile_dir=profile_dir)
  out, lse = out[:, :spec.q_len], lse[:, :, :spec.q_len]
  if call.q_lengths is not None:
    rows = jnp.arange(spec.q_len)[None, :] < call.q_lengths[:, None]
    out = jnp.where(rows[:, :, None, None], out, jnp.zeros((), out.dtype))
    lse = jnp.where(rows[:, None, :], lse, jnp.inf)
  return out, lse


def _cta_tiles(cfg: _Config, q_tile, kv_valid) -> tile_plan.TileRange:
  """Key tiles this CTA's producer streams (both warpgroups' rows)."""
  return tile_plan.key_tiles(cfg.spec, q_tile * CTA_ROWS, CTA_ROWS,
                             cfg.tuning.block_kv,
                             jnp.int32(cfg.spec.q_len), kv_valid,
                             masks_queries=False)


def _warpgroup_tiles(cfg: _Config, q_first, cta: tile_plan.TileRange, kv_valid):
  """The CTA's key tiles, full or partial for one warpgroup's 64 rows."""
  own = tile_plan.key_tiles(cfg.spec, q_first, BLOCK_Q, cfg.tuning.block_kv,
                            jnp.int32(cfg.spec.q_len), kv_valid,
                            masks_queries=False)
  return tile_plan.within(own, cta)


def _call(cfg: _Config, q, k, v, *rest, profile_dir: str | None = None):
  bk = cfg.tuning.block_kv
  steps = cfg.tuning.max_concurrent_steps
  dtype = cfg.spec.dtype
  groups = cfg.spec.heads // cfg.spec.kv_heads
  has_extra = cfg.tile.extra_shape is not None
  has_pattern = cfg.pattern_shape is not None
  # Rows past q_len are discarded and rows past q_lengths zeroed after the
  # kernel, so only keys make a tile partial here.
  positional = tile_plan.needs_positional_masks(cfg.spec, cfg.kv_pad,
                                                masks_queries=False)
  units = scores.score_units(cfg.tile)
  # Profiler events a warpgroup may record: a start and an end for each of
  # at most 7 regions per step, and a few outside the loop.
  profile = {} if profile_dir is None else dict(
      profile_space=16 * (cfg.kv_pad // bk + 4), profile_dir=profile_dir)
  def selection(dense):
    if dense:
      return scores.KEEP_ALL
    return scores.COMPRESS if cfg.sparse else scores.PRUNE

  selects = {(partial, dense): scores.make_select(cfg.tile, partial,
                                                  selection(dense))
             for partial in ((False, True) if positional else (False,))
             for dense in ((False, True) if has_pattern else (False,))}
  sparse_pv = (scores.make_sparse_matmul(cfg.spec.head_dim) if cfg.sparse
               else None)

  def kernel(q_ref, k_ref, v_ref, *refs):
    refs = list(refs)
    v_dense_ref = refs.pop(0) if has_pattern and cfg.sparse else v_ref
    extra_ref = refs.pop(0) if has_extra else None
    kvlen_ref = refs.pop(0) if cfg.spec.has_kv_lengths else None
    tiles_ref, bounds_ref = (refs.pop(0), refs.pop(0)) if has_pattern else (None,) * 2
    out_ref, lse_ref, scratch = refs
    (qo_smem2, k_smem, v_smem, lse_smem2), barriers = scratch
    (k_full, v_full, q_full, k_free, v_free, sched) = barriers
    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    q_tile = lax.axis_index("q_seq")
    # Causal: the longest rows first, a shorter tail (16k, 2:4: 1.13x cuDNN,
    # 1.02x in launch order; docs/BENCHMARKS.md, "Block patterns on
    # `pallas_mosaic`").
    if cfg.spec.is_causal:
      q_tile = cfg.q_pad // CTA_ROWS - 1 - q_tile
    wg = lax.axis_index("wg")
    kv_valid = jnp.int32(cfg.spec.kv_len)
    if kvlen_ref is not None:
      kv_valid = jnp.clip(kvlen_ref[b], 0, cfg.spec.kv_len)
    if has_pattern:
      # Steps walk the list: step i loads key tile `tile_of(i)`, and the
      # steps from bounds[DENSE_PARTIAL] on are DENSE tiles.
      tile_of = scores.list_reader(cfg.pattern_shape, tiles_ref, b, h, q_tile)
      bound = scores.list_reader(cfg.pattern_shape, bounds_ref, b, h, q_tile)
      lo, hi = jnp.int32(0), bound(tile_plan.SKIPPED)
      dense_from = bound(tile_plan.DENSE_PARTIAL)
    else:
      cta_tiles = _cta_tiles(cfg, q_tile, kv_valid)
      lo, hi = cta_tiles.lo, cta_tiles.hi
      tile_of = lambda i: i
    num_steps = hi - lo

    # A rendezvous of the two consumer warpgroups. It does not make them take
    # turns: ptxas moves the arrive after the softmax above the selection (a
    # release orders memory operations only), so both select at once, which
    # measured faster than real turns (docs/mosaic_gpu_notes.md, v5).
    def schedule_barrier():
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(sched)

    @pl.when(wg < COMPUTE_WGS)
    def _consumer():
      plgpu.set_max_registers(cfg.tuning.consumer_registers, action="increase")
      qo_smem = qo_smem2.at[wg]
      lse_smem = lse_smem2.at[wg]
      q_first = q_tile * CTA_ROWS + wg * BLOCK_Q
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_first, BLOCK_Q), h], qo_smem,
                              q_full.at[wg])
      plgpu.barrier_wait(q_full.at[wg])
      row_layout = plgpu.Layout.WGMMA.reduce(1)
      m_i = plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32),
                              row_layout)
      l_i = plgpu.layout_cast(jnp.full((BLOCK_Q,), 0.0, jnp.float32), row_layout)
      acc = plgpu.layout_cast(
          jnp.full((BLOCK_Q, cfg.spec.head_dim), 0.0, jnp.float32),
          plgpu.Layout.WGMMA)
      pl.when(wg == 1)(schedule_barrier)

      # The named scopes are the regions of the Mosaic GPU profiler's trace
      # (`profile_dir`); they cost nothing otherwise.
      def step(kv_step, carry, partial, dense):
        acc, m_i, l_i = carry
        slot = lax.rem(kv_step - lo, jnp.int32(steps))
        compressed = cfg.sparse and not dense
        with jax.named_scope("wait_k"):
          plgpu.barrier_wait(k_full.at[slot])

        def compute_qk(acc_ref):
          with jax.named_scope("qk_issue_and_rendezvous"):
            plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
            schedule_barrier()
          with jax.named_scope("wait_qk"):
            return acc_ref[...]

        qk = pl.run_scoped(compute_qk, plgpu.ACC((BLOCK_Q, bk), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        select = selects[(partial, dense)]
        args = [qk, tile_of(kv_step) * bk, q_first, kv_valid, b, h]
        if has_extra:
          args.append(extra_ref)
        with jax.named_scope("select"):
          if compressed:
            kept, meta = select(*args)
          else:
            kept, meta = select(*args), None
        with jax.named_scope("softmax"):
          m_new = jnp.maximum(m_i, kept.max(axis=1))
          m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
          alpha = jnp.exp2((m_i - m_safe) * units)
          p = jnp.exp2(kept * units - lax.broadcast_in_dim(
              m_safe * units, kept.shape, [0]))
          acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
          l_i = l_i * alpha + p.sum(axis=1)
          p16 = p.astype(dtype)
          acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
        with jax.named_scope("rendezvous_and_wait_v"):
          plgpu.barrier_arrive(sched)
          plgpu.barrier_wait(v_full.at[slot])
          plgpu.barrier_wait(sched)
        with jax.named_scope("pv"):
          if compressed:
            acc = sparse_pv(acc, p16, meta, v_smem.at[slot])
          else:
            def compute_pv(acc_ref):
              plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
            acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l_i

      def walk(start, stop, carry, partial, dense=False):
        return lax.fori_loop(start, stop, functools.partial(
            step, partial=partial, dense=dense), carry)

      carry = (acc, m_i, l_i)
      if has_pattern:
        for segment, partial, dense in scores.SEGMENTS:
          # Segments the call cannot have are not compiled (n == m: every
          # visited tile is dense).
          if (partial and not positional) or (cfg.spec.is_dense and not dense):
            continue
          carry = walk(bound(segment), bound(segment + 1), carry, partial, dense)
      elif positional:
        tiles = _warpgroup_tiles(cfg, q_first, cta_tiles, kv_valid)
        for start, stop, partial in ((tiles.lo, tiles.full_lo, True),
                                     (tiles.full_lo, tiles.full_hi, False),
                                     (tiles.full_hi, tiles.hi, True)):
          carry = walk(start, stop, carry, partial)
      else:
        carry = walk(lo, hi, carry, False)
      acc, m_i, l_i = carry
      pl.when(wg == 0)(schedule_barrier)

      l_safe = jnp.where(l_i == 0.0, 1.0, l_i)
      acc = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
      qo_smem[...] = acc.astype(dtype)
      lse_smem[...] = jnp.where(l_i == 0.0, jnp.inf,
                                m_i * (units * LN2) + jnp.log(l_safe))
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo_smem,
                              out_ref.at[b, pl.ds(q_first, BLOCK_Q), h])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q_first, BLOCK_Q)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      kv_head = lax.div(h, jnp.int32(groups))

      def copy_v(i, rows, slot):
        if v_dense_ref is v_ref:
          plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_full.at[slot])
          return
        dense = lo + i >= dense_from
        for source, when in ((v_ref, ~dense), (v_dense_ref, dense)):
          pl.when(when)(lambda source=source: plgpu.copy_gmem_to_smem(
              source.at[rows], v_smem.at[slot], v_full.at[slot]))

      def load(i, slot):
        rows = (b, pl.ds(tile_of(lo + i) * bk, bk), kv_head)
        plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_full.at[slot])
        copy_v(i, rows, slot)

      for i in range(steps):
        pl.when(i < num_steps)(functools.partial(load, i, i))

      @pl.loop(steps, jnp.maximum(num_steps, steps))
      def _refill(i):
        slot = lax.rem(i, jnp.int32(steps))
        rows = (b, pl.ds(tile_of(lo + i) * bk, bk), kv_head)
        with jax.named_scope("producer_wait_free_k"):
          plgpu.barrier_wait(k_free.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_full.at[slot])
        with jax.named_scope("producer_wait_free_v"):
          plgpu.barrier_wait(v_free.at[slot])
        copy_v(i, rows, slot)

  def entry(*refs):
    tiling = plgpu.TilingTransform((8, SWIZZLE // 2))
    swizzle = plgpu.SwizzleTransform(SWIZZLE)
    tile = lambda *shape: plgpu.SMEM(shape, dtype, transforms=(tiling, swizzle))
    smem = (tile(COMPUTE_WGS, BLOCK_Q, cfg.spec.head_dim),
            tile(steps, bk, cfg.spec.head_dim), tile(steps, bk, cfg.spec.head_dim),
            plgpu.SMEM((COMPUTE_WGS, BLOCK_Q), jnp.float32))
    barriers = (plgpu.Barrier(num_barriers=steps),
                plgpu.Barrier(num_barriers=steps),
                plgpu.Barrier(num_barriers=COMPUTE_WGS),
                plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=steps),
                plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=steps),
                plgpu.Barrier(num_arrivals=COMPUTE_WGS))
    pl.run_scoped(lambda *scratch: kernel(*refs, scratch),
                  smem, barriers, collective_axes="wg")

  out_types = (
      jax.ShapeDtypeStruct((cfg.spec.batch, cfg.q_pad, cfg.spec.heads, cfg.spec.head_dim), dtype),
      jax.ShapeDtypeStruct((cfg.spec.batch, cfg.spec.heads, cfg.q_pad), jnp.float32))
  return plgpu.kernel(
      entry, out_type=out_types,
      grid=(cfg.spec.heads, cfg.q_pad // CTA_ROWS, cfg.spec.batch),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=COMPUTE_WGS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True, **profile),
  )(q, k, v, *rest)
