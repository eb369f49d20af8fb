"""Per-thread score code of the Hopper kernel: masking, N:M selection, 2:4 compression.

The functions take `ops` (scalar operations: `sparse_fragments.NumpyOps` for
the CPU twin, `mlir_ops.MlirOps` inside the kernel) and one thread's share of
a `[64, block_kv]` score accumulator: `vals[r][c]`, row half `r` in {0, 1},
local column `c` (see `sparse_fragments.to_thread_registers`). With the key
permutation of width `w`, local columns `[b * w, (b + 1) * w)` are `w`
consecutive keys, so every N:M group (m <= w) is a run of `m` local columns.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from pallas_kernels.mosaic_gpu import sparse_fragments as sf

NEG_INF = -math.inf


class MaskSpec(NamedTuple):
  """Static masking of a tile (what is dynamic comes as thread scalars)."""
  causal: bool
  window: tuple[int, int] | None
  kv_bound: bool  # keys at or past a dynamic bound are invalid


def scale_scores(ops, vals, scale, extra=None):
  """`vals * scale (+ extra)`: raw `q.k` to base-2 logits (extra is pre-scaled)."""
  c = ops.f32(scale)
  out = [[ops.fmul(x, c) for x in row] for row in vals]
  if extra is not None:
    out = [[ops.fadd(x, e) for x, e in zip(row, erow)]
           for row, erow in zip(out, extra)]
  return out


def apply_masks(ops, vals, mask: MaskSpec, width: int, diff0, kv_room):
  """Sets invalid (query, key) pairs to -inf.

  `diff0 = (row of half 0) - (key of local column 0 ... less its static part)`
  is this thread's `q - k` offset: the pair (r, c) has
  `key - query = static_key(c) - 8r - diff0`. `kv_room` is the number of keys
  left before the bound, counted from this thread's first key.
  """
  neg = ops.f32(NEG_INF)
  out = []
  for r, row in enumerate(vals):
    new_row = []
    for c, x in enumerate(row):
      k_static = sf.static_key(width, c)
      conds = []
      rel = k_static - 8 * r  # key - query == rel - diff0
      if mask.causal:
        conds.append(ops.ile(ops.i32(rel), diff0))
      if mask.window is not None:
        left, right = mask.window
        conds.append(ops.ile(ops.i32(rel - right), diff0))
        conds.append(ops.ile(diff0, ops.i32(rel + left)))
      if mask.kv_bound:
        conds.append(ops.ilt(ops.i32(k_static), kv_room))
      if conds:
        ok = conds[0]
        for cond in conds[1:]:
          ok = ops.and_(ok, cond)
        x = ops.sel(ok, x, neg)
      new_row.append(x)
    out.append(new_row)
  return out


def _fewer_than(ops, preds, k):
  """Whether fewer than `k` of the predicates hold."""
  if k <= 0:
    raise ValueError(f"k must be positive; got k={k}")
  if k > len(preds):
    raise ValueError(f"k={k} exceeds the number of competitors {len(preds)}")
  if k == 1:
    any_ = preds[0]
    for p in preds[1:]:
      any_ = ops.or_(any_, p)
    return ops.not_(any_)
  if k == len(preds):
    all_ = preds[0]
    for p in preds[1:]:
      all_ = ops.and_(all_, p)
    return ops.not_(all_)
  if len(preds) == 3:  # k == 2: not the majority
    a, b, c = preds
    maj = ops.or_(ops.or_(ops.and_(a, b), ops.and_(a, c)), ops.and_(b, c))
    return ops.not_(maj)
  count = ops.zext(preds[0])
  for p in preds[1:]:
    count = ops.iadd(count, ops.zext(p))
  return ops.ilt(count, ops.i32(k))


def _beaten_by(ops, group):
  """`beaten[i]`: for each other member j, whether j outranks member i.

  Higher scores outrank lower ones, ties go to the lower index, NaN ranks as
  +inf (so it is kept, as the reference keeps it).
  """
  keys = [ops.nan_to_inf(x) for x in group]
  m = len(group)
  beaten = [[] for _ in range(m)]
  for i in range(m):
    for j in range(i + 1, m):
      later_wins = ops.fgt(keys[j], keys[i])
      beaten[i].append(later_wins)
      beaten[j].append(ops.not_(later_wins))
  return beaten


def select_dense(ops, vals, n: int, m: int):
  """N:M selection in place: dropped scores become -inf (local runs of `m`)."""
  if n == m:
    return vals
  neg = ops.f32(NEG_INF)
  out = []
  for row in vals:
    if len(row) % m:
      raise ValueError(f"{len(row)} local columns are not groups of m={m}")
    new_row = []
    for g0 in range(0, len(row), m):
      group = row[g0:g0 + m]
      for x, beaten in zip(group, _beaten_by(ops, group)):
        new_row.append(ops.sel(_fewer_than(ops, beaten, n), x, neg))
    out.append(new_row)
  return out


def sparse_pattern_fits(n: int, m: int) -> bool:
  """Whether N:M keeps at most two of every aligned four keys with 4 | w."""
  return m in (2, 4) and n <= m // 2


def select_compress(ops, vals, n: int, m: int, t):
  """N:M selection straight into the 2:4 sparse-A form (key width 4).

  Returns `(comp, words)`: `comp[r][2b + i]` is the i-th kept score of the
  thread's chunk in 16-key block `b` (-inf where a chunk has fewer than two
  valid keys), i.e. a `[64, block_kv // 2]` WGMMA-layout array whose
  register `b` is sparse-A register `2 * (b % 2) + r` of K block `b // 2`;
  `words[p]` is the thread's metadata word for K blocks `2p` (selector 0) and
  `2p + 1` (selector 1).
  """
  if not sparse_pattern_fits(n, m):
    raise ValueError(f"{n}:{m} does not fit the 2:4 sparse operand")
  local = len(vals[0])
  if local % 16:
    raise ValueError(f"block_kv must be a multiple of 64; got {4 * local} keys")
  slots_per_group = m // 2
  neg = ops.f32(NEG_INF)
  consts = {v: ops.i32(v) for v in range(4)}
  comp = [[None] * (local // 2) for _ in range(2)]
  partial = [[ops.i32(0) for _ in range(4)] for _ in range(local // 16)]
  for r, row in enumerate(vals):
    shift = ops.iadd(ops.imul(t, ops.i32(4)), ops.i32(16 * r))
    for b in range(local // 4):
      chunk = row[4 * b:4 * b + 4]
      slot, value = [], []
      for g0 in range(0, 4, m):
        group = chunk[g0:g0 + m]
        for x, beaten in zip(group, _beaten_by(ops, group)):
          is_slot = _fewer_than(ops, beaten, slots_per_group)
          slot.append(is_slot)
          if n == slots_per_group:
            value.append(x)
          else:
            value.append(ops.sel(_fewer_than(ops, beaten, n), x, neg))
      f0, f1, f2, f3 = slot
      comp[r][2 * b] = ops.sel(f0, value[0], ops.sel(f1, value[1], value[2]))
      comp[r][2 * b + 1] = ops.sel(f3, value[3], ops.sel(f2, value[2], value[1]))
      i0 = ops.sel(f0, consts[0], ops.sel(f1, consts[1], consts[2]))
      i1 = ops.sel(f3, consts[3], ops.sel(f2, consts[2], consts[1]))
      nib = ops.ior(i0, ops.ishl(i1, consts[2]))
      kb, h = divmod(b, 2)
      pair, selector = divmod(kb, 2)
      d = 2 * selector + h
      partial[pair][d] = ops.ior(partial[pair][d], ops.ishl(nib, shift))
  words = [sf.gather_metadata(ops, p, t) for p in partial]
  return comp, words
