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
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax

from pallas_kernels.call import AttentionSpec


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
