"""Which tiles a kernel visits, and which of them need positional masks.

The one place that turns an `AttentionSpec`'s positional structure (causal,
window, sequence lengths, padding) into tile ranges (docs/ARCHITECTURE.md,
"The tile plan"). For a query tile the kernel walks the key tiles of a
`TileRange`; those in `[full_lo, full_hi)` hold only pairs that are valid by
position and skip the positional masks, those in `[lo, full_lo)` and
`[full_hi, hi)` are partial, tiles outside `[lo, hi)` hold no valid pair.
`query_tiles` answers the transposed question for kernels that keep a key
tile resident (dK/dV). The arithmetic is on int32 scalars with `jnp`/`lax`
only, so Triton and Mosaic GPU kernels trace the same code.

A block pattern adds `pattern_tiles`, run once per call outside the
kernels: for every row tile the column tiles to visit, compacted into a
list ordered by segment (N:M or dense, partial or full), so a kernel walks
each segment with a body specialised to it and never touches a skipped tile.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.call import DENSE, NM, AttentionSpec


class TileRange(NamedTuple):
  """Tiles `[lo, hi)` hold valid pairs; `[full_lo, full_hi)` only valid ones."""
  lo: Any
  full_lo: Any
  full_hi: Any
  hi: Any


def _div(a, b: int):
  """a // b for a >= 0 (lax.div truncates; int32 scalars in kernels)."""
  return lax.div(a, jnp.int32(b))


def _cdiv(a, b: int):
  return lax.div(a + jnp.int32(b - 1), jnp.int32(b))


def _clip(x, lo, hi):
  return jnp.minimum(jnp.maximum(x, lo), hi)


def sequence_limits(spec: AttentionSpec, q_length=None, kv_length=None):
  """`(q_limit, kv_limit)`: valid queries are `< q_limit`, keys `< kv_limit`.

  `q_length` / `kv_length` are this batch row's lengths (int32 scalars read
  by the kernel) or None where the call has none.
  """
  q_limit = jnp.int32(spec.q_len)
  kv_limit = jnp.int32(spec.kv_len)
  if q_length is not None:
    q_limit = jnp.minimum(q_limit, q_length)
  if kv_length is not None:
    kv_limit = jnp.minimum(kv_limit, kv_length)
  return jnp.maximum(q_limit, 0), jnp.maximum(kv_limit, 0)


def _band(spec: AttentionSpec) -> tuple[int | None, int | None]:
  """Bounds `(lo, hi)` on `key - query` of a valid pair (None: unbounded)."""
  lo = hi = None
  if spec.is_causal:
    hi = 0
  if spec.window is not None:
    left, right = spec.window
    lo, hi = -left, right if hi is None else min(hi, right)
  return lo, hi


def _band_tiles(r0, block_r: int, block_c: int, r_limit, c_limit, lo, hi,
                masks_rows: bool) -> TileRange:
  """Column tiles that the row tile `[r0, r0 + block_r)` visits, for pairs
  valid when `lo <= c - r <= hi`, `r < r_limit` and `c < c_limit`."""
  r1 = r0 + block_r
  lo_c, hi_c = jnp.int32(0), c_limit
  full_lo, full_hi = jnp.int32(0), _div(c_limit, block_c)
  if lo is not None:
    lo_c = jnp.maximum(r0 + lo, 0)
    full_lo = _cdiv(jnp.maximum(r1 - 1 + lo, 0), block_c)
  if hi is not None:
    hi_c = jnp.minimum(hi_c, jnp.minimum(r1, r_limit) + hi)
    full_hi = jnp.minimum(full_hi, _div(r0 + hi + 1, block_c))
  if masks_rows:
    full_hi = jnp.where(r1 <= r_limit, full_hi, 0)
  return _tile_range(lo_c, hi_c, r0 < r_limit, block_c, full_lo, full_hi)


def key_tiles(spec: AttentionSpec, q0, block_q: int, block_k: int, q_limit,
              kv_limit, *, masks_queries: bool = True) -> TileRange:
  """Key tiles that the query tile `[q0, q0 + block_q)` visits.

  `masks_queries`: the kernel masks query rows at or past `q_limit` (so a
  query tile reaching past it is never full); a kernel that discards such
  rows instead passes False.
  """
  lo, hi = _band(spec)
  return _band_tiles(q0, block_q, block_k, q_limit, kv_limit, lo, hi,
                     masks_queries)


def query_tiles(spec: AttentionSpec, k0, block_k: int, block_q: int, q_limit,
                kv_limit) -> TileRange:
  """Query tiles that the key tile `[k0, k0 + block_k)` meets (as `key_tiles`,
  with the band `lo <= key - query <= hi` read as `-hi <= query - key <= -lo`)."""
  lo, hi = _band(spec)
  return _band_tiles(k0, block_k, block_q, kv_limit, q_limit,
                     None if hi is None else -hi, None if lo is None else -lo,
                     masks_rows=True)


def _tile_range(lo_pos, hi_pos, any_valid, block, full_lo, full_hi) -> TileRange:
  """Tiles covering positions [lo_pos, hi_pos) (none unless `any_valid`)."""
  lo = _div(lo_pos, block)
  hi = jnp.where(any_valid & (hi_pos > lo_pos), _cdiv(hi_pos, block), lo)
  full_lo = _clip(full_lo, lo, hi)
  full_hi = _clip(full_hi, full_lo, hi)
  return TileRange(lo, full_lo, full_hi, hi)


def within(inner: TileRange, outer: TileRange) -> TileRange:
  """`inner`'s full tiles clipped to `outer`'s range: how a warpgroup that
  walks its CTA's key tiles (`outer`) classifies them by its own rows."""
  full_lo = _clip(inner.full_lo, outer.lo, outer.hi)
  full_hi = _clip(inner.full_hi, full_lo, outer.hi)
  return TileRange(outer.lo, full_lo, full_hi, outer.hi)


def needs_positional_masks(spec: AttentionSpec, padded_kv_len: int, *,
                           masks_queries: bool = True) -> bool:
  """Whether any key tile of the call can be partial by position
  (`masks_queries` as in `key_tiles`)."""
  return (spec.is_causal or spec.window is not None
          or (masks_queries and spec.has_q_lengths) or spec.has_kv_lengths
          or padded_kv_len != spec.kv_len)


# Segments of a pattern's tile list, in the order kernels walk them; a
# segment's tiles are in ascending order. SKIPPED holds the rest (for kernels
# that clear outputs of tiles they do not visit).
NM_PARTIAL, NM_FULL, DENSE_PARTIAL, DENSE_FULL, SKIPPED = range(5)
# `PatternTiles.bounds` is padded to this many entries.
BOUNDS_SIZE = 8


class PatternTiles(NamedTuple):
  """A pattern's compacted tile lists, `[B', H', rows, ...]` int32 each.

  `tiles[..., r, :]` is a permutation of the column tiles of row tile `r`,
  segment by segment; segment `s` is `tiles[..., bounds[s]:bounds[s + 1]]`
  (`bounds[0] == 0`, `bounds[5]` the number of column tiles). `B'` is the
  batch where the modes or the sequence lengths vary over it, else 1; `H'`
  the heads where the modes vary over them, else 1.
  """
  tiles: Any
  bounds: Any


def pattern_tiles(spec: AttentionSpec, modes, row_tile: int, col_tile: int,
                  num_rows: int, num_cols: int, q_lengths=None, kv_lengths=None,
                  *, transposed: bool = False,
                  masks_queries: bool = True) -> PatternTiles:
  """The tile lists of a block pattern for kernel tiles `row_tile x col_tile`.

  `modes [B|1, H|1, nq, nk]` int8 are the call's `block_modes`; the kernel's
  query and key tiles must divide the pattern's `block_q` and `block_k`.
  Rows are query tiles and columns key tiles (`key_tiles`), or with
  `transposed` rows are key tiles and columns query tiles (`query_tiles`).
  A tile is visited where its block is `NM` or `DENSE` (any other value
  skips, as the reference reads traced modes) and the positional tile range
  reaches it; it is dense where its block is `DENSE` or the call has
  `n == m`, and full where the range says so.
  """
  tile_q, tile_k = (col_tile, row_tile) if transposed else (row_tile, col_tile)
  if spec.block_q % tile_q or spec.block_k % tile_k:
    raise ValueError(f"kernel tiles {tile_q}x{tile_k} must divide the pattern's "
                     f"blocks {spec.block_q}x{spec.block_k}")
  modes = jnp.repeat(jnp.repeat(modes, spec.block_q // tile_q, axis=2),
                     spec.block_k // tile_k, axis=3)
  modes = modes[:, :, :(num_cols if transposed else num_rows),
                :(num_rows if transposed else num_cols)]
  if transposed:
    modes = jnp.swapaxes(modes, 2, 3)

  def ranges(q_length, kv_length):
    q_limit, kv_limit = sequence_limits(spec, q_length, kv_length)
    starts = jnp.arange(num_rows, dtype=jnp.int32) * row_tile
    if transposed:
      tile_range = lambda k0: query_tiles(spec, k0, tile_k, tile_q, q_limit,
                                          kv_limit)
    else:
      tile_range = lambda q0: key_tiles(spec, q0, tile_q, tile_k, q_limit,
                                        kv_limit, masks_queries=masks_queries)
    return jax.vmap(tile_range)(starts)

  if q_lengths is None and kv_lengths is None:
    lo, full_lo, full_hi, hi = (x[None] for x in ranges(None, None))
  else:
    lo, full_lo, full_hi, hi = jax.vmap(ranges)(q_lengths, kv_lengths)
  col = jnp.arange(num_cols, dtype=jnp.int32)
  # [B'', 1, rows, cols] positional classes against [B|1, H|1, rows, cols] modes
  in_range = (lo[:, None, :, None] <= col) & (col < hi[:, None, :, None])
  full = (full_lo[:, None, :, None] <= col) & (col < full_hi[:, None, :, None])
  visit = in_range & ((modes == NM) | (modes == DENSE))
  dense = (modes == DENSE) | spec.is_dense
  segment = jnp.where(visit, 2 * dense.astype(jnp.int32) + full, SKIPPED)
  # Column indices are below num_cols: sorting segment * num_cols + col
  # orders by segment, then column, and the remainder recovers the column.
  order = jnp.sort(segment * num_cols + col, axis=-1)
  tiles = (order % num_cols).astype(jnp.int32)
  bounds = jnp.stack([jnp.sum(segment < s, axis=-1, dtype=jnp.int32)
                      for s in range(SKIPPED + 1)]
                     + [jnp.full(segment.shape[:-1], num_cols, jnp.int32)]
                     * (BOUNDS_SIZE - SKIPPED - 1), axis=-1)
  return PatternTiles(tiles, bounds)
