"""What the forward and backward kernels share: the plan (spec and tuning),
masking and the N:M selection of one score tile.

A key tile starting at key `k0` has `lanes` strided lanes: lane `j` holds keys
`k0 + j, k0 + j + lanes, ...`. With `lanes = m`, the `m` members of every N:M
group sit at the same position of the `m` lanes, so ranking a group is
elementwise work across lanes. K and V reach the kernels in lane order
(`lane_order`: each tile's lanes one after another), so each product of a
tile is one dot and its `[rows, block_k]` result splits into the lanes
without data movement (`split_lanes`, `join_lanes`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton

from pallas_kernels import tile_plan
from pallas_kernels.call import AttentionSpec, round_up
from pallas_kernels.triton.config import MIN_BLOCK, TuningConfig, default_tuning

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
SUPPORTED_DTYPES = ("bfloat16", "float16", "float32")
# float32 tiles of head_dim 256 do not fit shared memory at the smallest N:M tile.
MAX_FLOAT32_HEAD_DIM = 128


def _next_power_of_two(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def power_of_two_factor(x: int) -> int:
  """The largest power of two dividing `x > 0`: the largest tile that
  divides a pattern block of size `x`."""
  return x & -x


@dataclasses.dataclass(frozen=True)
class Plan:
  """One call's spec with the kernels' tuning: hashable, static in the kernels."""
  spec: AttentionSpec
  tuning: TuningConfig
  interpret: bool

  @property
  def selects_unscaled(self) -> bool:
    """Whether tiles hold `q.k` unscaled, `scale` folded into the exponent.

    Scaling by a positive constant keeps the order of a row's scores, so
    selection and the running max work on `q.k` directly; a bias is added
    to scaled scores, and `scale <= 0` would reorder them.
    """
    return self.spec.bias_shape is None and self.spec.scale > 0

  @property
  def score_unit(self) -> float:
    """What a tile score is multiplied by to give the score `s` (1 or scale)."""
    return self.spec.scale if self.selects_unscaled else 1.0

  @property
  def lanes(self) -> int:
    """Strided sub-tiles per key tile: m when selecting, 1 when dense."""
    return 1 if self.spec.is_dense else self.spec.m

  def _q_block(self, block: int) -> int:
    block = min(block, max(MIN_BLOCK, _next_power_of_two(self.spec.q_len)))
    if self.spec.has_pattern:  # tiles divide the pattern's blocks
      block = min(block, power_of_two_factor(self.spec.block_q))
    return block

  def _k_block(self, block: int) -> int:
    block = min(block, max(MIN_BLOCK, _next_power_of_two(self.spec.kv_len)))
    if self.spec.has_pattern:
      block = min(block, power_of_two_factor(self.spec.block_k))
    return max(block, MIN_BLOCK * self.lanes)

  @property
  def forward_blocks(self) -> tuple[int, int]:
    return self._q_block(self.tuning.block_q), self._k_block(self.tuning.block_k)

  @property
  def dq_blocks(self) -> tuple[int, int]:
    return (self._q_block(self.tuning.block_q_dq),
            self._k_block(self.tuning.block_k_dq))

  @property
  def dkv_blocks(self) -> tuple[int, int]:
    return (self._q_block(self.tuning.block_q_dkv),
            self._k_block(self.tuning.block_k_dkv))

  def padded_lengths(self, block_q: int, block_k: int) -> tuple[int, int]:
    return round_up(self.spec.q_len, block_q), round_up(self.spec.kv_len, block_k)

  def has_partial_tiles(self, block_q: int, block_k: int) -> bool:
    """Whether a kernel with these tiles can meet a tile that needs
    positional masks (in either direction: padded queries count)."""
    t_pad, s_pad = self.padded_lengths(block_q, block_k)
    return (tile_plan.needs_positional_masks(self.spec, s_pad)
            or t_pad != self.spec.q_len)

  def pattern_tiles(self, block_modes, block_q: int, block_k: int, q_lengths,
                    kv_lengths, *, transposed: bool = False):
    """The call's `tile_plan.PatternTiles` for kernel tiles `block_q x
    block_k` (None without a pattern); rows are key tiles if `transposed`."""
    if block_modes is None:
      return None
    t_pad, s_pad = self.padded_lengths(block_q, block_k)
    rows, cols = t_pad // block_q, s_pad // block_k
    if transposed:
      rows, cols = cols, rows
    return tile_plan.pattern_tiles(
        self.spec, block_modes, block_k if transposed else block_q,
        block_q if transposed else block_k, rows, cols, q_lengths, kv_lengths,
        transposed=transposed)


def make_plan(spec: AttentionSpec, tuning: TuningConfig | None = None,
              interpret: bool = False) -> Plan:
  """The plan of a call; `tuning=None` takes `default_tuning` for its shapes."""
  if tuning is None:
    tiled = any(full is not None and full[2] and full[3]
                for full in (spec.bias_full, spec.mask_full))
    tuning = default_tuning(spec.head_dim, tiled_bias_or_mask=tiled,
                            itemsize=jnp.dtype(spec.dtype).itemsize,
                            block_pattern=spec.has_pattern)
  return Plan(spec, tuning, interpret)


def mask_as_int8(mask):
  """Triton loads bytes, not i1: the mask travels as int8 (1 = attend)."""
  return None if mask is None else mask.astype(jnp.int8)


# ---------------------------------------------------------------------------
# Inside kernels.


def sequence_limits(plan: Plan, q_lengths_ref, kv_lengths_ref, batch_index):
  """Valid queries are `< q_limit`, valid keys `< kv_limit` (int32 scalars)."""
  return tile_plan.sequence_limits(
      plan.spec,
      None if q_lengths_ref is None else q_lengths_ref[batch_index],
      None if kv_lengths_ref is None else kv_lengths_ref[batch_index])


def loop_tiles(plan: Plan, tile_range, body, carry):
  """Runs `body(i, carry, masked)` over a tile range, masked only at its edges.

  Compiled for a GPU, `masked` is static: interior tiles get a body without
  positional masks. In interpret mode one loop passes `masked` as a traced
  bool instead (the same masks, a third of the program for XLA to compile on
  the CPU).
  """
  lo, full_lo, full_hi, hi = tile_range
  if plan.interpret:
    return lax.fori_loop(
        lo, hi, lambda i, c: body(i, c, (i < full_lo) | (i >= full_hi)), carry)
  carry = lax.fori_loop(lo, full_lo, lambda i, c: body(i, c, True), carry)
  carry = lax.fori_loop(full_lo, full_hi, lambda i, c: body(i, c, False), carry)
  return lax.fori_loop(full_hi, hi, lambda i, c: body(i, c, True), carry)


def loop_pattern(plan: Plan, tiles_ref, bounds_ref, body, carry, *,
                 partial: bool, head=None):
  """Runs `body(tile, carry, masked, dense)` over a pattern's tile list.

  `tiles_ref` / `bounds_ref` are one row of `tile_plan.PatternTiles` (of
  query head `head` where the block keeps a heads dim, see `pattern_specs`).
  As in `loop_tiles`, compiled for a GPU each segment gets a body with
  static `masked` (positional masks) and `dense` (no N:M selection);
  segments the call cannot have (`partial`: `Plan.has_partial_tiles` of the
  kernel's tiles) are not compiled. Interpret mode runs one loop with both
  traced.
  """
  bounds = [_list_entry(bounds_ref, head, s) for s in range(tile_plan.SKIPPED + 1)]
  tile = lambda i: _list_entry(tiles_ref, head, i)
  if plan.interpret:
    def step(i, c):
      dense = i >= bounds[tile_plan.DENSE_PARTIAL]
      masked = (i < bounds[tile_plan.NM_FULL]) | (
          dense & (i < bounds[tile_plan.DENSE_FULL]))
      return body(tile(i), c, masked, dense)
    return lax.fori_loop(0, bounds[tile_plan.SKIPPED], step, carry)
  segments = ((tile_plan.NM_PARTIAL, True, False),
              (tile_plan.NM_FULL, False, False),
              (tile_plan.DENSE_PARTIAL, True, True),
              (tile_plan.DENSE_FULL, False, True))
  for segment, masked, dense in segments:
    if (masked and not partial) or (plan.spec.is_dense and not dense):
      continue
    carry = lax.fori_loop(
        bounds[segment], bounds[segment + 1],
        lambda i, c, masked=masked, dense=dense: body(tile(i), c, masked, dense),
        carry)
  return carry


def loop_skipped(tiles_ref, bounds_ref, body):
  """Runs `body(tile)` over the tiles a pattern skips (to clear outputs)."""
  def step(i, c):
    body(tiles_ref[i])
    return c
  lax.fori_loop(bounds_ref[tile_plan.SKIPPED], bounds_ref[tile_plan.SKIPPED + 1],
                step, 0)


def clear_unvisited(ref, tile_range, tiles_ref, bounds_ref, block_k: int):
  """Zeros the `block_k`-column tiles of an output row block `ref` that a
  program did not visit: outside `tile_range`, or the pattern's skipped ones."""
  def clear(k_tile):
    ref[:, pl.ds(k_tile * block_k, block_k)] = jnp.zeros(
        (ref.shape[0], block_k), ref.dtype)

  if tiles_ref is not None:
    loop_skipped(tiles_ref, bounds_ref, clear)
    return
  def step(k_tile, carry):
    clear(k_tile)
    return carry

  lo, _, _, hi = tile_range
  lax.fori_loop(0, lo, step, 0)
  lax.fori_loop(hi, ref.shape[1] // block_k, step, 0)


def pattern_specs(pattern, index_map, heads_block: int | None = None):
  """BlockSpecs of a pattern's (tiles, bounds), `[None, None]` without one.

  `index_map(*grid)` gives the (batch, heads, row tile) block indices; a
  broadcast batch or heads dim reads block 0. A heads dim is squeezed unless
  `heads_block` is given (the dK/dV kernel's query heads of one key/value
  head), which `loop_pattern` indexes with its `head`.
  """
  if pattern is None:
    return [None, None]
  batch, heads = pattern.tiles.shape[:2]
  heads_block = heads_block if heads > 1 else None

  def spec(array):
    def block_index(*grid):
      b, h, row = index_map(*grid)
      return (b if batch > 1 else 0, h if heads > 1 else 0, row, 0)
    return pl.BlockSpec((None, heads_block, None, array.shape[-1]), block_index)

  return [spec(pattern.tiles), spec(pattern.bounds)]


def pattern_operands(pattern):
  """The (tiles, bounds) operands matching `pattern_specs`."""
  return (None, None) if pattern is None else (pattern.tiles, pattern.bounds)


def _list_entry(ref, head, i):
  """Entry `i` of a tile-list block's row: 1-D, or with the heads dim that
  `pattern_specs` keeps for the dK/dV kernel, indexed by `head`."""
  return ref[i] if ref.ndim == 1 else ref[head, i]


def exp2(plan: Plan, x):
  """`2 ** x` of a float32 tile: one `ex2.approx.ftz.f32` per element on the GPU.

  `jnp.exp2` lowers to libdevice's `exp2f`, which wraps the same instruction
  in a fix-up for results below 2**-126 (a compare and two multiplies). Here
  every exponent is relative to a row maximum, so such results are below
  any softmax denominator's 2**-126 and flushing them to 0 changes nothing.
  Interpret mode (no PTX) keeps `jnp.exp2`.
  """
  if plan.interpret:
    return jnp.exp2(x)
  [y] = pallas_triton.elementwise_inline_asm(
      "ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
  return y


def lane_order(plan: Plan, x, block_k: int, inverse: bool = False):
  """`x [B, S, H, D]` with each `block_k`-key tile's keys in lane order
  (`inverse`: back to key order).

  Row `j * w + i` of a tile (`w = block_k / lanes`) holds key `i * lanes + j`:
  lane `j` is the tile's `j`-th run of `w` rows. `S` must be a multiple of
  `block_k`.
  """
  if plan.lanes == 1:
    return x
  b, length, h, d = x.shape
  w = block_k // plan.lanes
  runs = (plan.lanes, w) if inverse else (w, plan.lanes)
  tiles = x.reshape(b, length // block_k, *runs, h, d)
  return tiles.transpose(0, 1, 3, 2, 4, 5).reshape(b, length, h, d)


def split_lanes(plan: Plan, tile):
  """The `lanes` tiles `[rows, w]` of a `[rows, block_k]` lane-order tile.

  Lane `j` is a sum over the lane axis with `-0.0` (`x + -0.0 == x` for every
  float; XLA's own sum in interpret mode may turn `-0.0` into `0.0`) everywhere
  but at `j`, since Triton has no static slice. In the MMA accumulator layout
  a column's bits above 3 are register bits, so with `w >= 8` the lane axis
  lies in each thread's registers and the selects and adds are constant per
  register, for the compiler to fold (not read in SASS; on an H200 the
  forward ran 10-19% and forward+backward 32-42% faster this way than with
  one dot per lane, docs/benchmarks_history.md).
  """
  if plan.lanes == 1:
    return [tile]
  rows, width = tile.shape
  lanes = tile.reshape(rows, plan.lanes, width // plan.lanes)
  lane = lax.broadcasted_iota(jnp.int32, lanes.shape, 1)
  return [jnp.sum(jnp.where(lane == j, lanes, -0.0), axis=1)
          for j in range(plan.lanes)]


def join_lanes(plan: Plan, lanes: list[jax.Array]):
  """The `[rows, block_k]` lane-order tile of `lanes` tiles `[rows, w]`: the
  inverse of `split_lanes`, by selects as constant per register as its."""
  if plan.lanes == 1:
    return lanes[0]
  rows, width = lanes[0].shape
  shape = (rows, plan.lanes, width)
  lane = lax.broadcasted_iota(jnp.int32, shape, 1)
  tile = jnp.broadcast_to(lanes[-1][:, None, :], shape)
  for j in reversed(range(plan.lanes - 1)):
    tile = jnp.where(lane == j, lanes[j][:, None, :], tile)
  return tile.reshape(rows, plan.lanes * width)


def lane_slice(plan: Plan, start, lane: int, block_k: int):
  """The keys of lane `lane` of the key tile starting at `start`."""
  lanes = plan.lanes
  return pl.ds(start + lane, block_k // lanes, stride=lanes)


def nan_min_max(a, b, *, ptx: bool):
  """`(min, max)` of two float32 tiles, both NaN where either is.

  Triton lowers `jnp.minimum`/`jnp.maximum` to `minnumf`/`maxnumf`, which
  return the other operand of a NaN; `min.NaN.f32`/`max.NaN.f32` (one
  instruction each) keep it, as XLA's min and max do (used where not `ptx`:
  interpret mode and plain jnp).
  """
  if not ptx:
    return jnp.minimum(a, b), jnp.maximum(a, b)
  shape = [jax.ShapeDtypeStruct(a.shape, jnp.float32)]
  return tuple(
      pallas_triton.elementwise_inline_asm(
          f"{op}.NaN.f32 $0, $1, $2;", args=[a, b], constraints="=f,f,f",
          pack=1, result_shape_dtypes=shape)[0]
      for op in ("min", "max"))


def select_n_of_m(scores: list[jax.Array], n: int, *, ptx: bool = False):
  """N:M winners of lane-split groups, and each group's maximum.

  `scores[j]`: member `j` of every group. A member beats another if it is
  larger, or equal with the lower index. A `-inf` may win where its group has
  fewer than `n` finite members (it stays `-inf` as a score). A NaN always
  wins; in 2:4 and 1:2 the rest of its group wins too, which changes nothing
  since its row's output is NaN either way (`nm_keep` gives the reference's
  mask). The maximum is the row maximum's input: it equals the maximum of
  the winners, since a group's largest member always wins (at a NaN,
  Triton's max drops it and XLA's keeps it; the NaN winner makes the row NaN
  either way). `ptx`: a NaN-keeping min/max on the GPU (`nan_min_max`).

  Returns `(wins, group_max)`: bool tiles like `scores`, and one float tile.
  """
  m = len(scores)
  if (n, m) == (1, 2):
    a, b = scores
    # Two comparisons, not one and its negation: both are false at a NaN.
    return [jnp.logical_not(b > a), jnp.logical_not(a >= b)], jnp.maximum(a, b)
  if (n, m) == (2, 4):
    return _top_two_of_four(scores, ptx)
  return _rank_below(scores, n), functools.reduce(jnp.maximum, scores)


def nm_keep(scores: list[jax.Array], n: int) -> list[jax.Array]:
  """Keep-masks of N:M selection as the reference (`nmattn.masking.nm_mask`)
  defines them: `select_n_of_m` with NaN ranked as `-inf` (it outranks no
  finite score), then `-inf` never kept and NaN always."""
  ranked = [jnp.where(s != s, -jnp.inf, s) for s in scores]
  wins, _ = select_n_of_m(ranked, n)
  return [(w & (s != -jnp.inf)) | (s != s) for w, s in zip(wins, scores)]


def _rank_below(scores, n):
  """Whether fewer than `n` members beat each one; a NaN beats nothing and
  nothing beats it (both comparisons of a pair are false)."""
  m = len(scores)
  rank = [jnp.zeros(scores[0].shape, jnp.int32) for _ in range(m)]
  for a in range(m):
    for b in range(a + 1, m):
      rank[b] = rank[b] + (scores[a] >= scores[b]).astype(jnp.int32)
      rank[a] = rank[a] + (scores[b] > scores[a]).astype(jnp.int32)
  return [r < n for r in rank]


def _top_two_of_four(scores, ptx):
  """The two winners of a group of four from the min and max of its pairs.

  Pair (a, b) holds both if its minimum is not below pair (c, d)'s maximum
  (equal goes to the lower index), pair (c, d) if its minimum exceeds pair
  (a, b)'s maximum, and else each pair's maximum wins. A NaN makes its pair's
  min and max NaN, so both tests (written as negated comparisons) hold and
  the whole group wins. Eight ALU operations decide the group, plus four
  three-input predicate operations; this runs on every score.
  """
  a, b, c, d = scores
  lo1, hi1 = nan_min_max(a, b, ptx=ptx)
  lo2, hi2 = nan_min_max(c, d, ptx=ptx)
  first = jnp.logical_not(lo1 < hi2)
  second = jnp.logical_not(lo2 <= hi1)
  ab, cd = a >= b, c >= d  # which member is its pair's maximum
  not_first, not_second = jnp.logical_not(first), jnp.logical_not(second)
  wins = [first | (ab & not_second), first | (jnp.logical_not(ab) & not_second),
          second | (cd & not_first), second | (jnp.logical_not(cd) & not_first)]
  return wins, jnp.maximum(hi1, hi2)


@dataclasses.dataclass(frozen=True)
class TileContext:
  """Per-program constants for scoring (query rows x key lane) tiles."""
  plan: Plan
  q_limit: Any
  kv_limit: Any

  def tile_scores(self, q_dot_k, q0, k_start, cols, *, masked, bias_ref=None,
                  mask_ref=None, head=None, rows=slice(None)):
    """The lanes' biased, masked f32 scores of a lane-order `q.k` tile.

    `q_dot_k [rows, block_k]`: the tile's dot; `cols`: its lanes' key slices
    (`lane_slice`), which read the bias and mask tiles (`broadcast_tile` with
    `head` and `rows`). Scores are in units of `plan.score_unit`. `masked`:
    whether positional masks apply (bool, or a traced bool).
    """
    scores = []
    for j, (s, lane) in enumerate(zip(split_lanes(self.plan, q_dot_k), cols)):
      bias = mask = None
      if bias_ref is not None:
        bias = broadcast_tile(bias_ref, self.plan.spec.bias_full, head, rows, lane)
      if mask_ref is not None:
        mask = broadcast_tile(mask_ref, self.plan.spec.mask_full, head, rows, lane)
      scores.append(self._lane_scores(s, q0, k_start, j, masked=masked,
                                      bias=bias, mask=mask))
    return scores

  def _lane_scores(self, s, q0, k_start, lane, *, masked, bias, mask):
    """Scaled where needed, biased, masked `q.k` of one lane `[rows, w]`."""
    plan = self.plan
    if not plan.selects_unscaled:
      s = s * plan.spec.scale
    if bias is not None:
      s = s + bias.astype(jnp.float32)
    valid = None if mask is None else mask != 0
    if masked is not False:
      q_pos = q0 + lax.broadcasted_iota(jnp.int32, s.shape, 0)
      k_pos = (k_start + lane
               + plan.lanes * lax.broadcasted_iota(jnp.int32, s.shape, 1))
      positional = (q_pos < self.q_limit) & (k_pos < self.kv_limit)
      if plan.spec.is_causal:
        positional &= k_pos <= q_pos
      if plan.spec.window is not None:
        left, right = plan.spec.window
        positional &= (k_pos >= q_pos - left) & (k_pos <= q_pos + right)
      if masked is not True:  # traced (interpret mode): interior tiles pass all
        positional |= jnp.logical_not(masked)
      valid = positional if valid is None else valid & positional
    return s if valid is None else jnp.where(valid, s, -jnp.inf)

  def kept_scores(self, lane_scores: list[jax.Array], dense=False):
    """Scores after N:M selection (`-inf` where dropped), and each group's
    maximum (`select_n_of_m`; the lanes' scores themselves for `m = 1`).

    `dense`: a pattern's dense tile keeps every score (bool, or a traced
    bool in interpret mode).
    """
    if self.plan.lanes == 1:
      return lane_scores, lane_scores[0]
    if dense is True:
      return lane_scores, functools.reduce(jnp.maximum, lane_scores)
    wins, group_max = select_n_of_m(lane_scores, self.plan.spec.n,
                                    ptx=not self.plan.interpret)
    if dense is not False:
      wins = [w | dense for w in wins]
    kept = [jnp.where(w, s, -jnp.inf) for w, s in zip(wins, lane_scores)]
    return kept, group_max

  def keep_masks(self, lane_scores: list[jax.Array], dense=False
                 ) -> list[jax.Array]:
    """The reference's keep-masks of the lanes (`nm_keep`; every valid
    score in a dense tile)."""
    valid = [s != -jnp.inf for s in lane_scores]
    if self.plan.lanes == 1 or dense is True:
      return valid
    keep = nm_keep(lane_scores, self.plan.spec.n)
    if dense is not False:
      keep = [k | (dense & v) for k, v in zip(keep, valid)]
    return keep


def broadcast_spec(full: tuple[bool, ...], block: tuple[int | None, int, int],
                   index_map):
  """BlockSpec of a 4-D bias/mask; batch squeezed, broadcast dims block 1 at 0.

  `block` gives the (heads, q, k) block sizes and `index_map(*grid)` the
  (batch, heads, q, k) block indices for a full array. A heads block of None
  (or a broadcast heads dim) is squeezed.
  """
  heads = block[0] if full[1] else None
  shape = (None, heads) + tuple(b if f else 1 for f, b in zip(full[2:], block[1:]))

  def broadcast_index_map(*grid):
    return tuple(i if f else 0 for f, i in zip(full, index_map(*grid)))

  return pl.BlockSpec(shape, broadcast_index_map)


def operand_specs(plan: Plan, q_spec, kv_spec, extra_block, extra_index_map,
                  bias, mask, q_lengths, kv_lengths):
  """BlockSpecs of (q, k, v, bias, mask, q_lengths, kv_lengths), None where absent.

  Every kernel takes these operands first; `extra_block` / `extra_index_map`
  describe its bias and mask tile (see `broadcast_spec`).
  """
  lengths = pl.BlockSpec((plan.spec.batch,), lambda *grid: (0,))
  return [
      q_spec, kv_spec, kv_spec,
      None if bias is None else broadcast_spec(plan.spec.bias_full, extra_block,
                                               extra_index_map),
      None if mask is None else broadcast_spec(plan.spec.mask_full, extra_block,
                                               extra_index_map),
      None if q_lengths is None else lengths,
      None if kv_lengths is None else lengths,
  ]


def broadcast_tile(ref, full: tuple[bool, ...], head, rows, cols):
  """The `[rows, cols]` tile of a bias/mask block (see `broadcast_spec`).

  `head` indexes a heads block that was not squeezed; broadcast dims read 0.
  """
  index = (rows if full[2] else slice(None), cols if full[3] else slice(None))
  return ref[(head,) + index if ref.ndim == 3 else index]
