"""Backward kernels: dQ, and dK/dV, from the forward's log-sum-exp.

Both recompute each score tile with the forward's code (`_common`), so the
N:M selection is the forward's, and form `P = exp(S - lse)` for the kept
scores, `dP = dO V^T`, `dS = P (dP - delta)` with `delta = rowsum(dO * O)`.

* dQ: one program per (query tile, batch, head) walks its key tiles:
  `dQ = scale * dS K`; for a bias with a full query axis it also writes dS,
  which is the bias gradient before summing over broadcast dims.
* dK/dV: one program per (key tile, batch, key/value head) walks the query
  heads of its group and their query tiles: `dV = P^T dO`,
  `dK = scale * dS^T Q`; for a bias broadcast over queries it also writes
  the column sums of dS.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat, tile_plan
from pallas_kernels.triton import _common
from pallas_kernels.call import LOG2E, pad_axis, pad_broadcast
from pallas_kernels.triton._common import Plan


def probabilities(plan: Plan, kept, lse):
  """`exp(s - lse)` of kept tile scores (`plan.score_unit` units); rows
  without any (lse = +-inf) give 0.

  Unlike the forward, scores are scaled before the exponent: the forward's
  lse holds `scale * q.k` rounded as here, so a row's maximum gives
  exactly `exp(0) = 1` (a row of one key then has dq = dk = 0 exactly).
  """
  shift = (jnp.where(lse == -jnp.inf, jnp.inf, lse) * LOG2E)[:, None]
  if plan.selects_unscaled:
    kept = [s * plan.spec.scale for s in kept]
  return [_common.exp2(plan, s * LOG2E - shift) for s in kept]


def _dq_kernel(q_ref, k_ref, v_ref, bias_ref, mask_ref, q_lengths_ref,
               kv_lengths_ref, d_out_ref, lse_ref, delta_ref, tiles_ref,
               bounds_ref, dq_ref, dbias_ref=None, *, plan: Plan, block_q: int,
               block_k: int):
  q0 = pl.program_id(0) * block_q
  q_limit, kv_limit = _common.sequence_limits(plan, q_lengths_ref,
                                              kv_lengths_ref, pl.program_id(1))
  ctx = _common.TileContext(plan, q_limit, kv_limit)
  tiles = tile_plan.key_tiles(plan.spec, q0, block_q, block_k, q_limit, kv_limit)
  q, d_out = q_ref[...], d_out_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def body(k_tile, dq, masked, dense=False):
    k0 = k_tile * block_k
    tile = pl.ds(k0, block_k)  # k and v are in lane order
    cols = [_common.lane_slice(plan, k0, j, block_k) for j in range(plan.lanes)]
    key_tile = k_ref[tile, :]
    scores = ctx.tile_scores(_compat.dot(q, key_tile, trans_b=True), q0, k0, cols,
                             masked=masked, bias_ref=bias_ref, mask_ref=mask_ref)
    dps = _common.split_lanes(plan, _compat.dot(d_out, v_ref[tile, :],
                                                trans_b=True))
    kept, _ = ctx.kept_scores(scores, dense)
    ds_lanes = []
    for p, dp, lane in zip(probabilities(plan, kept, lse), dps, cols):
      ds = p * (dp - delta[:, None])
      ds_lanes.append(ds.astype(q.dtype))
      if dbias_ref is not None:
        dbias_ref[:, lane] = ds
    return dq + _compat.dot(_common.join_lanes(plan, ds_lanes), key_tile)

  zeros = jnp.zeros(q.shape, jnp.float32)
  if tiles_ref is None:
    dq = _common.loop_tiles(plan, tiles, body, zeros)
  else:
    dq = _common.loop_pattern(plan, tiles_ref, bounds_ref, body, zeros,
                              partial=plan.has_partial_tiles(block_q, block_k))
  dq_ref[...] = (dq * plan.spec.scale).astype(dq_ref.dtype)
  if dbias_ref is not None:
    _common.clear_unvisited(dbias_ref, tiles, tiles_ref, bounds_ref, block_k)


def _dkv_kernel(q_ref, k_ref, v_ref, bias_ref, mask_ref, q_lengths_ref,
                kv_lengths_ref, d_out_ref, lse_ref, delta_ref, tiles_ref,
                bounds_ref, dk_ref, dv_ref, dbias_ref=None, *, plan: Plan,
                block_q: int, block_k: int):
  k0 = pl.program_id(0) * block_k
  q_limit, kv_limit = _common.sequence_limits(plan, q_lengths_ref,
                                              kv_lengths_ref, pl.program_id(1))
  ctx = _common.TileContext(plan, q_limit, kv_limit)
  tiles = tile_plan.query_tiles(plan.spec, k0, block_k, block_q, q_limit, kv_limit)
  cols = [_common.lane_slice(plan, 0, j, block_k) for j in range(plan.lanes)]
  # k, v in lane order; dk, dv come out in it (`_dkv` restores key order)
  key_tile, value_tile = k_ref[...], v_ref[...]
  width = block_k // plan.lanes

  def head(g, carry):
    def body(q_tile, carry, masked, dense=False):
      dk, dv, dbias = carry
      q0 = q_tile * block_q
      rows = pl.ds(q0, block_q)
      q, d_out = q_ref[rows, g, :], d_out_ref[rows, g, :]
      lse, delta = lse_ref[g, rows], delta_ref[g, rows]
      scores = ctx.tile_scores(_compat.dot(q, key_tile, trans_b=True), q0, k0,
                               cols, masked=masked, bias_ref=bias_ref,
                               mask_ref=mask_ref, head=g, rows=rows)
      dps = _common.split_lanes(plan, _compat.dot(d_out, value_tile,
                                                  trans_b=True))
      kept, _ = ctx.kept_scores(scores, dense)
      p_lanes, ds_lanes, new_dbias = [], [], []
      for j, (p, dp) in enumerate(zip(probabilities(plan, kept, lse), dps)):
        ds = p * (dp - delta[:, None])
        p_lanes.append(p.astype(d_out.dtype))
        ds_lanes.append(ds.astype(q.dtype))
        if dbias is not None:
          new_dbias.append(dbias[j] + jnp.sum(ds, axis=0))
      new_dv = dv + _compat.dot(_common.join_lanes(plan, p_lanes), d_out,
                                trans_a=True)
      new_dk = dk + _compat.dot(_common.join_lanes(plan, ds_lanes), q,
                                trans_a=True)
      return new_dk, new_dv, (new_dbias if dbias is not None else None)

    dk, dv = carry
    dbias = None
    if dbias_ref is not None:
      dbias = [jnp.zeros((width,), jnp.float32) for _ in cols]
    if tiles_ref is None:
      dk, dv, dbias = _common.loop_tiles(plan, tiles, body, (dk, dv, dbias))
    else:
      dk, dv, dbias = _common.loop_pattern(
          plan, tiles_ref, bounds_ref, body, (dk, dv, dbias),
          partial=plan.has_partial_tiles(block_q, block_k), head=g)
    if dbias_ref is not None:
      for lane, column_sums in zip(cols, dbias):
        dbias_ref[g, lane] = column_sums
    return dk, dv

  zeros = jnp.zeros((block_k, plan.spec.head_dim), jnp.float32)
  dk, dv = lax.fori_loop(0, plan.spec.groups, head, (zeros, zeros))
  dk_ref[...] = (dk * plan.spec.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(plan: Plan, q, k, v, bias, mask, q_lengths, kv_lengths,
             block_modes, out, lse, d_out):
  """Gradients `(dq, dk, dv, dbias)` of a forward call with these operands.

  With `block_modes` (a pattern's) the dQ kernel walks each query tile's key
  tile list and the dK/dV kernel each key tile's query tile list.

  `lse [B, H, T]` float32 is the natural log of the sum of exp of the kept
  scores; rows with no kept score may hold +inf or -inf. `dbias` is None
  without a bias, else in the bias' (canonical 4-D) shape and dtype.
  """
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32),
                     d_out.astype(jnp.float32))
  dq, dbias_rows = _dq(plan, q, k, v, bias, mask, q_lengths, kv_lengths,
                       block_modes, d_out, lse, delta)
  dk, dv, dbias_cols = _dkv(plan, q, k, v, bias, mask, q_lengths, kv_lengths,
                            block_modes, d_out, lse, delta)
  dbias = None
  if bias is not None:
    ds = dbias_rows if dbias_rows is not None else dbias_cols[:, :, None, :]
    ds = ds[:, :, :plan.spec.q_len, :plan.spec.kv_len]
    summed = tuple(axis for axis in range(4) if bias.shape[axis] == 1)
    dbias = jnp.sum(ds, axis=summed, keepdims=True).astype(bias.dtype)
  return dq, dk, dv, dbias


def _padded_operands(plan: Plan, block_q: int, block_k: int, q, k, v, bias,
                     mask, d_out, lse, delta):
  t_pad, s_pad = plan.padded_lengths(block_q, block_k)
  q, d_out = (pad_axis(x, 1, t_pad) for x in (q, d_out))
  k, v = (pad_axis(x, 1, s_pad) for x in (k, v))
  lse, delta = (pad_axis(x, 2, t_pad) for x in (lse, delta))
  bias = pad_broadcast(bias, t_pad, s_pad)
  mask = _common.mask_as_int8(pad_broadcast(mask, t_pad, s_pad))
  return t_pad, s_pad, (q, k, v, bias, mask, d_out, lse, delta)


def _dq(plan, q, k, v, bias, mask, q_lengths, kv_lengths, block_modes, d_out,
        lse, delta):
  block_q, block_k = plan.dq_blocks
  t_pad, s_pad, (q, k, v, bias, mask, d_out, lse, delta) = _padded_operands(
      plan, block_q, block_k, q, k, v, bias, mask, d_out, lse, delta)
  k, v = (_common.lane_order(plan, x, block_k) for x in (k, v))
  groups, dim = plan.spec.groups, plan.spec.head_dim
  pattern = plan.pattern_tiles(block_modes, block_q, block_k, q_lengths,
                               kv_lengths)

  def q_block(i, b, h):
    return b, i, h, 0

  def kv_block(i, b, h):
    del i
    return b, 0, lax.div(h, groups), 0

  def row_block(i, b, h):
    return b, h, i, 0

  def stat_block(i, b, h):
    return b, h, i

  in_specs = _common.operand_specs(
      plan, pl.BlockSpec((None, block_q, None, dim), q_block),
      pl.BlockSpec((None, s_pad, None, dim), kv_block), (None, block_q, s_pad),
      row_block, bias, mask, q_lengths, kv_lengths) + [
      pl.BlockSpec((None, block_q, None, dim), q_block),
      pl.BlockSpec((None, None, block_q), stat_block),
      pl.BlockSpec((None, None, block_q), stat_block),
  ] + _common.pattern_specs(pattern, stat_block)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  out_specs = [pl.BlockSpec((None, block_q, None, dim), q_block)]
  writes_dbias = bias is not None and plan.spec.bias_full[2]
  if writes_dbias:
    out_shape.append(jax.ShapeDtypeStruct((plan.spec.batch, plan.spec.heads, t_pad, s_pad),
                                          jnp.float32))
    out_specs.append(pl.BlockSpec((None, None, block_q, s_pad), row_block))
  results = pl.pallas_call(
      functools.partial(_dq_kernel, plan=plan, block_q=block_q, block_k=block_k),
      grid=(t_pad // block_q, plan.spec.batch, plan.spec.heads),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_compat.triton_compiler_params(plan.tuning.num_warps_bwd,
                                                     plan.tuning.num_stages_bwd),
      interpret=plan.interpret,
      name="nm_flash_backward_dq",
  )(q, k, v, bias, mask, q_lengths, kv_lengths, d_out, lse, delta,
    *_common.pattern_operands(pattern))
  dq = results[0][:, :plan.spec.q_len]
  return dq, (results[1] if writes_dbias else None)


def _group_block(i, b, h):
  """Every query row of the query heads of key/value head `h`."""
  del i
  return b, 0, h, 0


def key_tile_operand_specs(plan: Plan, block_q: int, block_k: int, bias, mask,
                           q_lengths, kv_lengths):
  """`_common.operand_specs` of a kernel with one program per (key tile,
  batch, key/value head) that walks the query rows of its group (dK/dV,
  key importance): q whole per group, k and v one tile, bias/mask tiles
  `(groups, t_pad, block_k)`."""
  t_pad, _ = plan.padded_lengths(block_q, block_k)
  groups, dim = plan.spec.groups, plan.spec.head_dim
  return _common.operand_specs(
      plan, pl.BlockSpec((None, t_pad, groups, dim), _group_block),
      pl.BlockSpec((None, block_k, None, dim), lambda i, b, h: (b, i, h, 0)),
      (groups, t_pad, block_k), lambda i, b, h: (b, h, 0, i), bias, mask,
      q_lengths, kv_lengths)


def _dkv(plan, q, k, v, bias, mask, q_lengths, kv_lengths, block_modes, d_out,
         lse, delta):
  block_q, block_k = plan.dkv_blocks
  t_pad, s_pad, (q, k, v, bias, mask, d_out, lse, delta) = _padded_operands(
      plan, block_q, block_k, q, k, v, bias, mask, d_out, lse, delta)
  k, v = (_common.lane_order(plan, x, block_k) for x in (k, v))
  groups, dim = plan.spec.groups, plan.spec.head_dim
  pattern = plan.pattern_tiles(block_modes, block_q, block_k, q_lengths,
                               kv_lengths, transposed=True)

  def stat_block(i, b, h):
    del i
    return b, h, 0

  in_specs = key_tile_operand_specs(plan, block_q, block_k, bias, mask,
                                    q_lengths, kv_lengths) + [
      pl.BlockSpec((None, t_pad, groups, dim), _group_block),
      pl.BlockSpec((None, groups, t_pad), stat_block),
      pl.BlockSpec((None, groups, t_pad), stat_block),
  ] + _common.pattern_specs(pattern, lambda i, b, h: (b, h, i),
                            heads_block=groups)
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype),
               jax.ShapeDtypeStruct(v.shape, v.dtype)]
  out_specs = [pl.BlockSpec((None, block_k, None, dim),
                            lambda i, b, h: (b, i, h, 0))] * 2
  writes_dbias = bias is not None and not plan.spec.bias_full[2]
  if writes_dbias:
    out_shape.append(jax.ShapeDtypeStruct((plan.spec.batch, plan.spec.heads, s_pad),
                                          jnp.float32))
    out_specs.append(pl.BlockSpec((None, groups, block_k),
                                  lambda i, b, h: (b, h, i)))
  results = pl.pallas_call(
      functools.partial(_dkv_kernel, plan=plan, block_q=block_q, block_k=block_k),
      grid=(s_pad // block_k, plan.spec.batch, plan.spec.kv_heads),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_compat.triton_compiler_params(plan.tuning.num_warps_bwd,
                                                     plan.tuning.num_stages_bwd),
      interpret=plan.interpret,
      name="nm_flash_backward_dkv",
  )(q, k, v, bias, mask, q_lengths, kv_lengths, d_out, lse, delta,
    *_common.pattern_operands(pattern))
  dk, dv = (_common.lane_order(plan, x, block_k, inverse=True)[:, :plan.spec.kv_len]
            for x in results[:2])
  return dk, dv, (results[2] if writes_dbias else None)
