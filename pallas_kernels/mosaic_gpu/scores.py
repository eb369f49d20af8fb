"""The score tile code that the Hopper forward and backward kernels share.

Both kernels compute `S = Q K^T` on permuted keys and hand the accumulator to
one inline Mosaic GPU function made here (`make_select`), so that the
backward recomputes exactly the forward's scaling, masks and N:M selection:
the same instructions on the same values select the same keys. The operand
preparation around the kernels (the additive bias/mask term, the key
permutation and its inverse) lives here for the same reason.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import jax.experimental.pallas.mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, memref, vector

from pallas_kernels import tile_plan
from pallas_kernels.call import LOG2E, AttentionSpec, pad_broadcast
from pallas_kernels.mosaic_gpu import mlir_ops
from pallas_kernels.mosaic_gpu import sparse_fragments as sf
from pallas_kernels.mosaic_gpu import tile_select as ts

BLOCK_Q = 64  # query rows of a warpgroup's score tile (the wgmma M)

# What the selection returns (`make_select`).
KEEP_ALL = "keep_all"        # a DENSE tile: masks only, every valid score kept
PRUNE = "prune"              # N:M, dropped scores -inf, uncompressed
COMPRESS = "compress"        # N:M into the 2:4 sparse-A form and its metadata
COMPRESS_WITH = "compress_with"  # COMPRESS, and a second tile at the kept places


class ScoreTile(NamedTuple):
  """What a kernel's score tiles look like: the call, and its static layout."""
  spec: AttentionSpec
  width: int          # key permutation width (0: identity)
  block_kv: int       # keys of one warpgroup's score tile
  kv_pad: int         # the padded key length
  extra_shape: tuple[int, int, int, int] | None  # the bias/mask term


def key_width(spec: AttentionSpec) -> int:
  """The key permutation width: every group of `m` keys in one thread."""
  return max(4, spec.m) if not spec.is_dense else 0


def combine_extra(bias, mask, q_pad, kv_pad):
  """Bias and mask as one additive float32 term in base-2 units, padded."""
  if bias is None and mask is None:
    return None
  if bias is None:
    extra = jnp.where(mask, 0.0, -jnp.inf).astype(jnp.float32)
  else:
    extra = bias.astype(jnp.float32) * LOG2E
    if mask is not None:
      extra = jnp.where(mask, extra, -jnp.inf)
  return pad_broadcast(extra, q_pad, kv_pad)


def permute_keys(k, width, axis=1):
  """`k` with each block of `4 * width` entries along `axis` in accumulator order."""
  if width == 0:
    return k
  shape = k.shape
  blocks = shape[:axis] + (shape[axis] // (4 * width), 4, width // 2, 2) + shape[axis + 1:]
  k = k.reshape(blocks)
  order = list(range(len(blocks)))
  order[axis + 1], order[axis + 2] = axis + 2, axis + 1
  return k.transpose(order).reshape(shape)


def unpermute_keys(k, width, axis=1):
  """The inverse of `permute_keys`: rows of a kernel's permuted output back
  in key order."""
  if width == 0:
    return k
  shape = k.shape
  blocks = shape[:axis] + (shape[axis] // (4 * width), width // 2, 4, 2) + shape[axis + 1:]
  k = k.reshape(blocks)
  order = list(range(len(blocks)))
  order[axis + 1], order[axis + 2] = axis + 2, axis + 1
  return k.transpose(order).reshape(shape)


def score_units(tile: ScoreTile) -> float:
  """Base-2 logits per unit of the selected scores.

  Without a bias or mask term and with a positive scale, selection runs on
  the raw `q.k` (same order) and the scale folds into the softmax's
  exponent; otherwise the scores are scaled (and biased) before selection.
  """
  if tile.extra_shape is None and tile.spec.scale > 0:
    return tile.spec.scale * LOG2E
  return 1.0


def make_select(tile: ScoreTile, positional: bool, selection: str):
  """The inline Mosaic GPU function: raw scores -> selected scores.

  Called as `select(s, [other,] kv0, q0, kv_valid, b, h[, extra_ref])` with
  `s` the `[64, block_kv]` float32 accumulator (keys permuted), `kv0` the
  tile's first key, `q0` its first query row, `kv_valid` the key bound.
  `positional`: apply the positional masks (a partial tile of the tile
  plan); the bias/mask term applies to every tile. `selection`: `KEEP_ALL`
  or `PRUNE` return the `[64, block_kv]` scores; `COMPRESS` returns
  `(scores [64, block_kv // 2], metadata)`; `COMPRESS_WITH` takes a second
  `[64, block_kv]` tile `other` and returns `(scores, other at the kept
  positions, metadata)`.
  """
  compress = selection in (COMPRESS, COMPRESS_WITH)
  with_other = selection == COMPRESS_WITH
  bk = tile.block_kv
  prescale = score_units(tile) == 1.0
  spec = tile.spec
  mask = ts.MaskSpec(causal=spec.is_causal, window=spec.window,
                     kv_bound=spec.has_kv_lengths or tile.kv_pad != spec.kv_len)
  has_extra = tile.extra_shape is not None
  splat = plgpu.Layout.WG_SPLAT(())
  arg_types = [plgpu.Layout.WGMMA] * (2 if with_other else 1) + [splat] * 5
  if has_extra:
    arg_types.append(plgpu.RefType())
  half = plgpu.ShapeDtypeStruct((BLOCK_Q, bk // 2), jnp.float32,
                                plgpu.Layout.WGMMA)
  meta = plgpu.ShapeDtypeStruct((BLOCK_Q, 8), jnp.int32, plgpu.Layout.WGMMA)
  if with_other:
    ret = (half, half, meta)
  elif compress:
    ret = (half, meta)
  else:
    ret = plgpu.ShapeDtypeStruct((BLOCK_Q, bk), jnp.float32, plgpu.Layout.WGMMA)

  @plgpu.inline_mgpu(arg_types=tuple(arg_types), return_type=ret)
  def select(ctx, s, *args):
    del ctx
    other, args = (args[0], args[1:]) if with_other else (None, args)
    kv0, q0, kv_valid, b, h, *extra_ref = args
    ops = mlir_ops.MlirOps()
    tid = ops.thread_id()
    warp = ops.ishr(tid, ops.i32(5))
    lane = ops.iand(tid, ops.i32(31))
    g = ops.ishr(lane, ops.i32(2))
    t = ops.iand(lane, ops.i32(3))
    scalar = lambda x: x.registers.flat[0]
    kv0, q0, kv_valid = scalar(kv0), scalar(q0), scalar(kv_valid)
    vals = mlir_ops.thread_rows(s)
    thread_key = ops.iadd(kv0, ops.imul(t, ops.i32(sf.thread_key_offset(tile.width))))
    row0 = ops.iadd(q0, ops.iadd(ops.imul(warp, ops.i32(16)), g))
    extra = None
    if has_extra:
      extra = load_extra(tile, ops, extra_ref[0], scalar(b), scalar(h), row0,
                         thread_key, len(vals[0]))
    # The compressed path keeps NaN by itself, as does a tile without
    # selection; the pruned one needs the poison.
    poison = ts.nan_poison(ops, vals) if selection == PRUNE else None
    if prescale:
      vals = ts.scale_scores(ops, vals, spec.scale * LOG2E, extra)
    if positional:
      vals = ts.apply_masks(ops, vals, mask, tile.width,
                            ops.isub(row0, thread_key),
                            ops.isub(kv_valid, thread_key))
    if compress:
      comp, words, nibbles = ts.select_compress(ops, vals, spec.n, spec.m, t)
      outs = [mlir_ops.rows_to_array(comp)]
      if with_other:
        kept = ts.gather_kept(ops, mlir_ops.thread_rows(other), nibbles)
        outs.append(mlir_ops.rows_to_array(kept))
      return (*outs, mlir_ops.words_to_array(ops, words))
    if selection == KEEP_ALL:
      return mlir_ops.rows_to_array(vals)
    selected = ts.select_dense(ops, vals, spec.n, spec.m)
    return mlir_ops.rows_to_array(ts.add_poison(ops, selected, poison))

  return select


def list_reader(pattern_shape, ref, b, h, row):
  """`entry(i)`: entry `i` of row `row` of a pattern's tile lists (`ref`
  the tiles or the bounds of `tile_plan.pattern_tiles`, `[B', H', rows, ...]`
  with `pattern_shape` their first dims) for batch `b` and query head `h`."""
  batch, heads = pattern_shape[:2]
  pb = b if batch > 1 else 0
  ph = h if heads > 1 else 0
  return lambda i: ref[pb, ph, row, i]


# A pattern's segments as the kernels walk them: (segment, partial, dense).
SEGMENTS = ((tile_plan.NM_PARTIAL, True, False), (tile_plan.NM_FULL, False, False),
            (tile_plan.DENSE_PARTIAL, True, True),
            (tile_plan.DENSE_FULL, False, True))


def make_sparse_matmul(head_dim: int, swizzle: int = 128):
  """The inline Mosaic GPU function `(acc, a, meta, b_ref) -> acc + A @ B`.

  `a` and `meta` as `make_select(..., COMPRESS)` returns them (A's rows
  are 64 query rows, its columns the tile's keys in natural order), `b_ref`
  the `[block_kv, head_dim]` shared-memory tile in natural key order (tiled
  `(8, swizzle // 2)`, swizzled), `acc` `[64, head_dim]` float32: the
  forward's `P V` and the backward's `dS K` on the sparse tensor cores.
  """
  tiling = plgpu.TilingTransform((8, swizzle // 2))
  swizzle_transform = plgpu.SwizzleTransform(swizzle)

  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA, plgpu.Layout.WGMMA,
                 plgpu.RefType(transforms=(tiling, swizzle_transform))),
      return_type=plgpu.ShapeDtypeStruct((BLOCK_Q, head_dim), jnp.float32,
                                         plgpu.Layout.WGMMA))
  def sparse_matmul(ctx, acc, a, meta, b_ref):
    del ctx
    return mlir_ops.sparse_pv(acc, a, meta, b_ref, swizzle=swizzle)

  return sparse_matmul


def load_extra(tile: ScoreTile, ops, ref, b, h, row0, thread_key, local):
  """This thread's entries of the additive bias/mask term of the tile."""
  eb, eh, et, es = tile.extra_shape
  index = ir.IndexType.get()
  as_index = lambda x: arith.index_cast(index, x)
  zero = ops.i32(0)
  b_idx = as_index(b if eb > 1 else zero)
  h_idx = as_index(h if eh > 1 else zero)
  f32 = ir.F32Type.get()
  vec2 = ir.VectorType.get((2,), f32)
  rows = []
  for r in range(2):
    row = ops.iadd(row0, ops.i32(8 * r)) if et > 1 else zero
    r_idx = as_index(row)
    values = []
    if es == 1:
      x = memref.load(ref, [b_idx, h_idx, r_idx, as_index(zero)])
      values = [x] * local
    else:
      for c in range(0, local, 2):
        key = ops.iadd(thread_key, ops.i32(sf.static_key(tile.width, c)))
        pair = vector.load(vec2, ref, [b_idx, h_idx, r_idx, as_index(key)])
        values += [vector.extract(pair, dynamic_position=[], static_position=[e])
                   for e in range(2)]
    rows.append(values)
  return rows
