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

  Higher scores outrank lower ones and ties go to the lower index. NaN
  compares false here; `nan_poison` makes such rows NaN as the reference's.
  """
  m = len(group)
  beaten = [[] for _ in range(m)]
  for i in range(m):
    for j in range(i + 1, m):
      later_wins = ops.fgt(group[j], group[i])
      beaten[i].append(later_wins)
      beaten[j].append(ops.not_(later_wins))
  return beaten


class _TopTwo(NamedTuple):
  """The two best of four keys `(a, b, c, d)` (higher first, ties to the lower index).

  `ab`: b beats a; `cd`: d beats c; `hi1`/`hi2`: the pair winners' values;
  `first`: a and b both beat c and d; `second`: c and d both beat a and b.
  Otherwise the two best are the pair winners. `first` and `second` exclude
  each other.
  """
  ab: object
  cd: object
  hi1: object
  hi2: object
  first: object
  second: object


def _pair_winner(ops, x, y):
  """(y beats x, the winner's value) of two keys, x first: ties go to x.

  The max propagates NaN, so a NaN in the pair is the winner's value.
  """
  return ops.fgt(y, x), ops.fmax(x, y)


def _top2_of_4(ops, a, b, c, d) -> _TopTwo:
  """Four comparisons and four min/max: no select on the way to the decision.

  The min/max propagate NaN, so a NaN makes both `first` and `second` false
  and is kept as (or in) its pair winner's value.
  """
  (ab, hi1), (cd, hi2) = _pair_winner(ops, a, b), _pair_winner(ops, c, d)
  lo1, lo2 = ops.fmin(a, b), ops.fmin(c, d)
  # Ties between pairs go to (a, b), the lower keys.
  return _TopTwo(ab=ab, cd=cd, hi1=hi1, hi2=hi2,
                 first=ops.fge(lo1, hi2), second=ops.fgt(lo2, hi1))


def nan_poison(ops, vals):
  """Per row half: 0, or NaN when a raw score of the thread's row is NaN/inf.

  Adding it to one kept score per row makes such rows NaN, as the reference
  makes them, whatever the comparisons (NaN compares false) selected. Only
  `select_dense` needs it: `select_compress` keeps NaN by itself.
  """
  zero = ops.f32(0.0)
  out = []
  for row in vals:
    level = list(row)
    while len(level) > 1:
      level = [ops.fadd(level[i], level[i + 1]) if i + 1 < len(level)
               else level[i] for i in range(0, len(level), 2)]
    out.append(ops.fmul(level[0], zero))
  return out


def add_poison(ops, vals, poison):
  """Adds the row poison (`nan_poison`) to the first value of each row half."""
  return [[ops.fadd(row[0], z)] + row[1:] for row, z in zip(vals, poison)]


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
      if (n, m) == (2, 4):
        top = _top2_of_4(ops, *group)
        not_first, not_second = ops.not_(top.first), ops.not_(top.second)
        keep = [ops.or_(top.first, ops.and_(not_second, ops.not_(top.ab))),
                ops.or_(top.first, ops.and_(not_second, top.ab)),
                ops.or_(top.second, ops.and_(not_first, ops.not_(top.cd))),
                ops.or_(top.second, ops.and_(not_first, top.cd))]
      else:
        keep = [_fewer_than(ops, beaten, n) for beaten in _beaten_by(ops, group)]
      new_row += [ops.sel(k, v, neg) for k, v in zip(keep, group)]
    out.append(new_row)
  return out


def sparse_pattern_fits(n: int, m: int) -> bool:
  """Whether N:M keeps at most two of every aligned four keys with 4 | w."""
  return m in (2, 4) and n <= m // 2


def _winners_nibble(ops, ab, cd, consts):
  """Nibble of the two pair winners: `ab` (0 or 1) and `2 + cd` (2 or 3)."""
  return ops.iadd(ops.sel(ab, consts[1], consts[0]),
                  ops.sel(cd, consts[12], consts[8]))


def _compress_chunk(ops, chunk, n, m, consts):
  """(first kept, second kept, nibble) of one 4-key chunk: `i0 | i1 << 2`.

  A NaN in the chunk always reaches a kept value (min/max propagate it), so
  a row with a NaN score outputs NaN, as the reference's does.
  """
  a, b, c, d = chunk
  if (n, m) == (2, 4):
    top = _top2_of_4(ops, a, b, c, d)
    v0 = ops.sel(top.first, a, ops.sel(top.second, c, top.hi1))
    v1 = ops.sel(top.first, b, ops.sel(top.second, d, top.hi2))
    nib = ops.sel(top.first, consts[4],
                  ops.sel(top.second, consts[14],
                          _winners_nibble(ops, top.ab, top.cd, consts)))
    return v0, v1, nib
  (ab, hi1), (cd, hi2) = _pair_winner(ops, a, b), _pair_winner(ops, c, d)
  if m == 2:  # one of (a, b) and one of (c, d)
    return hi1, hi2, _winners_nibble(ops, ab, cd, consts)
  # 1:4: the best in its pair's slots; the other slot a -inf filler
  x, best = _pair_winner(ops, hi1, hi2)
  in_slot1 = ops.sel(x, cd, ab)
  neg = ops.f32(NEG_INF)
  return (ops.sel(in_slot1, neg, best), ops.sel(in_slot1, best, neg),
          ops.sel(x, consts[14], consts[4]))


def select_compress(ops, vals, n: int, m: int, t):
  """N:M selection straight into the 2:4 sparse-A form (key width 4).

  Returns `(comp, words, nibbles)`: `comp[r][2b + i]` is the i-th kept score
  of the thread's chunk in 16-key block `b` (-inf where a chunk has fewer
  than two valid keys), i.e. a `[64, block_kv // 2]` WGMMA-layout array whose
  register `b` is sparse-A register `2 * (b % 2) + r` of K block `b // 2`;
  `words[p]` is the thread's metadata word for K blocks `2p` (selector 0) and
  `2p + 1` (selector 1); `nibbles[r][b]` is the thread's own nibble of chunk
  `b` (for `gather_kept`). A NaN score always lands in a kept value.
  """
  if not sparse_pattern_fits(n, m):
    raise ValueError(f"{n}:{m} does not fit the 2:4 sparse operand")
  local = len(vals[0])
  if local % 16:
    raise ValueError(f"block_kv must be a multiple of 64; got {4 * local} keys")
  consts = {v: ops.i32(v) for v in (0, 1, 4, 8, 12, 14, 16)}
  comp = [[None] * (local // 2) for _ in range(2)]
  nibbles = [[None] * (local // 4) for _ in range(2)]
  for r, row in enumerate(vals):
    for b in range(local // 4):
      v0, v1, nibbles[r][b] = _compress_chunk(ops, row[4 * b:4 * b + 4], n, m,
                                              consts)
      comp[r][2 * b], comp[r][2 * b + 1] = v0, v1
  shift = ops.imul(t, consts[4])
  words = []
  for pair in range(local // 16):
    partial = []
    for d in range(4):  # d = 2 * selector + h: block b = 4 * pair + d
      b = 4 * pair + d
      both_rows = ops.ior(nibbles[0][b], ops.ishl(nibbles[1][b], consts[16]))
      partial.append(ops.ishl(both_rows, shift))
    words.append(sf.gather_metadata(ops, partial, t))
  return comp, words, nibbles


def gather_kept(ops, vals, nibbles):
  """Another tile's values at the positions `select_compress` kept.

  `vals` in the layout `select_compress` took, `nibbles` its third result:
  returns `comp` in the compressed layout, `comp[r][2b + i]` the value at
  kept position `i` of chunk `b`. Where a chunk had fewer than two valid
  keys the second slot holds the value at the filler's position; the
  compressed scores are -inf there, so a product with their softmax is 0.
  The backward uses it for `dP`, so that `dS = P * (dP - delta)` lands in
  the compressed form of `P` (positions are `i0 < i1`: i0 in 0..2, i1 in 1..3).
  """
  consts = {v: ops.i32(v) for v in (0, 1, 2, 3)}
  comp = [[None] * (2 * len(row)) for row in nibbles]
  for r, row in enumerate(vals):
    for b, nib in enumerate(nibbles[r]):
      a, b1, c, d = row[4 * b:4 * b + 4]
      i0, i1 = ops.iand(nib, consts[3]), ops.ishr(nib, consts[2])
      comp[r][2 * b] = ops.sel(ops.ine(i0, consts[0]),
                               ops.sel(ops.ine(i0, consts[1]), c, b1), a)
      comp[r][2 * b + 1] = ops.sel(ops.ine(i1, consts[3]),
                                   ops.sel(ops.ine(i1, consts[2]), b1, c), d)
  return comp
