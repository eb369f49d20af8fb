"""What the forward and backward kernels share: the call plan, tile ranges,
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
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton
import numpy as np

from pallas_kernels import _compat
from pallas_kernels.triton.config import MIN_BLOCK, TuningConfig, default_tuning

SUPPORTED_M = (1, 2, 4, 8, 16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
SUPPORTED_DTYPES = ("bfloat16", "float16", "float32")
# float32 tiles of head_dim 256 do not fit shared memory at the smallest N:M tile.
MAX_FLOAT32_HEAD_DIM = 128
LOG2E = math.log2(math.e)


def _next_power_of_two(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static description of one call: shapes, semantics, tiles. Hashable."""
  batch: int
  q_len: int
  kv_len: int
  heads: int
  kv_heads: int
  head_dim: int
  dtype: str
  scale: float
  is_causal: bool
  window: tuple[int, int] | None
  n: int
  m: int
  # Per dim of [batch, heads, q_len, kv_len]: whether it is full (not 1).
  bias_full: tuple[bool, bool, bool, bool] | None
  mask_full: tuple[bool, bool, bool, bool] | None
  has_q_lengths: bool
  has_kv_lengths: bool
  tuning: TuningConfig
  interpret: bool

  @property
  def groups(self) -> int:
    """Query heads per key/value head."""
    return self.heads // self.kv_heads

  @property
  def selects_unscaled(self) -> bool:
    """Whether tiles hold `q.k` unscaled, `scale` folded into the exponent.

    Scaling by a positive constant keeps the order of a row's scores, so
    selection and the running max work on `q.k` directly; a bias is added
    to scaled scores, and `scale <= 0` would reorder them.
    """
    return self.bias_full is None and self.scale > 0

  @property
  def score_unit(self) -> float:
    """What a tile score is multiplied by to give the score `s` (1 or scale)."""
    return self.scale if self.selects_unscaled else 1.0

  @property
  def lanes(self) -> int:
    """Strided sub-tiles per key tile: m when selecting, 1 when dense."""
    return self.m if self.n < self.m else 1

  def _q_block(self, block: int) -> int:
    return min(block, max(MIN_BLOCK, _next_power_of_two(self.q_len)))

  def _k_block(self, block: int) -> int:
    block = min(block, max(MIN_BLOCK, _next_power_of_two(self.kv_len)))
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
    return _round_up(self.q_len, block_q), _round_up(self.kv_len, block_k)


def _check_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be a Python int; got {name}={value!r}")
  return int(value)


def _shape(name: str, x: Any) -> tuple[int, ...]:
  shape = getattr(x, "shape", None)
  if shape is None:
    raise ValueError(f"{name} must be an array; got {name}={type(x).__name__}")
  return tuple(shape)


def _broadcast_dims(name: str, x: Any, full: tuple[int, ...]):
  """4-D `x` whose dims are each 1 or full, and which dims are full."""
  if x is None:
    return None, None
  shape = _shape(name, x)
  if len(shape) > 4:
    raise ValueError(f"{name} must have rank <= 4 (broadcastable to [batch, heads, "
                     f"q_len, kv_len]={full}); got {name}.shape={shape}")
  shape = (1,) * (4 - len(shape)) + shape
  if any(got not in (1, want) for got, want in zip(shape, full)):
    raise ValueError(f"{name} must be broadcastable to [batch, heads, q_len, "
                     f"kv_len]={full}; got {name}.shape={_shape(name, x)}")
  return jnp.reshape(x, shape), tuple(d != 1 or f == 1 for d, f in zip(shape, full))


def _check_lengths(name: str, x: Any, batch: int):
  if x is None:
    return None
  shape = _shape(name, x)
  if shape != (batch,) or not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array of shape [batch]=({batch},); "
                     f"got {name}.shape={shape}, {name}.dtype={x.dtype}")
  return x.astype(jnp.int32)


def canonical_window(window: Any) -> tuple[int, int] | None:
  if window is None:
    return None
  if isinstance(window, (int, np.integer)) and not isinstance(window, bool):
    window = (window, window)
  if (not isinstance(window, (tuple, list)) or len(window) != 2
      or any(isinstance(w, bool) or not isinstance(w, (int, np.integer))
             for w in window) or min(window) < 0):
    raise ValueError("window must be None, an int >= 0 or a (left, right) pair of "
                     f"ints >= 0; got window={window!r}")
  return int(window[0]), int(window[1])


def plan_call(q, k, v, bias, mask, q_lengths, kv_lengths, *, scale, is_causal,
              window, n, m, interpret, tuning):
  """Validates a call; returns its Plan and the canonical bias, mask, lengths.

  Raises ValueError naming the argument, its value and what was expected.
  """
  q_shape, k_shape, v_shape = _shape("q", q), _shape("k", k), _shape("v", v)
  for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
    if len(shape) != 4:
      raise ValueError(f"{name} must have rank 4 ([batch, seq, heads, head_dim]); "
                       f"got {name}.shape={shape}")
  if k_shape != v_shape:
    raise ValueError(f"k and v must have the same shape; got k.shape={k_shape}, "
                     f"v.shape={v_shape}")
  batch, q_len, heads, head_dim = q_shape
  _, kv_len, kv_heads, _ = k_shape
  if k_shape[0] != batch or k_shape[3] != head_dim:
    raise ValueError(f"k must be [batch={batch}, kv_len, kv_heads, head_dim={head_dim}]"
                     f"; got k.shape={k_shape}")
  if min(q_len, kv_len, heads, kv_heads, batch) < 1 or heads % kv_heads:
    raise ValueError(f"q heads must be a positive multiple of k heads and all dims "
                     f"non-empty; got q.shape={q_shape}, k.shape={k_shape}")
  if head_dim not in SUPPORTED_HEAD_DIMS:
    raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}; got "
                     f"head_dim={head_dim}")
  dtype = jnp.dtype(q.dtype).name
  if dtype not in SUPPORTED_DTYPES:
    raise ValueError(f"q.dtype must be one of {SUPPORTED_DTYPES}; got q.dtype={dtype}")
  if dtype == "float32" and head_dim > MAX_FLOAT32_HEAD_DIM:
    raise ValueError(f"float32 needs head_dim <= {MAX_FLOAT32_HEAD_DIM}; got "
                     f"head_dim={head_dim}")
  for name, x in (("k", k), ("v", v)):
    if jnp.dtype(x.dtype).name != dtype:
      raise ValueError(f"{name}.dtype must equal q.dtype={dtype}; got "
                       f"{name}.dtype={x.dtype}")
  n, m = _check_int("n", n), _check_int("m", m)
  if m not in SUPPORTED_M or not 1 <= n <= m:
    raise ValueError(f"m must be one of {SUPPORTED_M} and 1 <= n <= m; got n={n}, m={m}")
  full = (batch, heads, q_len, kv_len)
  bias, bias_full = _broadcast_dims("bias", bias, full)
  if bias is not None and not jnp.issubdtype(bias.dtype, jnp.floating):
    raise ValueError(f"bias must be a float array; got bias.dtype={bias.dtype}")
  mask, mask_full = _broadcast_dims("mask", mask, full)
  if mask is not None and mask.dtype != jnp.bool_:
    raise ValueError(f"mask must be a bool array (True = attend); got "
                     f"mask.dtype={mask.dtype}")
  q_lengths = _check_lengths("q_lengths", q_lengths, batch)
  kv_lengths = _check_lengths("kv_lengths", kv_lengths, batch)
  if scale is None:
    scale = head_dim ** -0.5
  elif isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating,
                                                         np.integer)):
    raise ValueError(f"scale must be a Python float or None; got scale={scale!r}")
  if not isinstance(is_causal, (bool, np.bool_)):
    raise ValueError(f"is_causal must be a bool; got is_causal={is_causal!r}")
  if not isinstance(interpret, bool):
    raise ValueError(f"interpret must be a bool; got interpret={interpret!r}")
  if tuning is None:
    tuning = default_tuning(head_dim, tiled_bias_or_mask=any(
        full is not None and full[2] and full[3] for full in (bias_full, mask_full)),
                            itemsize=jnp.dtype(dtype).itemsize)
  elif not isinstance(tuning, TuningConfig):
    raise ValueError(f"tuning must be a TuningConfig or None; got tuning={tuning!r}")
  plan = Plan(batch=batch, q_len=q_len, kv_len=kv_len, heads=heads,
              kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
              scale=float(scale), is_causal=bool(is_causal),
              window=canonical_window(window), n=n, m=m, bias_full=bias_full,
              mask_full=mask_full, has_q_lengths=q_lengths is not None,
              has_kv_lengths=kv_lengths is not None, tuning=tuning,
              interpret=interpret)
  return plan, bias, mask, q_lengths, kv_lengths


def pad_axis(x, axis: int, size: int, value=0):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def pad_broadcast(x, q_size: int, k_size: int):
  """Pads the full (non-1) query and key dims of a 4-D bias or mask."""
  if x is None:
    return None
  if x.shape[2] > 1:
    x = pad_axis(x, 2, q_size)
  if x.shape[3] > 1:
    x = pad_axis(x, 3, k_size)
  return x


def mask_as_int8(mask):
  """Triton loads bytes, not i1: the mask travels as int8 (1 = attend)."""
  return None if mask is None else mask.astype(jnp.int8)


# ---------------------------------------------------------------------------
# Inside kernels.


def _div(a, b: int):
  """a // b for a >= 0 (lax.div truncates; int32 scalars in Triton)."""
  return lax.div(a, jnp.int32(b))


def _cdiv(a, b: int):
  return lax.div(a + jnp.int32(b - 1), jnp.int32(b))


def _clip(x, lo, hi):
  return jnp.minimum(jnp.maximum(x, lo), hi)


def sequence_limits(plan: Plan, q_lengths_ref, kv_lengths_ref, batch_index):
  """Valid queries are `< q_limit`, valid keys `< kv_limit` (int32 scalars)."""
  q_limit = jnp.int32(plan.q_len)
  kv_limit = jnp.int32(plan.kv_len)
  if q_lengths_ref is not None:
    q_limit = jnp.minimum(q_limit, q_lengths_ref[batch_index])
  if kv_lengths_ref is not None:
    kv_limit = jnp.minimum(kv_limit, kv_lengths_ref[batch_index])
  return jnp.maximum(q_limit, 0), jnp.maximum(kv_limit, 0)


def key_tile_range(plan: Plan, q0, block_q: int, block_k: int, q_limit, kv_limit):
  """Key tiles a query tile `[q0, q0 + block_q)` visits: (lo, full_lo, full_hi, hi).

  Tiles outside `[lo, hi)` hold no valid (query, key) pair; those in
  `[full_lo, full_hi)` hold only pairs valid by position (causal, window,
  lengths, padding), so they skip the positional masks.
  """
  q1 = q0 + block_q
  valid_q1 = jnp.minimum(q1, q_limit)
  lo_key, hi_key = jnp.int32(0), kv_limit
  full_lo, full_hi = jnp.int32(0), _div(kv_limit, block_k)
  if plan.is_causal:
    hi_key = jnp.minimum(hi_key, valid_q1)
    full_hi = jnp.minimum(full_hi, _div(q0 + 1, block_k))
  if plan.window is not None:
    left, right = plan.window
    lo_key = jnp.maximum(q0 - left, 0)
    hi_key = jnp.minimum(hi_key, valid_q1 + right)
    full_lo = _cdiv(jnp.maximum(q1 - 1 - left, 0), block_k)
    full_hi = jnp.minimum(full_hi, _div(q0 + right + 1, block_k))
  full_hi = jnp.where(q1 <= q_limit, full_hi, 0)
  return _tile_range(lo_key, hi_key, q0 < q_limit, block_k, full_lo, full_hi)


def query_tile_range(plan: Plan, k0, block_k: int, block_q: int, q_limit,
                     kv_limit):
  """Query tiles a key tile `[k0, k0 + block_k)` meets: as `key_tile_range`."""
  k1 = k0 + block_k
  valid_k1 = jnp.minimum(k1, kv_limit)
  lo_q, hi_q = jnp.int32(0), q_limit
  full_lo, full_hi = jnp.int32(0), _div(q_limit, block_q)
  if plan.is_causal:
    lo_q = jnp.maximum(lo_q, k0)
    full_lo = _cdiv(k1 - 1, block_q)
  if plan.window is not None:
    left, right = plan.window
    lo_q = jnp.maximum(lo_q, jnp.maximum(k0 - right, 0))
    hi_q = jnp.minimum(hi_q, valid_k1 + left)
    full_lo = jnp.maximum(full_lo, _cdiv(jnp.maximum(k1 - 1 - right, 0), block_q))
    full_hi = jnp.minimum(full_hi, _div(k0 + left + 1, block_q))
  full_hi = jnp.where(k1 <= kv_limit, full_hi, 0)
  return _tile_range(lo_q, hi_q, k0 < kv_limit, block_q, full_lo, full_hi)


def _tile_range(lo_pos, hi_pos, any_valid, block, full_lo, full_hi):
  """Tiles covering positions [lo_pos, hi_pos) (none unless `any_valid`)."""
  lo = _div(lo_pos, block)
  hi = jnp.where(any_valid & (hi_pos > lo_pos), _cdiv(hi_pos, block), lo)
  full_lo = _clip(full_lo, lo, hi)
  full_hi = _clip(full_hi, full_lo, hi)
  return lo, full_lo, full_hi, hi


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
  one dot per lane, docs/BENCHMARKS.md).
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
        bias = broadcast_tile(bias_ref, self.plan.bias_full, head, rows, lane)
      if mask_ref is not None:
        mask = broadcast_tile(mask_ref, self.plan.mask_full, head, rows, lane)
      scores.append(self._lane_scores(s, q0, k_start, j, masked=masked,
                                      bias=bias, mask=mask))
    return scores

  def _lane_scores(self, s, q0, k_start, lane, *, masked, bias, mask):
    """Scaled where needed, biased, masked `q.k` of one lane `[rows, w]`."""
    plan = self.plan
    if not plan.selects_unscaled:
      s = s * plan.scale
    if bias is not None:
      s = s + bias.astype(jnp.float32)
    valid = None if mask is None else mask != 0
    if masked is not False:
      q_pos = q0 + lax.broadcasted_iota(jnp.int32, s.shape, 0)
      k_pos = (k_start + lane
               + plan.lanes * lax.broadcasted_iota(jnp.int32, s.shape, 1))
      positional = (q_pos < self.q_limit) & (k_pos < self.kv_limit)
      if plan.is_causal:
        positional &= k_pos <= q_pos
      if plan.window is not None:
        left, right = plan.window
        positional &= (k_pos >= q_pos - left) & (k_pos <= q_pos + right)
      if masked is not True:  # traced (interpret mode): interior tiles pass all
        positional |= jnp.logical_not(masked)
      valid = positional if valid is None else valid & positional
    return s if valid is None else jnp.where(valid, s, -jnp.inf)

  def kept_scores(self, lane_scores: list[jax.Array]):
    """Scores after N:M selection (`-inf` where dropped), and each group's
    maximum (`select_n_of_m`; the lanes' scores themselves for `m = 1`)."""
    if self.plan.lanes == 1:
      return lane_scores, lane_scores[0]
    wins, group_max = select_n_of_m(lane_scores, self.plan.n,
                                    ptx=not self.plan.interpret)
    kept = [jnp.where(w, s, -jnp.inf) for w, s in zip(wins, lane_scores)]
    return kept, group_max

  def keep_masks(self, lane_scores: list[jax.Array]) -> list[jax.Array]:
    """The reference's keep-masks of the lanes (`nm_keep`)."""
    if self.plan.lanes == 1:
      return [s != -jnp.inf for s in lane_scores]
    return nm_keep(lane_scores, self.plan.n)


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
  lengths = pl.BlockSpec((plan.batch,), lambda *grid: (0,))
  return [
      q_spec, kv_spec, kv_spec,
      None if bias is None else broadcast_spec(plan.bias_full, extra_block,
                                               extra_index_map),
      None if mask is None else broadcast_spec(plan.mask_full, extra_block,
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
