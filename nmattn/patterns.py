"""Block patterns: which `[block_q, block_k]` blocks of the score matrix are
skipped, pruned N:M or kept dense (hierarchical structured sparsity).

A `BlockPattern(modes, block_q, block_k)` gives every (batch, head, query
block, key block) one mode: `SKIP` (every score of the block is masked before
pruning), `NM` (the N:M rule applies, as with no pattern) or `DENSE` (every
valid score is kept). The semantics are those of `nmattn.reference`.

Static constructors (`causal`, `local_band`, `sinks`, `dilated`, `segments`)
build patterns from positions or segment ids; `topk_blocks` and
`sample_attention` compute them on the device from `query` and `key`, under
`jit`. Patterns combine as a lattice ordered `SKIP < NM < DENSE`: `union`
takes the elementwise maximum (a block is kept if any pattern keeps it, at the
densest mode asked for), `intersect` the elementwise minimum (kept only where
every pattern keeps it, at the sparsest mode), and `with_mode` sets the mode of
every kept block. So `intersect(p, causal(..., mode=DENSE))` restricts `p` to
the causal blocks and keeps `p`'s modes there.

Constructors from positions return numpy modes, so the pattern stays a
constant (known when the call is traced); the others return jax arrays.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nmattn import masking
# The block modes are defined beside the call description the kernels read.
from pallas_kernels.call import DENSE, NM, SKIP

MODES = (SKIP, NM, DENSE)


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_int(name: str, value: Any, minimum: int) -> None:
  if not _is_int(value) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}; got {name}={value!r}")


def _check_mode(mode: Any) -> None:
  if not _is_int(mode) or mode not in (NM, DENSE):
    raise ValueError(
        f"mode must be nmattn.NM ({NM}) or nmattn.DENSE ({DENSE}); got mode={mode!r}")


def _xp(*arrays):
  """numpy when every array is a numpy array (the result stays a constant), else jnp."""
  return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def num_blocks(length: int, block: int) -> int:
  """Blocks of `block` positions covering `length` positions (the last may be partial)."""
  return -(-length // block)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class BlockPattern:
  """The mode of every `[block_q, block_k]` block of the score matrix.

  Attributes:
    modes: int8 array broadcastable to `[batch, heads, ceil(q_len / block_q),
      ceil(kv_len / block_k)]` (heads are query heads), each entry `SKIP`, `NM`
      or `DENSE`. A constant (numpy) or a jax array, traced or not.
    block_q: query positions per block, a positive int.
    block_k: key positions per block, a positive int and a multiple of the
      call's `m` (checked when the pattern meets a call).

  A pytree whose only leaf is `modes` (the block sizes are static), so it
  passes through `jit`, `vmap` and `grad` and may be computed inside them.
  """
  modes: Any
  block_q: int
  block_k: int

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      value = getattr(self, name)
      if not _is_int(value) or value < 1:
        raise ValueError(f"block_pattern.{name} must be a positive int; got "
                         f"{name}={value!r}")

  def tree_flatten(self):
    return (self.modes,), (self.block_q, self.block_k)

  @classmethod
  def tree_unflatten(cls, block_sizes, leaves):
    return cls(leaves[0], *block_sizes)


def _checked_parts(block_pattern: Any, m: int):
  """The checks that need no call: type, `block_k % m`, an int8 array. Returns the modes."""
  if not isinstance(block_pattern, BlockPattern):
    raise ValueError("block_pattern must be an nmattn.BlockPattern or None; got "
                     f"block_pattern={type(block_pattern).__name__}")
  block_k = block_pattern.block_k
  if block_k % m:
    raise ValueError(f"block_pattern.block_k must be a multiple of m={m} (every "
                     f"N:M group inside one block); got block_k={block_k}")
  modes = block_pattern.modes
  shape, dtype = getattr(modes, "shape", None), getattr(modes, "dtype", None)
  if shape is None or dtype is None:
    raise ValueError("block_pattern.modes must be an int8 array; got "
                     f"block_pattern.modes={type(modes).__name__}")
  if jnp.dtype(dtype) != jnp.int8:
    raise ValueError("block_pattern.modes must be an int8 array; got "
                     f"block_pattern.modes.dtype={dtype}")
  return modes


def _check_values(modes) -> None:
  """Raises for concrete modes outside {0, 1, 2}; traced modes pass unchecked."""
  try:
    values = np.asarray(modes)
  except jax.errors.TracerArrayConversionError:
    return  # traced: unchecked, read as canonical_modes says
  bad = np.setdiff1d(np.unique(values), MODES)
  if bad.size:
    raise ValueError("block_pattern.modes must hold only SKIP=0, NM=1, DENSE=2; "
                     f"got values {bad.tolist()}")


def check_block_pattern(block_pattern: Any, m: int) -> None:
  """Validates what a pattern fixes by itself, before it meets a call.

  The checks of `canonical_modes` that need no shapes of a call: a
  `BlockPattern`, `block_k` a multiple of `m`, int8 modes of rank <= 4 with
  values in {0, 1, 2} (where concrete). The layers run it at construction.

  Raises:
    ValueError: naming `block_pattern` and the value.
  """
  modes = _checked_parts(block_pattern, m)
  if len(modes.shape) > 4:
    raise ValueError("block_pattern.modes must have rank <= 4 ([batch, heads, "
                     "ceil(q_len / block_q), ceil(kv_len / block_k)]); got "
                     f"block_pattern.modes.shape={tuple(modes.shape)}")
  _check_values(modes)


def canonical_modes(block_pattern: Any, *, batch: int, heads: int, q_len: int,
                    kv_len: int, m: int):
  """Validates a pattern against a call; returns its modes as int8 `[B|1, H|1, nq, nk]`.

  The modes may have any rank up to 4 and broadcast as numpy does (aligned on
  the right); every dim of size 1 broadcasts, the block dims too (e.g. modes
  `[nk]` give every query block the same key blocks). The result is 4-D with
  the block dims `nq = ceil(q_len / block_q)`, `nk = ceil(kv_len / block_k)`
  full and each leading dim 1 or full; it is numpy where the modes are.

  Values outside {0, 1, 2} raise for concrete modes. Traced modes (computed
  under `jit`) cannot be checked: there every value other than `NM` and
  `DENSE` acts as `SKIP`, so a bad value drops a block, never adds one.

  Raises:
    ValueError: naming `block_pattern` and the value: not a `BlockPattern`,
      `block_k` not a multiple of `m`, modes not an int8 array, not
      broadcastable to `[batch, heads, nq, nk]`, or values outside {0, 1, 2}.
  """
  modes = _checked_parts(block_pattern, m)
  block_q, block_k = block_pattern.block_q, block_pattern.block_k
  full = (batch, heads, num_blocks(q_len, block_q), num_blocks(kv_len, block_k))
  shape = tuple(modes.shape)
  if len(shape) > 4 or any(got not in (1, want) for got, want in
                           zip(reversed(shape), reversed(full))):
    raise ValueError(
        "block_pattern.modes must be broadcastable to [batch, heads, "
        f"ceil(q_len / block_q), ceil(kv_len / block_k)]={full} (block_q="
        f"{block_q}, block_k={block_k}); got block_pattern.modes.shape={shape}")
  _check_values(modes)
  xp = _xp(modes)
  modes4 = xp.reshape(modes, (1,) * (4 - len(shape)) + shape)
  return xp.broadcast_to(modes4, modes4.shape[:2] + full[2:])


def element_modes(modes, q_pos, k_pos, *, block_q: int, block_k: int):
  """The mode of every score of a tile: int8 `[B|1, H|1, tq, tk]`.

  Args:
    modes: canonical block modes `[B|1, H|1, nq, nk]` (`canonical_modes`).
    q_pos: int `[tq]` global query positions of the tile (may be traced).
    k_pos: int `[tk]` global key positions of the tile (may be traced).
    block_q, block_k: the pattern's block sizes.

  Positions outside the pattern's blocks (tile padding) get `SKIP`.
  """
  nq, nk = modes.shape[-2:]
  q_block = jnp.asarray(q_pos) // block_q
  k_block = jnp.asarray(k_pos) // block_k
  tile = jnp.take(jnp.asarray(modes), jnp.clip(q_block, 0, nq - 1), axis=2)
  tile = jnp.take(tile, jnp.clip(k_block, 0, nk - 1), axis=3)
  inside = (((q_block >= 0) & (q_block < nq))[:, None]
            & ((k_block >= 0) & (k_block < nk))[None, :])
  return jnp.where(inside[None, None], tile, jnp.int8(SKIP))


def keep_mask(scores, modes, n: int, m: int):
  """Which scores of a tile are kept under the element modes of `element_modes`.

  `scores` are masked (`-inf` where invalid), with the last axis starting at
  a group boundary. `SKIP` scores (and every mode other than `NM`/`DENSE`) are
  masked before pruning, `NM` scores are pruned N:M, `DENSE` scores are kept
  where valid. Returns bool of the shape of `scores`; carries no gradient.
  """
  scores = jax.lax.stop_gradient(scores)
  skip = (modes != NM) & (modes != DENSE)
  scores = jnp.where(skip, -jnp.inf, scores)
  return jnp.where(modes == DENSE, scores != -jnp.inf,
                   masking.nm_mask(scores, n, m))


# --- static constructors -------------------------------------------------------


def _block_bounds(length: int, block: int):
  """First and last position of every block, numpy int `[num_blocks]`."""
  first = np.arange(num_blocks(length, block)) * block
  return first, np.minimum(first + block, length) - 1


def _offset_cover(q_len, kv_len, block_q, block_k, lowest, highest):
  """bool `[nq, nk]`: blocks holding a pair with `lowest <= key - query <= highest`."""
  q_first, q_last = _block_bounds(q_len, block_q)
  k_first, k_last = _block_bounds(kv_len, block_k)
  # key - query over a block pair spans [k_first - q_last, k_last - q_first].
  return ((k_first[None, :] - q_last[:, None] <= highest)
          & (k_last[None, :] - q_first[:, None] >= lowest))


def _geometry(q_len, kv_len, block_q, block_k):
  for name, value in (("q_len", q_len), ("kv_len", kv_len),
                      ("block_q", block_q), ("block_k", block_k)):
    _check_int(name, value, 1)


def _static(kept, block_q, block_k, mode) -> BlockPattern:
  _check_mode(mode)
  modes = np.where(kept, np.int8(mode), np.int8(SKIP)).astype(np.int8)
  return BlockPattern(modes[None, None], block_q, block_k)


def causal(q_len: int, kv_len: int, *, block_q: int, block_k: int,
           mode: int = NM) -> BlockPattern:
  """Blocks wholly or partly on or below the diagonal (top-left aligned, as `is_causal`).

  A block is kept when some key position in it is <= some query position in
  it. Returns modes `[1, 1, nq, nk]`, kept blocks at `mode`.
  """
  _geometry(q_len, kv_len, block_q, block_k)
  return _static(_offset_cover(q_len, kv_len, block_q, block_k, -np.inf, 0),
                 block_q, block_k, mode)


def local_band(q_len: int, kv_len: int, *, block_q: int, block_k: int,
               width: int, mode: int = DENSE) -> BlockPattern:
  """A band of `width` key blocks either side of the diagonal, the diagonal included.

  The blocks that meet the positions `|key - query| <= (width - 1) * block_k`:
  with `block_q == block_k`, key blocks `i - width < j < i + width` of query
  block `i` (intersect with `causal` for the `width` blocks ending at the
  diagonal). Returns modes `[1, 1, nq, nk]`, kept blocks at `mode`.
  """
  _geometry(q_len, kv_len, block_q, block_k)
  _check_int("width", width, 1)
  reach = (width - 1) * block_k
  return _static(_offset_cover(q_len, kv_len, block_q, block_k, -reach, reach),
                 block_q, block_k, mode)


def sinks(q_len: int, kv_len: int, *, block_q: int, block_k: int, count: int,
          mode: int = DENSE) -> BlockPattern:
  """The first `count` key blocks for every query block (attention sinks).

  Returns modes `[1, 1, nq, nk]`, kept blocks at `mode`.
  """
  _geometry(q_len, kv_len, block_q, block_k)
  _check_int("count", count, 1)
  nq, nk = num_blocks(q_len, block_q), num_blocks(kv_len, block_k)
  kept = np.broadcast_to(np.arange(nk)[None, :] < count, (nq, nk))
  return _static(kept, block_q, block_k, mode)


def dilated(q_len: int, kv_len: int, *, block_q: int, block_k: int, stride: int,
            offset: int = 0, mode: int = NM) -> BlockPattern:
  """Every `stride`-th block diagonal: strided (dilated) attention at block level.

  Query block `i`'s diagonal key block is `d = (i * block_q) // block_k`, the
  one holding its first position; key block `j` is kept when
  `(d - j) % stride == offset % stride`. With `offset=0` the diagonal itself
  is kept. Returns modes `[1, 1, nq, nk]`, kept blocks at `mode`.
  """
  _geometry(q_len, kv_len, block_q, block_k)
  _check_int("stride", stride, 1)
  _check_int("offset", offset, 0)
  nq, nk = num_blocks(q_len, block_q), num_blocks(kv_len, block_k)
  diagonal = (np.arange(nq) * block_q) // block_k
  kept = (diagonal[:, None] - np.arange(nk)[None, :]) % stride == offset % stride
  return _static(kept, block_q, block_k, mode)


def segment_ids_from_lengths(lengths, seq_len: int):
  """Segment ids `[batch, seq_len]` int32 from document lengths `[batch, docs]`.

  Row `b`'s documents lie one after another from position 0: positions of
  document `d` get id `d`, positions past the last document get -1 (padding).
  """
  lengths = jnp.asarray(lengths)
  if lengths.ndim != 2 or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError("lengths must be an int array [batch, docs]; got "
                     f"lengths.shape={lengths.shape}, lengths.dtype={lengths.dtype}")
  _check_int("seq_len", seq_len, 1)
  ends = jnp.cumsum(lengths, axis=1)
  pos = jnp.arange(seq_len)
  ids = jnp.sum(ends[:, :, None] <= pos[None, None, :], axis=1, dtype=jnp.int32)
  return jnp.where(pos[None, :] < ends[:, -1:], ids, -1)


def _blocked_ids(ids, block: int):
  """int `[batch, nb, block]`, padded with -1."""
  length = ids.shape[1]
  pad = num_blocks(length, block) * block - length
  return jnp.pad(ids, ((0, 0), (0, pad)), constant_values=-1).reshape(
      ids.shape[0], -1, block)


def segments(q_segment_ids, kv_segment_ids=None, *, block_q: int, block_k: int,
             mode: int = NM) -> BlockPattern:
  """Per-batch document segments: blocks whose query and key blocks share a segment.

  Args:
    q_segment_ids: int `[batch, q_len]`, the segment of each query; negative
      ids mark padding, which meets no segment.
    kv_segment_ids: int `[batch, kv_len]`, likewise for keys; default the
      query ids (self-attention). `segment_ids_from_lengths` builds ids from
      document lengths.
    block_q, block_k: block sizes.
    mode: the mode of kept blocks.

  Returns modes `[batch, 1, nq, nk]` (jax). The blocks are exact (a block is
  kept when one of its queries and one of its keys have the same id); the
  element mask `q_ids[:, :, None] == kv_ids[:, None, :]` still belongs in
  `mask` where documents must not see each other inside a shared block.
  Memory `batch * q_len * kv_len` booleans.
  """
  _check_mode(mode)
  _check_int("block_q", block_q, 1)
  _check_int("block_k", block_k, 1)
  q_ids = jnp.asarray(q_segment_ids)
  kv_ids = q_ids if kv_segment_ids is None else jnp.asarray(kv_segment_ids)
  for name, ids in (("q_segment_ids", q_ids), ("kv_segment_ids", kv_ids)):
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"{name} must be an int array [batch, length]; got "
                       f"{name}.shape={ids.shape}, {name}.dtype={ids.dtype}")
  if kv_ids.shape[0] != q_ids.shape[0]:
    raise ValueError("kv_segment_ids must have the batch of q_segment_ids "
                     f"({q_ids.shape[0]}); got kv_segment_ids.shape={kv_ids.shape}")
  q_blocks = _blocked_ids(q_ids, block_q)[:, :, None, :, None]
  kv_blocks = _blocked_ids(kv_ids, block_k)[:, None, :, None, :]
  meet = jnp.any((q_blocks == kv_blocks) & (q_blocks >= 0), axis=(3, 4))
  modes = jnp.where(meet, jnp.int8(mode), jnp.int8(SKIP))
  return BlockPattern(modes[:, None], block_q, block_k)


# --- combining -----------------------------------------------------------------


def _same_blocks(name: str, patterns) -> tuple[int, int]:
  if not patterns or not all(isinstance(p, BlockPattern) for p in patterns):
    raise ValueError(f"{name} takes one or more BlockPatterns; got {patterns!r}")
  sizes = {(p.block_q, p.block_k) for p in patterns}
  if len(sizes) > 1:
    raise ValueError(f"{name} needs equal block sizes; got (block_q, block_k) "
                     f"in {sorted(sizes)}")
  return sizes.pop()


def _combine(name: str, reduce, patterns) -> BlockPattern:
  block_q, block_k = _same_blocks(name, patterns)
  arrays = [p.modes for p in patterns]
  xp = _xp(*arrays)
  shape = np.broadcast_shapes(*(a.shape for a in arrays))
  combined = functools.reduce(reduce(xp), [xp.broadcast_to(a, shape) for a in arrays])
  return BlockPattern(combined, block_q, block_k)


def union(*patterns: BlockPattern) -> BlockPattern:
  """Elementwise maximum (`DENSE > NM > SKIP`): kept where any pattern keeps a block."""
  return _combine("union", lambda xp: xp.maximum, patterns)


def intersect(*patterns: BlockPattern) -> BlockPattern:
  """Elementwise minimum: kept where every pattern keeps a block, at the sparsest mode."""
  return _combine("intersect", lambda xp: xp.minimum, patterns)


def with_mode(pattern: BlockPattern, mode: int) -> BlockPattern:
  """The same blocks with every kept (`NM` or `DENSE`) block set to `mode`."""
  _same_blocks("with_mode", (pattern,))
  _check_mode(mode)
  xp = _xp(pattern.modes)
  kept = (pattern.modes == NM) | (pattern.modes == DENSE)
  modes = xp.where(kept, np.int8(mode), np.int8(SKIP)).astype(np.int8)
  return BlockPattern(modes, pattern.block_q, pattern.block_k)


# --- adaptive ------------------------------------------------------------------

HIGHEST = jax.lax.Precision.HIGHEST


def _query_key(query, key):
  """Float query/key as 4-D arrays without gradient, and whether a batch dim was added."""
  q_shape = tuple(getattr(query, "shape", ()))
  k_shape = tuple(getattr(key, "shape", ()))
  if len(q_shape) not in (3, 4):
    raise ValueError("query must have rank 4 ([batch, q_len, heads, head_dim]) or "
                     f"3; got query.shape={q_shape}")
  if len(k_shape) != len(q_shape):
    raise ValueError(f"key must have the rank of query; got key.shape={k_shape}, "
                     f"query.shape={q_shape}")
  for name, x in (("query", query), ("key", key)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a float array; got {name}.dtype={x.dtype}")
  added_batch = len(q_shape) == 3
  if added_batch:
    query, key = query[None], key[None]
  (batch, _, heads, dim), (k_batch, _, kv_heads, k_dim) = query.shape, key.shape
  if k_batch != batch or k_dim != dim or heads % kv_heads:
    raise ValueError("key must be [batch, kv_len, kv_heads, head_dim] with the "
                     "batch and head_dim of query and heads % kv_heads == 0; got "
                     f"query.shape={q_shape}, key.shape={k_shape}")
  cd = jnp.promote_types(query.dtype, jnp.float32)
  return (jax.lax.stop_gradient(query).astype(cd),
          jax.lax.stop_gradient(key).astype(cd), added_batch)


def _block_means(x, block: int, valid=None):
  """`[batch, length, heads, dim]` -> `[batch, num_blocks, heads, dim]` block means.

  The last block's mean is over the positions it holds. With `valid` (bool
  broadcastable to `[batch, length]`), over the valid positions only; a block
  without one gets zeros.
  """
  batch, length, heads, dim = x.shape
  blocks = num_blocks(length, block)
  pad = ((0, 0), (0, blocks * block - length))
  if valid is None:
    padded = jnp.pad(x, pad + ((0, 0), (0, 0)))
    sums = padded.reshape(batch, blocks, block, heads, dim).sum(axis=2)
    first, last = _block_bounds(length, block)
    counts = (last - first + 1).astype(np.float32)
    return sums / counts[None, :, None, None]
  weights = jnp.pad(jnp.broadcast_to(valid, (batch, length)).astype(x.dtype), pad)
  weights = weights.reshape(batch, blocks, block)
  padded = jnp.pad(x, pad + ((0, 0), (0, 0))).reshape(batch, blocks, block, heads, dim)
  sums = jnp.einsum("bnlhd,bnl->bnhd", padded, weights, precision=HIGHEST)
  counts = jnp.maximum(weights.sum(axis=-1), 1)
  return sums / counts[:, :, None, None]


def _canonical_mask(mask, full):
  """A bool mask broadcastable to `full = (batch, heads, q_len, kv_len)`, as 4-D."""
  shape, dtype = getattr(mask, "shape", None), getattr(mask, "dtype", None)
  if shape is None or dtype is None or jnp.dtype(dtype) != jnp.bool_:
    raise ValueError("mask must be a bool array (True = attend); got "
                     f"mask={type(mask).__name__}"
                     + ("" if dtype is None else f" of dtype {dtype}"))
  shape = tuple(shape)
  if len(shape) > 4 or any(got not in (1, want) for got, want in
                           zip(reversed(shape), reversed(full))):
    raise ValueError("mask must be broadcastable to [batch, heads, q_len, "
                     f"kv_len]={full}; got mask.shape={shape}")
  return jnp.reshape(mask, (1,) * (4 - len(shape)) + shape)


def _blocks_with_a_pair(mask, block_q: int, block_k: int):
  """4-D bool mask -> `[B|1, H|1, nq|1, nk|1]`: blocks where it keeps some pair.

  A broadcast (size-1) position axis stays size 1: the same for every block.
  """
  for axis, block in ((2, block_q), (3, block_k)):
    length = mask.shape[axis]
    if length == 1:
      continue
    blocks = num_blocks(length, block)
    pad = [(0, 0)] * 4
    pad[axis] = (0, blocks * block - length)
    padded = jnp.pad(mask, pad)  # padding is False: no pair there
    mask = padded.reshape(padded.shape[:axis] + (blocks, block)
                          + padded.shape[axis + 1:]).any(axis=axis + 1)
  return mask


def _scores(query, key, precision=HIGHEST):
  """`q . k` for every query head and its key/value head (GQA): `[B, H, T, S]`."""
  batch, q_len, heads, dim = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  grouped = query.reshape(batch, q_len, kv_heads, heads // kv_heads, dim)
  s = jnp.einsum("btkgd,bskd->bkgts", grouped, key, precision=precision)
  return s.reshape(batch, heads, q_len, kv_len)


def _top(values, count: int):
  """bool: the `count` largest entries along the last axis; ties to the lower index.

  One `lax.top_k` and a scatter, where ranking every entry takes two sorts.
  """
  _, index = jax.lax.top_k(values, count)
  return jnp.put_along_axis(jnp.zeros(values.shape, bool), index, True,
                            axis=-1, inplace=False)


def _ranks(values):
  """Rank of each entry along the last axis, 0 for the largest; ties to the lower index."""
  order = jnp.argsort(-values, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True)


def _window_blocks(q_len, kv_len, block_q, block_k, local_blocks, sink_blocks,
                   is_causal):
  """numpy bool `[nq, nk]` reachable blocks (causal or all) and the forced ones in them."""
  nq, nk = num_blocks(q_len, block_q), num_blocks(kv_len, block_k)
  reachable = (_offset_cover(q_len, kv_len, block_q, block_k, -np.inf, 0)
               if is_causal else np.ones((nq, nk), bool))
  forced = np.zeros((nq, nk), bool)
  if local_blocks:
    reach = (local_blocks - 1) * block_k
    forced |= _offset_cover(q_len, kv_len, block_q, block_k, -reach, reach)
  forced[:, :sink_blocks] = True
  return reachable[None, None], (forced & reachable)[None, None]


def _adaptive_args(q_len, kv_len, block_q, block_k, local_blocks, is_causal, mode):
  _geometry(q_len, kv_len, block_q, block_k)
  _check_int("local_blocks", local_blocks, 0)
  if not isinstance(is_causal, (bool, np.bool_)):
    raise ValueError(f"is_causal must be a bool; got is_causal={is_causal!r}")
  _check_mode(mode)


def topk_blocks(query, key, *, block_q: int, block_k: int, k: int | None = None,
                density: float | None = None, local_blocks: int = 1,
                sink_blocks: int = 1, is_causal: bool = False,
                mode: int = NM, mask=None,
                autoregressive: bool = False) -> BlockPattern:
  """The highest-scoring key blocks of every query block and head, from pooled q and k.

  Each block of queries and of keys is mean-pooled; the pooled score of a
  block pair is `mean(q) . mean(k)` (per query head against its key/value
  head, GQA aware). Every query block keeps `k` key blocks: first the local
  band (`local_blocks` blocks either side of the diagonal, as `local_band`)
  and the first `sink_blocks` key blocks, both `DENSE`, then the remaining
  blocks in order of pooled score (ties to the lower index) at `mode`. With
  `is_causal`, blocks wholly above the diagonal are never kept, so a query
  block keeps at most its reachable blocks. Runs under `jit` and `vmap`;
  carries no gradient. Cost: one pass over q and k plus `[B, H, nq, nk]`
  pooled scores and a top-k of them.

  With `mask` (padding, documents), a block in which the mask keeps no pair
  is never kept, the band and sinks included, and takes none of the `k`
  places: a key block holding only padding keys is never selected, and a
  query block whose queries are all masked keeps no block at all (its rows
  have no valid key anyway). Block means are then over the positions the
  mask leaves valid (a query valid for some head and key, a key for some
  head and query). The mask still has to be passed to the attention: the
  pattern only chooses blocks.

  A block mean reads every query and key of the block, so under plain
  `is_causal` the blocks a query attends depend on later positions of its
  block: harmless when the whole sequence is given (prefill), a leak of the
  future when an autoregressive model trains on it (a byte LM learned to
  read it: 1.96 bits per byte against 2.90 for dense). `autoregressive`
  chooses from the past only: a query block is summarised by its first
  query, only key blocks ending before that query are scored, and the key
  blocks that reach the block's own positions are always kept (at `mode`,
  `DENSE` where the band covers them; they count among the `k`).

  Args:
    query: `[batch, q_len, heads, head_dim]` (or without `batch`).
    key: `[batch, kv_len, kv_heads, head_dim]`, `heads % kv_heads == 0`.
    block_q, block_k: block sizes of the pattern.
    k: key blocks kept per query block, the band and sinks included.
    density: instead of `k`, `k = ceil(density * nk)`, `0 < density <= 1`.
    local_blocks: width of the dense band (0: none).
    sink_blocks: dense leading key blocks (0: none).
    is_causal: keep only blocks on or below the diagonal (top-left aligned).
    mode: the mode of the selected blocks outside the band and sinks.
    mask: optional bool broadcastable to `[batch, heads, q_len, kv_len]`
      (True = attend; batch 1 for unbatched inputs), as `nm_attention`'s:
      e.g. key padding `valid[:, None, None, :]`.
    autoregressive: choose each query block's key blocks from positions
      before it only (needs `is_causal`), for training a causal model.

  Returns:
    A `BlockPattern` with modes `[batch, heads, nq, nk]` (`[heads, nq, nk]`
    for unbatched inputs).
  """
  q, kk, added_batch = _query_key(query, key)
  q_len, kv_len = q.shape[1], kk.shape[1]
  _adaptive_args(q_len, kv_len, block_q, block_k, local_blocks, is_causal, mode)
  _check_int("sink_blocks", sink_blocks, 0)
  if not isinstance(autoregressive, (bool, np.bool_)):
    raise ValueError("autoregressive must be a bool; got "
                     f"autoregressive={autoregressive!r}")
  if autoregressive and not is_causal:
    raise ValueError("autoregressive=True chooses blocks from earlier positions "
                     "and needs is_causal=True; got is_causal=False")
  nk = num_blocks(kv_len, block_k)
  if (k is None) == (density is None):
    raise ValueError(f"give exactly one of k and density; got k={k!r}, "
                     f"density={density!r}")
  if k is not None:
    _check_int("k", k, 1)
    count = min(k, nk)
  else:
    if (isinstance(density, bool) or not isinstance(density, (int, float))
        or not 0 < density <= 1):
      raise ValueError(f"density must be a float in (0, 1]; got density={density!r}")
    count = int(np.ceil(density * nk))
  reachable, forced = _window_blocks(q_len, kv_len, block_q, block_k,
                                     local_blocks, sink_blocks, is_causal)
  q_valid = k_valid = None
  if mask is not None:
    full = (q.shape[0], q.shape[2], q_len, kv_len)
    mask = _canonical_mask(mask, full)
    mask = jax.lax.stop_gradient(mask)
    in_block = _blocks_with_a_pair(mask, block_q, block_k)
    reachable, forced = reachable & in_block, forced & in_block
    q_valid, k_valid = mask.any(axis=(1, 3)), mask.any(axis=(1, 2))
  own = False
  if autoregressive:
    # Key blocks holding a key at or after the block's first query reach
    # the block's own positions: kept unscored. The first query stands for
    # the block.
    firsts = np.arange(num_blocks(q_len, block_q)) * block_q
    ends = np.minimum((np.arange(nk) + 1) * block_k, kv_len)
    own = reachable & (ends[None, :] > firsts[:, None])
    summary = q[:, ::block_q]
  else:
    summary = _block_means(q, block_q, q_valid)
  pooled = _scores(summary, _block_means(kk, block_k, k_valid))
  # The band, sinks and own blocks rank first, unreachable blocks last.
  ranked = jnp.where(forced | own, jnp.inf,
                     jnp.where(reachable, pooled, -jnp.inf))
  selected = (_top(ranked, count) | own) & reachable
  modes = jnp.where(forced, jnp.int8(DENSE),
                    jnp.where(selected, jnp.int8(mode), jnp.int8(SKIP)))
  return BlockPattern(modes[0] if added_batch else modes, block_q, block_k)


def sample_attention(query, key, *, block_q: int, block_k: int,
                     sample_every: int = 8, alpha: float = 0.95,
                     local_blocks: int = 1, is_causal: bool = False,
                     scale: float | None = None, mode: int = NM) -> BlockPattern:
  """SampleAttention's pattern (Zhu et al. 2024) at block granularity.

  Exact attention rows (softmax of `scale * q . k`, causal where asked) are
  computed for every `sample_every`-th query, `[B, H, q_len / sample_every,
  kv_len]` only; their probabilities summed over the sampled rows give each
  key's column mass, summed again per key block. Per batch row and head, the
  smallest set of key blocks whose mass reaches the fraction `alpha` of the
  total is kept at `mode` for every query block, plus a dense local band of
  `local_blocks` blocks either side of the diagonal (as `local_band`); with
  `is_causal`, blocks wholly above the diagonal are dropped.

  The paper keeps individual key columns (stripes) chosen from the column
  mass plus a window of a fraction of the sequence, per head; here whole key
  blocks are kept, the same ones for every query block of a head, and the
  window is counted in blocks. Runs under `jit` and `vmap`; carries no
  gradient. The sampled rows and the column mass read the whole sequence,
  so even with `is_causal` the choice depends on later positions: a pattern
  for prefill, not for training an autoregressive model (see
  `topk_blocks(autoregressive=True)`).

  Args:
    query: `[batch, q_len, heads, head_dim]` (or without `batch`).
    key: `[batch, kv_len, kv_heads, head_dim]`, `heads % kv_heads == 0`.
    block_q, block_k: block sizes of the pattern.
    sample_every: the stride of sampled queries (positions 0, r, 2r, ...).
    alpha: the column mass to cover, `0 < alpha <= 1`.
    local_blocks: width of the dense band (0: none).
    is_causal: sampled rows see keys at or before their position; blocks
      above the diagonal are never kept.
    scale: score scale, default `head_dim ** -0.5`.
    mode: the mode of the selected key blocks outside the band.

  Returns:
    A `BlockPattern` with modes `[batch, heads, nq, nk]` (`[heads, nq, nk]`
    for unbatched inputs).
  """
  q, kk, added_batch = _query_key(query, key)
  batch, q_len, heads, dim = q.shape
  kv_len = kk.shape[1]
  _adaptive_args(q_len, kv_len, block_q, block_k, local_blocks, is_causal, mode)
  _check_int("sample_every", sample_every, 1)
  if (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
      or not 0 < alpha <= 1):
    raise ValueError(f"alpha must be a float in (0, 1]; got alpha={alpha!r}")
  if scale is None:
    scale = dim ** -0.5
  elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
    raise ValueError(f"scale must be a float or None; got scale={scale!r}")
  sampled_pos = np.arange(0, q_len, sample_every)
  scores = _scores(q[:, ::sample_every], kk) * scale
  if is_causal:
    # Key 0 is always valid, so no sampled row is empty.
    visible = np.arange(kv_len)[None, :] <= sampled_pos[:, None]
    scores = jnp.where(visible[None, None], scores, -jnp.inf)
  column_mass = jax.nn.softmax(scores, axis=-1).sum(axis=2)  # [B, H, S]
  nk = num_blocks(kv_len, block_k)
  block_mass = jnp.pad(column_mass, ((0, 0), (0, 0), (0, nk * block_k - kv_len)))
  block_mass = block_mass.reshape(batch, heads, nk, block_k).sum(axis=-1)
  fraction = block_mass / sampled_pos.size
  descending = -jnp.sort(-fraction, axis=-1)
  mass_before = jnp.cumsum(descending, axis=-1) - descending
  count = jnp.sum(mass_before < alpha, axis=-1)  # >= 1: the first has 0 before it
  columns = _ranks(fraction) < count[:, :, None]
  reachable, band = _window_blocks(q_len, kv_len, block_q, block_k,
                                   local_blocks, 0, is_causal)
  selected = columns[:, :, None, :] & reachable
  modes = jnp.where(band, jnp.int8(DENSE),
                    jnp.where(selected, jnp.int8(mode), jnp.int8(SKIP)))
  return BlockPattern(modes[0] if added_batch else modes, block_q, block_k)
