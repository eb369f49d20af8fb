"""Forward kernel: fused N:M flash attention, one program per (query tile, batch, head).

The query tile stays resident while the program walks its key tiles (in lane
order, see `_common`): one `q k^T` dot per tile, float32 scores split into
lanes (`q.k` unscaled where `Plan.selects_unscaled`), masks, N:M selection,
online softmax over the kept scores, one `P V` dot. The score matrix never
reaches memory. It writes the output and the log-sum-exp of the kept scores
(the backward's residual).
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


def _forward_kernel(q_ref, k_ref, v_ref, bias_ref, mask_ref, q_lengths_ref,
                    kv_lengths_ref, tiles_ref, bounds_ref, out_ref, lse_ref,
                    keep_ref=None, *, plan: Plan, block_q: int, block_k: int):
  num_q_tiles = pl.num_programs(0)
  q_tile = num_q_tiles - 1 - pl.program_id(0)  # longest causal rows first
  q0 = q_tile * block_q
  q_limit, kv_limit = _common.sequence_limits(plan, q_lengths_ref,
                                              kv_lengths_ref, pl.program_id(1))
  ctx = _common.TileContext(plan, q_limit, kv_limit)
  tiles = tile_plan.key_tiles(plan.spec, q0, block_q, block_k, q_limit, kv_limit)
  q = q_ref[...]
  exponent = LOG2E * plan.score_unit  # tile scores to base-2 exponents

  def body(k_tile, carry, masked, dense=False):
    acc, row_max, row_sum = carry
    k0 = k_tile * block_k
    tile = pl.ds(k0, block_k)  # k and v are in lane order (`_common.lane_order`)
    cols = [_common.lane_slice(plan, k0, j, block_k) for j in range(plan.lanes)]
    scores = ctx.tile_scores(_compat.dot(q, k_ref[tile, :], trans_b=True), q0, k0,
                             cols, masked=masked, bias_ref=bias_ref,
                             mask_ref=mask_ref)
    kept, group_max = ctx.kept_scores(scores, dense)
    new_max = jnp.maximum(row_max, jnp.max(group_max, axis=1))
    # A row with nothing kept yet has max -inf; exponentiate against 0 instead.
    safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)
    correction = _common.exp2(plan, (row_max - safe_max) * exponent)
    shift = (safe_max * exponent)[:, None]
    probs = [_common.exp2(plan, s * exponent - shift) for s in kept]
    row_sum = row_sum * correction + jnp.sum(functools.reduce(jnp.add, probs),
                                             axis=1)
    acc = acc * correction[:, None]
    acc = acc + _compat.dot(
        _common.join_lanes(plan, [p.astype(v_ref.dtype) for p in probs]),
        v_ref[tile, :])
    if keep_ref is not None:
      for k, lane in zip(ctx.keep_masks(scores, dense), cols):
        keep_ref[:, lane] = k.astype(keep_ref.dtype)
    return acc, new_max, row_sum

  init = (jnp.zeros(q.shape, jnp.float32),
          jnp.full((block_q,), -jnp.inf, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  if tiles_ref is None:
    acc, row_max, row_sum = _common.loop_tiles(plan, tiles, body, init)
  else:
    acc, row_max, row_sum = _common.loop_pattern(
        plan, tiles_ref, bounds_ref, body, init,
        partial=plan.has_partial_tiles(block_q, block_k))
  empty = row_sum == 0.0
  safe_sum = jnp.where(empty, 1.0, row_sum)
  out_ref[...] = (acc * (1.0 / safe_sum)[:, None]).astype(out_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf,
                           row_max * plan.score_unit + jnp.log(safe_sum))
  if keep_ref is not None:
    _common.clear_unvisited(keep_ref, tiles, tiles_ref, bounds_ref, block_k)


def forward(plan: Plan, q, k, v, bias, mask, q_lengths, kv_lengths,
            block_modes=None, *, return_keep: bool = False):
  """Runs the forward kernel on canonical operands (the arrays of an `AttentionCall`).

  With `block_modes` (a pattern's) each query tile visits only the key tiles
  of its list (`tile_plan.pattern_tiles`).

  Returns `out [B, T, H, D]`, `lse [B, H, T]` float32 and, with `return_keep`,
  the kernel's N:M keep-mask `[B, H, T, S]` (bool).
  """
  block_q, block_k = plan.forward_blocks
  t_pad, s_pad = plan.padded_lengths(block_q, block_k)
  num_q_tiles = t_pad // block_q
  q = pad_axis(q, 1, t_pad)
  k = pad_axis(k, 1, s_pad)
  v = pad_axis(v, 1, s_pad)
  k, v = (_common.lane_order(plan, x, block_k) for x in (k, v))
  bias = pad_broadcast(bias, t_pad, s_pad)
  mask = _common.mask_as_int8(pad_broadcast(mask, t_pad, s_pad))
  groups = plan.spec.groups
  dim = plan.spec.head_dim

  def q_block(i, b, h):
    return b, num_q_tiles - 1 - i, h, 0

  def kv_block(i, b, h):
    del i
    return b, 0, lax.div(h, groups), 0

  def row_block(i, b, h):
    return b, h, num_q_tiles - 1 - i, 0

  pattern = plan.pattern_tiles(block_modes, block_q, block_k, q_lengths,
                               kv_lengths)
  in_specs = _common.operand_specs(
      plan, pl.BlockSpec((None, block_q, None, dim), q_block),
      pl.BlockSpec((None, s_pad, None, dim), kv_block), (None, block_q, s_pad),
      row_block, bias, mask, q_lengths, kv_lengths) + _common.pattern_specs(
          pattern, lambda i, b, h: (b, h, num_q_tiles - 1 - i))
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((plan.spec.batch, plan.spec.heads, t_pad), jnp.float32)]
  out_specs = [pl.BlockSpec((None, block_q, None, dim), q_block),
               pl.BlockSpec((None, None, block_q),
                            lambda i, b, h: (b, h, num_q_tiles - 1 - i))]
  if return_keep:
    out_shape.append(jax.ShapeDtypeStruct((plan.spec.batch, plan.spec.heads, t_pad, s_pad),
                                          jnp.int8))
    out_specs.append(pl.BlockSpec((None, None, block_q, s_pad), row_block))
  kernel = functools.partial(_forward_kernel, plan=plan, block_q=block_q,
                             block_k=block_k)
  # The keep-mask output tile pushed three stages at head_dim 128 past the
  # H100's shared memory (233472 > 232448 bytes); this path is for tests.
  num_stages = min(plan.tuning.num_stages, 2) if return_keep else plan.tuning.num_stages
  results = pl.pallas_call(
      kernel,
      grid=(num_q_tiles, plan.spec.batch, plan.spec.heads),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_compat.triton_compiler_params(plan.tuning.num_warps,
                                                     num_stages),
      interpret=plan.interpret,
      name="nm_flash_forward",
  )(q, k, v, bias, mask, q_lengths, kv_lengths, *_common.pattern_operands(pattern))
  out = results[0][:, :plan.spec.q_len]
  lse = results[1][:, :, :plan.spec.q_len]
  if not return_keep:
    return out, lse
  return out, lse, results[2][:, :, :plan.spec.q_len, :plan.spec.kv_len] != 0
