"""Key importance kernel: the pruned attention probability each key receives.

`importance[b, h, j] = sum_i exp(s_ij - lse_i)` over the kept scores `s_ij`
of the queries `i` (SpAtten's token importance), from a forward's
log-sum-exp. Exact importance needs each row's final normaliser before the
rows are summed, which the forward knows only at the end of its row, so this
is a second kernel: one program per (key tile, batch, key/value head) keeps
its key tile resident and walks the query tiles of each query head of its
group, as the dK/dV kernel does, recomputing the scores with the forward's
code (same masks, same N:M selection) and summing `exp(s - lse)` down each
column. It does one `q k^T` dot per tile, against the forward's two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat, tile_plan
from pallas_kernels.call import pad_axis, pad_broadcast
from pallas_kernels.triton import _common
from pallas_kernels.triton._common import Plan
from pallas_kernels.triton import backward


def _importance_kernel(q_ref, k_ref, v_ref, bias_ref, mask_ref, q_lengths_ref,
                       kv_lengths_ref, lse_ref, tiles_ref, bounds_ref,
                       importance_ref, *, plan: Plan, block_q: int,
                       block_k: int):
  del v_ref  # None: the kernels share one operand order (`operand_specs`)
  k0 = pl.program_id(0) * block_k
  q_limit, kv_limit = _common.sequence_limits(plan, q_lengths_ref,
                                              kv_lengths_ref, pl.program_id(1))
  ctx = _common.TileContext(plan, q_limit, kv_limit)
  tiles = tile_plan.query_tiles(plan.spec, k0, block_k, block_q, q_limit, kv_limit)
  cols = [_common.lane_slice(plan, 0, j, block_k) for j in range(plan.lanes)]
  key_tile = k_ref[...]  # lane order
  width = block_k // plan.lanes

  def head(g, carry):
    def body(q_tile, sums, masked, dense=False):
      q0 = q_tile * block_q
      rows = pl.ds(q0, block_q)
      scores = ctx.tile_scores(_compat.dot(q_ref[rows, g, :], key_tile,
                                           trans_b=True), q0, k0, cols,
                               masked=masked, bias_ref=bias_ref,
                               mask_ref=mask_ref, head=g, rows=rows)
      kept, _ = ctx.kept_scores(scores, dense)
      return [s + jnp.sum(p, axis=0) for s, p in
              zip(sums, backward.probabilities(plan, kept, lse_ref[g, rows]))]

    sums = [jnp.zeros((width,), jnp.float32) for _ in cols]
    if tiles_ref is None:
      sums = _common.loop_tiles(plan, tiles, body, sums)
    else:
      sums = _common.loop_pattern(plan, tiles_ref, bounds_ref, body, sums,
                                  partial=plan.has_partial_tiles(block_q, block_k),
                                  head=g)
    for lane, column_sums in zip(cols, sums):
      importance_ref[g, lane] = column_sums
    return carry

  lax.fori_loop(0, plan.spec.groups, head, 0)


def key_importance(plan: Plan, q, k, bias, mask, q_lengths, kv_lengths,
                   block_modes, lse):
  """Key importance `[B, H, S]` float32 of a call, given its forward's lse.

  `lse [B, H, T]` as the forward returns it (rows with no kept score +-inf
  contribute nothing). Uses the dK/dV kernel's tiles (`Plan.dkv_blocks`).
  """
  block_q, block_k = plan.dkv_blocks
  t_pad, s_pad = plan.padded_lengths(block_q, block_k)
  q = pad_axis(q, 1, t_pad)
  k = _common.lane_order(plan, pad_axis(k, 1, s_pad), block_k)
  lse = pad_axis(lse, 2, t_pad)
  bias = pad_broadcast(bias, t_pad, s_pad)
  mask = _common.mask_as_int8(pad_broadcast(mask, t_pad, s_pad))
  groups = plan.spec.groups
  pattern = plan.pattern_tiles(block_modes, block_q, block_k, q_lengths,
                               kv_lengths, transposed=True)

  in_specs = backward.key_tile_operand_specs(plan, block_q, block_k, bias,
                                             mask, q_lengths, kv_lengths)
  in_specs[2] = None  # no value operand
  in_specs += [
      pl.BlockSpec((None, groups, t_pad), lambda i, b, h: (b, h, 0)),
  ] + _common.pattern_specs(pattern, lambda i, b, h: (b, h, i),
                            heads_block=groups)
  importance = pl.pallas_call(
      functools.partial(_importance_kernel, plan=plan, block_q=block_q,
                        block_k=block_k),
      grid=(s_pad // block_k, plan.spec.batch, plan.spec.kv_heads),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, groups, block_k), lambda i, b, h: (b, h, i)),
      out_shape=jax.ShapeDtypeStruct((plan.spec.batch, plan.spec.heads, s_pad),
                                     jnp.float32),
      compiler_params=_compat.triton_compiler_params(plan.tuning.num_warps_bwd,
                                                     plan.tuning.num_stages_bwd),
      interpret=plan.interpret,
      name="nm_flash_key_importance",
  )(q, k, None, bias, mask, q_lengths, kv_lengths, lse,
    *_common.pattern_operands(pattern))
  return importance[:, :, :plan.spec.kv_len]
