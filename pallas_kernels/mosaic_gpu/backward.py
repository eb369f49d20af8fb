"""Backward N:M flash attention for Hopper, written with Pallas' Mosaic GPU backend.

Two kernels. Both compute the score tile as the forward does, `S = Q K^T`
with 64 query rows per warpgroup and the keys permuted, and pass its float32
accumulator to the forward's own selection (`scores.make_select`), so that
forward and backward keep the same keys (docs/ARCHITECTURE.md, "The Hopper
backward"). With `P = exp(S - lse)` of the kept scores, `dP = dO V^T` and
`dS = P * (dP - delta)`:

- the dQ kernel (a CTA: 128 query rows, two consumer warpgroups and a TMA
  producer streaming key tiles) accumulates `dQ += dS K`. When the pattern
  keeps at most two of every four keys (2:4, 1:4, 1:2) the selection
  compresses `S` and gathers `dP` at the kept places, and `dS K` runs on
  the 2:4 sparse tensor cores (`wgmma.mma_async.sp`, K in natural key order;
  the forward's `P V` product); otherwise `dS` is pruned and dense.
- the dK/dV kernel (a CTA: 128 keys, 64 resident per consumer warpgroup)
  walks the query tiles of every query head of its key head, stages `P` and
  `dS` in shared memory as 16-bit tiles and accumulates `dV += P^T dO`,
  `dK += dS^T Q` with dense `wgmma` (their reduction axis, the queries,
  carries no N:M pattern). Its rows come out in the permuted key order and
  are put back after the kernel. With a bias it also writes `dS` as float32
  tiles (zeros where it visits no tile), summed to the bias' shape after.

With a block pattern both walk the tile plan's lists
(`tile_plan.pattern_tiles`, per 128-row query tile for dQ and, transposed,
per 128-key tile for dK/dV) segment by segment, as the forward does: no
selection in `DENSE` tiles, positional masks only in partial ones.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels import _compat, tile_plan
from pallas_kernels.call import (LOG2E, SUPPORTED_M, AttentionCall,
                                 AttentionSpec, pad_axis, round_up)
from pallas_kernels.mosaic_gpu import scores
from pallas_kernels.mosaic_gpu import tile_select as ts
from pallas_kernels.mosaic_gpu.forward import (CTA_ROWS, DTYPES, HEAD_DIMS,
                                               SMEM_LIMIT, SMEM_OVERHEAD, SWIZZLE)

BLOCK_Q = scores.BLOCK_Q   # query rows of a warpgroup's score tile
BLOCK_K = 64               # resident keys per warpgroup in the dK/dV kernel
COMPUTE_WGS = 2


@dataclasses.dataclass(frozen=True)
class BackwardTuning:
  """Tuning of the Hopper backward kernels.

  block_kv_dq: keys per pipeline step of the dQ kernel (64 or 128).
  max_concurrent_steps: shared-memory stages of both kernels' rings (>= 2).
  sparse_dq: run `dS K` on the 2:4 sparse tensor cores when the pattern fits.
  consumer_registers: registers per thread of the consumer warpgroups.
  """
  block_kv_dq: int = 64
  max_concurrent_steps: int = 2
  sparse_dq: bool = True
  consumer_registers: int = 232

  def __post_init__(self):
    if self.block_kv_dq not in (64, 128):
      raise ValueError("block_kv_dq must be 64 or 128; got "
                       f"block_kv_dq={self.block_kv_dq}")
    if self.max_concurrent_steps < 2:
      raise ValueError("max_concurrent_steps must be >= 2; got "
                       f"max_concurrent_steps={self.max_concurrent_steps}")
    if self.consumer_registers % 8 or not 24 <= self.consumer_registers <= 256:
      raise ValueError("consumer_registers must be a multiple of 8 in [24, 256]; "
                       f"got consumer_registers={self.consumer_registers}")


def _sparse(spec: AttentionSpec, tuning: BackwardTuning) -> bool:
  return (tuning.sparse_dq and scores.key_width(spec) == 4
          and ts.sparse_pattern_fits(spec.n, spec.m))


def smem_bytes(spec: AttentionSpec, tuning: BackwardTuning) -> dict[str, int]:
  """Shared memory of each kernel (tiles, row vectors, barriers, padding)."""
  d, steps = spec.head_dim, tuning.max_concurrent_steps
  streams = 3 if _sparse(spec, tuning) else 2
  dq = (2 * CTA_ROWS * d * 2 + 2 * CTA_ROWS * 4
        + steps * streams * tuning.block_kv_dq * d * 2
        + 8 * (4 * COMPUTE_WGS + 2 * streams * steps) + SMEM_OVERHEAD)
  ds_tiles = 2 + (2 if spec.bias_shape is not None else 0)  # 16-bit P, dS; f32 dS
  dkv = (2 * CTA_ROWS * d * 2 + steps * (2 * BLOCK_Q * d * 2 + 2 * BLOCK_Q * 4)
         + ds_tiles * COMPUTE_WGS * BLOCK_Q * BLOCK_K * 2
         + 8 * (2 * COMPUTE_WGS + 5 * steps) + SMEM_OVERHEAD)
  return {"dq": dq, "dkv": dkv}


def unsupported_reason(spec: AttentionSpec,
                       tuning: BackwardTuning) -> str | None:
  """What of `spec` the kernels cannot differentiate (None if they can)."""
  if jnp.dtype(spec.dtype) not in [jnp.dtype(d) for d in DTYPES]:
    return f"dtype {jnp.dtype(spec.dtype).name} (supported: bfloat16, float16)"
  if spec.head_dim not in HEAD_DIMS:
    return f"head_dim={spec.head_dim} (supported: {HEAD_DIMS})"
  if spec.m not in SUPPORTED_M:
    return f"m={spec.m}"
  if spec.has_pattern and (spec.block_q % CTA_ROWS or spec.block_k % CTA_ROWS):
    return (f"block_pattern.block_q={spec.block_q}, block_k={spec.block_k} "
            f"(it needs multiples of {CTA_ROWS}: a CTA's query rows and keys)")
  for kernel, size in smem_bytes(spec, tuning).items():
    if size > SMEM_LIMIT:
      return (f"head_dim={spec.head_dim} with {tuning}: the {kernel} kernel "
              f"needs {size} bytes of shared memory > {SMEM_LIMIT}")
  return None


class _Config(NamedTuple):
  spec: AttentionSpec
  tuning: BackwardTuning
  q_pad: int
  kv_pad: int
  sparse: bool
  dq_tile: scores.ScoreTile   # score tiles of the dQ kernel (block_kv_dq keys)
  dkv_tile: scores.ScoreTile  # score tiles of the dK/dV kernel (64 keys)
  dq_lists: tuple[int, ...] | None   # shape of the pattern's tile lists
  dkv_lists: tuple[int, ...] | None  # and of the transposed ones


def nm_flash_attention_bwd(call: AttentionCall, out, lse, d_out,
                           tuning: BackwardTuning | None = None):
  """Gradients `(dq, dk, dv, dbias)` of the Hopper forward's `(out, lse)`.

  `lse [B, H, T]` float32 is the natural log-sum-exp of the kept scores,
  +-inf for rows without one (the forward's, and the Triton kernels',
  convention). `dbias` is None without a bias, else in the call's (4-D)
  bias shape and dtype.
  """
  spec = call.spec
  tuning = tuning or BackwardTuning()
  width = scores.key_width(spec)
  q_pad = round_up(spec.q_len, CTA_ROWS)
  kv_pad = round_up(spec.kv_len, CTA_ROWS)
  extra = scores.combine_extra(call.bias, call.mask, q_pad, kv_pad)
  extra_shape = None if extra is None else tuple(extra.shape)
  tile = lambda bk: scores.ScoreTile(spec=spec, width=width, block_kv=bk,
                                     kv_pad=kv_pad, extra_shape=extra_shape)
  dq_lists = dkv_lists = ()
  if spec.has_pattern:
    bk = tuning.block_kv_dq
    plan = functools.partial(tile_plan.pattern_tiles, spec, call.block_modes,
                             q_lengths=call.q_lengths, kv_lengths=call.kv_lengths)
    dq_lists = plan(CTA_ROWS, bk, q_pad // CTA_ROWS, kv_pad // bk,
                    masks_queries=False)
    dkv_lists = plan(CTA_ROWS, BLOCK_Q, kv_pad // CTA_ROWS, q_pad // BLOCK_Q,
                     transposed=True)
  shape_of = lambda lists: tuple(lists.tiles.shape) if lists else None
  cfg = _Config(spec=spec, tuning=tuning, q_pad=q_pad, kv_pad=kv_pad,
                sparse=_sparse(spec, tuning), dq_tile=tile(tuning.block_kv_dq),
                dkv_tile=tile(BLOCK_K), dq_lists=shape_of(dq_lists),
                dkv_lists=shape_of(dkv_lists))

  # Rows without a kept score (lse -inf from other forwards) and padded rows
  # get lse = +inf: exp(s - lse) = 0 there, so they send no gradient.
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse) * LOG2E
  lse2 = pad_axis(lse2, 2, q_pad, value=jnp.inf)
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32),
                     d_out.astype(jnp.float32))
  delta = pad_axis(delta, 2, q_pad)
  q = pad_axis(call.query, 1, q_pad)
  do = pad_axis(d_out.astype(spec.dtype), 1, q_pad)
  keys = pad_axis(call.key, 1, kv_pad)
  k_perm = scores.permute_keys(keys, width)
  v_perm = scores.permute_keys(pad_axis(call.value, 1, kv_pad), width)
  rest = [] if extra is None else [extra]
  if call.kv_lengths is not None:
    rest.append(call.kv_lengths)

  dq_inputs = [q, k_perm, v_perm] + ([keys] if cfg.sparse else [])
  dq = _dq_call(cfg, *dq_inputs, do, lse2, delta, *rest, *dq_lists)
  dk, dv, *ds = _dkv_call(cfg, q, k_perm, v_perm, do, lse2, delta, *rest,
                          *dkv_lists)
  dk = scores.unpermute_keys(dk, width)[:, :spec.kv_len]
  dv = scores.unpermute_keys(dv, width)[:, :spec.kv_len]
  dbias = None
  if call.bias is not None:
    ds = scores.unpermute_keys(ds[0], width, axis=3)[:, :, :spec.q_len, :spec.kv_len]
    summed = tuple(axis for axis in range(4) if call.bias.shape[axis] == 1)
    dbias = jnp.sum(ds, axis=summed, keepdims=True).astype(call.bias.dtype)
  return dq[:, :spec.q_len], dk, dv, dbias


def _kv_valid(cfg: _Config, kvlen_ref, b):
  if kvlen_ref is None:
    return jnp.int32(cfg.spec.kv_len)
  return jnp.clip(kvlen_ref[b], 0, cfg.spec.kv_len)


def _grad_scores(kept, dp, lse, delta, units):
  """`dS = P * (dP - delta)` with `P = exp2(kept * units - lse)`."""
  rows = lambda x: lax.broadcast_in_dim(x, kept.shape, [0])
  p = jnp.exp2(kept * units - rows(lse))
  return p, p * (dp - rows(delta))


def _smem_tile(dtype, *shape):
  transforms = (plgpu.TilingTransform((8, SWIZZLE // 2)),
                plgpu.SwizzleTransform(SWIZZLE))
  return plgpu.SMEM(shape, dtype, transforms=transforms)


def _segments(spec: AttentionSpec, positional: bool, tiles=None, bound=None):
  """`(start, stop, partial, dense)` of a walk over a `TileRange` or, given
  `bound`, over a pattern's list (segments the call cannot have are left
  out: without positional masks no tile is partial, and with n == m every
  visited tile is dense)."""
  if bound is not None:
    return tuple((bound(segment), bound(segment + 1), partial, dense)
                 for segment, partial, dense in scores.SEGMENTS
                 if (positional or not partial) and (dense or not spec.is_dense))
  if not positional:
    return ((tiles.lo, tiles.hi, False, False),)
  return ((tiles.lo, tiles.full_lo, True, False),
          (tiles.full_lo, tiles.full_hi, False, False),
          (tiles.full_hi, tiles.hi, True, False))


def _selections(cfg: _Config, tile: scores.ScoreTile, positional: bool,
                compressed: str):
  """`make_select` for every (partial, dense) body a kernel compiles."""
  has_pattern = cfg.dq_lists is not None
  return {(partial, dense): scores.make_select(
              tile, partial, scores.KEEP_ALL if dense else compressed)
          for partial in ((False, True) if positional else (False,))
          for dense in ((False, True) if has_pattern else (False,))}


def _dq_call(cfg: _Config, q, k, v, *rest):
  spec, tuning = cfg.spec, cfg.tuning
  bk, steps, dtype = tuning.block_kv_dq, tuning.max_concurrent_steps, spec.dtype
  groups = spec.heads // spec.kv_heads
  has_extra = cfg.dq_tile.extra_shape is not None
  positional = tile_plan.needs_positional_masks(spec, cfg.kv_pad,
                                                masks_queries=False)
  units = scores.score_units(cfg.dq_tile)
  selects = _selections(cfg, cfg.dq_tile, positional,
                        scores.COMPRESS_WITH if cfg.sparse else scores.PRUNE)
  has_pattern = cfg.dq_lists is not None
  sparse_dq = scores.make_sparse_matmul(spec.head_dim) if cfg.sparse else None

  def kernel(q_ref, k_ref, v_ref, *refs):
    refs = list(refs)
    kn_ref = refs.pop(0) if cfg.sparse else None
    do_ref, lse_ref, delta_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    extra_ref = refs.pop(0) if has_extra else None
    kvlen_ref = refs.pop(0) if spec.has_kv_lengths else None
    tiles_ref, bounds_ref = (refs.pop(0), refs.pop(0)) if has_pattern else (None,) * 2
    dq_ref, scratch = refs
    (q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem,
     kn_smem), barriers = scratch
    (rows_full, k_full, v_full, kn_full, k_free, v_free, kn_free) = barriers
    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    q_tile = lax.axis_index("q_seq")
    if spec.is_causal:  # the longest rows first, as in the forward
      q_tile = cfg.q_pad // CTA_ROWS - 1 - q_tile
    wg = lax.axis_index("wg")
    kv_valid = _kv_valid(cfg, kvlen_ref, b)
    q_limit = jnp.int32(spec.q_len)
    if has_pattern:  # step i: key tile tile_of(i) of the CTA's list
      tile_of = scores.list_reader(cfg.dq_lists, tiles_ref, b, h, q_tile)
      bound = scores.list_reader(cfg.dq_lists, bounds_ref, b, h, q_tile)
      lo, hi = jnp.int32(0), bound(tile_plan.SKIPPED)
    else:
      cta = tile_plan.key_tiles(spec, q_tile * CTA_ROWS, CTA_ROWS, bk, q_limit,
                                kv_valid, masks_queries=False)
      lo, hi = cta.lo, cta.hi
      tile_of = lambda i: i

    @pl.when(wg < COMPUTE_WGS)
    def _consumer():
      plgpu.set_max_registers(tuning.consumer_registers, action="increase")
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      q_first = q_tile * CTA_ROWS + wg * BLOCK_Q
      rows = (b, pl.ds(q_first, BLOCK_Q), h)
      vector = (b, h, pl.ds(q_first, BLOCK_Q))
      full = rows_full.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, full)
      plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, full)
      plgpu.copy_gmem_to_smem(lse_ref.at[vector], lse_smem2.at[wg], full)
      plgpu.copy_gmem_to_smem(delta_ref.at[vector], delta_smem2.at[wg], full)
      plgpu.barrier_wait(full)
      row_layout = plgpu.Layout.WGMMA.reduce(1)
      lse = _compat.mosaic_load(lse_smem2.at[wg], layout=row_layout)
      delta = _compat.mosaic_load(delta_smem2.at[wg], layout=row_layout)
      dq = plgpu.layout_cast(jnp.full((BLOCK_Q, spec.head_dim), 0.0, jnp.float32),
                             plgpu.Layout.WGMMA)

      def step(kv_step, dq, partial, dense):
        slot = lax.rem(kv_step - lo, jnp.int32(steps))
        plgpu.barrier_wait(k_full.at[slot])

        def scores_of(a_smem, b_smem):
          def compute(acc_ref):
            plgpu.wgmma(acc_ref, a_smem, b_smem.transpose((1, 0)))
            return acc_ref[...]
          return pl.run_scoped(compute, plgpu.ACC((BLOCK_Q, bk), jnp.float32))

        s = scores_of(q_smem, k_smem.at[slot])
        plgpu.barrier_wait(v_full.at[slot])
        dp = scores_of(do_smem, v_smem.at[slot])
        plgpu.barrier_arrive(v_free.at[slot])
        args = [tile_of(kv_step) * bk, q_first, kv_valid, b, h]
        if has_extra:
          args.append(extra_ref)
        select = selects[(partial, dense)]
        if cfg.sparse and not dense:
          kept, dp, meta = select(s, dp, *args)
          _, ds = _grad_scores(kept, dp, lse, delta, units)
          plgpu.barrier_arrive(k_free.at[slot])
          plgpu.barrier_wait(kn_full.at[slot])
          dq = sparse_dq(dq, ds.astype(dtype), meta, kn_smem.at[slot])
          plgpu.barrier_arrive(kn_free.at[slot])
          return dq
        _, ds = _grad_scores(select(s, *args), dp, lse, delta, units)

        def accumulate(acc_ref):
          plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem.at[slot])
        dq = pl.run_state(accumulate)(plgpu.ACC.init(dq))
        plgpu.barrier_arrive(k_free.at[slot])
        if cfg.sparse:  # a DENSE tile of a sparse call: K's second copy unused
          plgpu.barrier_wait(kn_full.at[slot])
          plgpu.barrier_arrive(kn_free.at[slot])
        return dq

      if has_pattern:
        segments = _segments(spec, positional, bound=bound)
      else:
        segments = _segments(spec, positional, tile_plan.within(
            tile_plan.key_tiles(spec, q_first, BLOCK_Q, bk, q_limit, kv_valid,
                                masks_queries=False), cta))
      for start, stop, partial, dense in segments:
        dq = lax.fori_loop(start, stop, functools.partial(
            step, partial=partial, dense=dense), dq)
      dq = dq * spec.scale
      q_smem[...] = dq.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      kv_head = lax.div(h, jnp.int32(groups))
      streams = [(k_ref, k_smem, k_full, k_free), (v_ref, v_smem, v_full, v_free)]
      if cfg.sparse:
        streams.append((kn_ref, kn_smem, kn_full, kn_free))

      def load(i, slot, wait):
        rows = (b, pl.ds(tile_of(lo + i) * bk, bk), kv_head)
        for ref, smem, full, free in streams:
          if wait:
            plgpu.barrier_wait(free.at[slot])
          plgpu.copy_gmem_to_smem(ref.at[rows], smem.at[slot], full.at[slot])

      num_steps = hi - lo
      for i in range(steps):
        pl.when(i < num_steps)(functools.partial(load, i, i, False))

      @pl.loop(steps, jnp.maximum(num_steps, steps))
      def _refill(i):
        load(i, lax.rem(i, jnp.int32(steps)), True)

  def entry(*refs):
    d = spec.head_dim
    ring = lambda: _smem_tile(dtype, steps, bk, d)
    smem = (_smem_tile(dtype, COMPUTE_WGS, BLOCK_Q, d),
            _smem_tile(dtype, COMPUTE_WGS, BLOCK_Q, d),
            plgpu.SMEM((COMPUTE_WGS, BLOCK_Q), jnp.float32),
            plgpu.SMEM((COMPUTE_WGS, BLOCK_Q), jnp.float32),
            ring(), ring(), ring() if cfg.sparse else None)
    free = lambda: plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=steps)
    # A consumer's four row copies (Q, dO, lse, delta) arrive on one barrier.
    barriers = (plgpu.Barrier(num_arrivals=4, num_barriers=COMPUTE_WGS),
                plgpu.Barrier(num_barriers=steps), plgpu.Barrier(num_barriers=steps),
                plgpu.Barrier(num_barriers=steps) if cfg.sparse else None,
                free(), free(), free() if cfg.sparse else None)
    pl.run_scoped(lambda *scratch: kernel(*refs, scratch),
                  smem, barriers, collective_axes="wg")

  out_type = jax.ShapeDtypeStruct((spec.batch, cfg.q_pad, spec.heads,
                                   spec.head_dim), dtype)
  return plgpu.kernel(
      entry, out_type=out_type,
      grid=(spec.heads, cfg.q_pad // CTA_ROWS, spec.batch),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=COMPUTE_WGS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, k, v, *rest)


def _dkv_call(cfg: _Config, q, k, v, do, lse, delta, *rest):
  spec, tuning = cfg.spec, cfg.tuning
  steps, dtype = tuning.max_concurrent_steps, spec.dtype
  groups = spec.heads // spec.kv_heads
  has_extra = cfg.dkv_tile.extra_shape is not None
  has_bias = spec.bias_shape is not None
  has_pattern = cfg.dkv_lists is not None
  positional = tile_plan.needs_positional_masks(spec, cfg.kv_pad,
                                                masks_queries=False)
  units = scores.score_units(cfg.dkv_tile)
  q_tiles = cfg.q_pad // BLOCK_Q
  selects = _selections(cfg, cfg.dkv_tile, positional, scores.PRUNE)

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
    refs = list(refs)
    extra_ref = refs.pop(0) if has_extra else None
    kvlen_ref = refs.pop(0) if spec.has_kv_lengths else None
    tiles_ref, bounds_ref = (refs.pop(0), refs.pop(0)) if has_pattern else (None,) * 2
    dk_ref, dv_ref, *dbias_ref, scratch = refs
    (k_smem2, v_smem2, q_smem, do_smem, lse_smem, delta_smem, p_smem2,
     ds_smem2, ds32_smem2), barriers = scratch
    own_full, rows_full, free = barriers
    b = lax.axis_index("batch")
    kv_head = lax.axis_index("heads")
    kv_tile = lax.axis_index("kv_seq")
    wg = lax.axis_index("wg")
    kv_valid = _kv_valid(cfg, kvlen_ref, b)
    q_limit = jnp.int32(spec.q_len)
    cta = tile_plan.query_tiles(spec, kv_tile * CTA_ROWS, CTA_ROWS, BLOCK_Q,
                                q_limit, kv_valid)

    # The walk of query head `group` of the key head: list positions
    # [0, visited(group)), position i holding query tile tile_of(group, i).
    # The ring's steps count on across the heads.
    if has_pattern:
      def reader(ref, group):
        return scores.list_reader(cfg.dkv_lists, ref, b, kv_head * groups + group,
                                  kv_tile)
      tile_of = lambda group, i: reader(tiles_ref, group)(i)
      visited = lambda group: reader(bounds_ref, group)(tile_plan.SKIPPED)
    else:
      tile_of = lambda group, i: cta.lo + i
      visited = lambda group: cta.hi - cta.lo

    def walk(body, carry):
      """`body(group, i, count, carry)` over every head's list positions."""
      def head(group, carry):
        count, carry = carry
        n = visited(group)
        carry = lax.fori_loop(0, n, lambda i, c: body(group, i, count + i, c),
                              carry)
        return count + n, carry
      return lax.fori_loop(0, groups, head, (jnp.int32(0), carry))[1]

    @pl.when(wg < COMPUTE_WGS)
    def _consumer():
      plgpu.set_max_registers(tuning.consumer_registers, action="increase")
      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      p_smem, ds_smem = p_smem2.at[wg], ds_smem2.at[wg]
      k_first = kv_tile * CTA_ROWS + wg * BLOCK_K
      keys = (b, pl.ds(k_first, BLOCK_K), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem, own_full.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem, own_full.at[wg])
      plgpu.barrier_wait(own_full.at[wg])
      zeros = lambda: plgpu.layout_cast(
          jnp.full((BLOCK_K, spec.head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)
      row_layout = plgpu.Layout.WGMMA.reduce(1)

      def ds_tile(group, q_step):
        return dbias_ref[0].at[b, kv_head * groups + group,
                               pl.ds(q_step * BLOCK_Q, BLOCK_Q),
                               pl.ds(k_first, BLOCK_K)]

      if has_bias:  # dS is zero in the query tiles the walk skips
        ds32_smem = ds32_smem2.at[wg]
        ds32_smem[...] = plgpu.layout_cast(
            jnp.full((BLOCK_Q, BLOCK_K), 0.0, jnp.float32), plgpu.Layout.WGMMA)
        plgpu.commit_smem()
        clear = lambda group, q_step: plgpu.copy_smem_to_gmem(
            ds32_smem, ds_tile(group, q_step))

        @pl.loop(0, groups)
        def _clear(group):
          if has_pattern:  # the list's SKIPPED segment
            pl.loop(visited(group), q_tiles)(
                lambda i: clear(group, tile_of(group, i)))
          else:
            pl.loop(0, cta.lo)(lambda q_step: clear(group, q_step))
            pl.loop(cta.hi, q_tiles)(lambda q_step: clear(group, q_step))

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

      def step(group, i, count, carry, partial, dense):
        dk, dv = carry
        slot = lax.rem(count, jnp.int32(steps))
        q_step = tile_of(group, i)
        h = kv_head * groups + group
        plgpu.barrier_wait(rows_full.at[slot])

        def scores_of(a_smem, b_smem):
          def compute(acc_ref):
            plgpu.wgmma(acc_ref, a_smem, b_smem.transpose((1, 0)))
            return acc_ref[...]
          return pl.run_scoped(compute, plgpu.ACC((BLOCK_Q, BLOCK_K), jnp.float32))

        s = scores_of(q_smem.at[slot], k_smem)
        dp = scores_of(do_smem.at[slot], v_smem)
        args = [k_first, q_step * BLOCK_Q, kv_valid, b, h]
        if has_extra:
          args.append(extra_ref)
        kept = selects[(partial, dense)](s, *args)
        lse = _compat.mosaic_load(lse_smem.at[slot], layout=row_layout)
        delta = _compat.mosaic_load(delta_smem.at[slot], layout=row_layout)
        p, ds = _grad_scores(kept, dp, lse, delta, units)
        p_smem[...] = p.astype(dtype)
        ds_smem[...] = ds.astype(dtype)
        if has_bias:
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's store
          ds32_smem[...] = ds
        plgpu.commit_smem()
        if has_bias:
          plgpu.copy_smem_to_gmem(ds32_smem, ds_tile(group, q_step))

        def accumulate(acc_refs):
          dv_ref_, dk_ref_ = acc_refs
          plgpu.wgmma(dv_ref_, p_smem.transpose((1, 0)), do_smem.at[slot])
          plgpu.wgmma(dk_ref_, ds_smem.transpose((1, 0)), q_smem.at[slot])
        dv, dk = pl.run_state(accumulate)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
        plgpu.barrier_arrive(free.at[slot])
        return dk, dv

      if has_pattern:
        # Segment bounds are list positions; a pattern's head has its own list.
        def head(group, carry):
          count, carry = carry
          bound = reader(bounds_ref, group)
          for start, stop, partial, dense in _segments(spec, positional, bound=bound):
            carry = lax.fori_loop(start, stop, lambda i, c, partial=partial, dense=dense:
                                  step(group, i, count + i, c, partial, dense), carry)
          return count + visited(group), carry
      else:
        own = tile_plan.within(
            tile_plan.query_tiles(spec, k_first, BLOCK_K, BLOCK_Q, q_limit,
                                  kv_valid), cta)

        def head(group, carry):
          count, carry = carry
          for start, stop, partial, dense in _segments(spec, positional, own):
            # Positions are query tiles less cta.lo here.
            carry = lax.fori_loop(
                start - cta.lo, stop - cta.lo,
                lambda i, c, partial=partial, dense=dense:
                step(group, i, count + i, c, partial, dense), carry)
          return count + visited(group), carry

      _, (dk, dv) = lax.fori_loop(0, groups, head,
                                  (jnp.int32(0), (zeros(), zeros())))
      k_smem[...] = (dk * spec.scale).astype(dtype)
      v_smem[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[keys], commit_group=False)
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[keys], commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def load(group, i, count, carry):
        slot = lax.rem(count, jnp.int32(steps))
        pl.when(count >= steps)(lambda: plgpu.barrier_wait(free.at[slot]))
        q_step = tile_of(group, i)
        h = kv_head * groups + group
        rows = (b, pl.ds(q_step * BLOCK_Q, BLOCK_Q), h)
        vector = (b, h, pl.ds(q_step * BLOCK_Q, BLOCK_Q))
        full = rows_full.at[slot]
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], full)
        plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], full)
        plgpu.copy_gmem_to_smem(lse_ref.at[vector], lse_smem.at[slot], full)
        plgpu.copy_gmem_to_smem(delta_ref.at[vector], delta_smem.at[slot], full)
        return carry

      walk(load, 0)

  def entry(*refs):
    d = spec.head_dim
    smem = (_smem_tile(dtype, COMPUTE_WGS, BLOCK_K, d),
            _smem_tile(dtype, COMPUTE_WGS, BLOCK_K, d),
            _smem_tile(dtype, steps, BLOCK_Q, d), _smem_tile(dtype, steps, BLOCK_Q, d),
            plgpu.SMEM((steps, BLOCK_Q), jnp.float32),
            plgpu.SMEM((steps, BLOCK_Q), jnp.float32),
            _smem_tile(dtype, COMPUTE_WGS, BLOCK_Q, BLOCK_K),
            _smem_tile(dtype, COMPUTE_WGS, BLOCK_Q, BLOCK_K),
            plgpu.SMEM((COMPUTE_WGS, BLOCK_Q, BLOCK_K), jnp.float32)
            if has_bias else None)
    # The four copies of a ring slot (Q, dO, lse, delta) arrive on one
    # barrier, as do a consumer's own K and V.
    barriers = (plgpu.Barrier(num_arrivals=2, num_barriers=COMPUTE_WGS),
                plgpu.Barrier(num_arrivals=4, num_barriers=steps),
                plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=steps))
    pl.run_scoped(lambda *scratch: kernel(*refs, scratch),
                  smem, barriers, collective_axes="wg")

  grad = jax.ShapeDtypeStruct((spec.batch, cfg.kv_pad, spec.kv_heads,
                               spec.head_dim), dtype)
  out_type = (grad, grad)
  if has_bias:
    out_type += (jax.ShapeDtypeStruct((spec.batch, spec.heads, cfg.q_pad,
                                       cfg.kv_pad), jnp.float32),)
  return plgpu.kernel(
      entry, out_type=out_type,
      grid=(spec.kv_heads, cfg.kv_pad // CTA_ROWS, spec.batch),
      grid_names=("heads", "kv_seq", "batch"),
      num_threads=COMPUTE_WGS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, k, v, do, lse, delta, *rest)
