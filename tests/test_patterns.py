"""Block patterns: pytree, validation, element modes, each constructor by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nmattn import patterns, reference
from nmattn.patterns import DENSE, NM, SKIP, BlockPattern


def _modes(pattern):
  """The pattern's modes as a numpy array without the leading [1, 1]."""
  modes = np.asarray(pattern.modes)
  assert modes.dtype == np.int8
  return modes.reshape(modes.shape[-2:]) if modes.shape[:2] == (1, 1) else modes


def _random_qk(rng, *, batch=2, q_len=24, kv_len=32, heads=4, kv_heads=2, dim=8):
  q = jnp.asarray(rng.standard_normal((batch, q_len, heads, dim)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((batch, kv_len, kv_heads, dim)), jnp.float32)
  return q, k


# --- the pytree and validation -------------------------------------------------


def test_pattern_is_a_pytree_with_static_block_sizes(rng):
  modes = jnp.asarray(rng.integers(0, 3, (2, 1, 3, 4)), jnp.int8)
  pattern = BlockPattern(modes, 4, 8)
  leaves, treedef = jax.tree_util.tree_flatten(pattern)
  assert len(leaves) == 1 and leaves[0] is modes
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert (rebuilt.block_q, rebuilt.block_k) == (4, 8)
  # Through jit the block sizes stay Python ints (static), the modes traced.
  @jax.jit
  def shift(p):
    assert isinstance(p.block_q, int) and isinstance(p.modes, jax.Array)
    return BlockPattern(jnp.minimum(p.modes + 1, DENSE).astype(jnp.int8),
                        p.block_q, p.block_k)
  out = shift(pattern)
  np.testing.assert_array_equal(out.modes, np.minimum(np.asarray(modes) + 1, 2))
  # vmap maps over the modes' leading axis.
  rows = jax.vmap(lambda p: p.modes.sum(dtype=jnp.int32))(pattern)
  np.testing.assert_array_equal(rows, np.asarray(modes).sum(axis=(1, 2, 3)))


def test_canonical_modes_broadcasts_to_full_block_dims(rng):
  kwargs = dict(batch=2, heads=4, q_len=10, kv_len=20, m=4)  # nq = 3, nk = 3
  for shape, want in (((3,), (1, 1, 3, 3)), ((4, 1, 3), (1, 4, 3, 3)),
                      ((2, 1, 3, 1), (2, 1, 3, 3)), ((2, 4, 3, 3), (2, 4, 3, 3))):
    modes = rng.integers(0, 3, shape).astype(np.int8)
    got = patterns.canonical_modes(BlockPattern(modes, 4, 8), **kwargs)
    assert isinstance(got, np.ndarray) and got.shape == want  # numpy stays numpy
    np.testing.assert_array_equal(
        got, np.broadcast_to(modes.reshape((1,) * (4 - len(shape)) + shape), want))
  got = patterns.canonical_modes(BlockPattern(jnp.asarray(modes), 4, 8), **kwargs)
  assert isinstance(got, jax.Array) and got.dtype == jnp.int8


@pytest.mark.parametrize("block_q,block_k", [(0, 8), (4, -8), (4.0, 8), (True, 8),
                                             (4, None)])
def test_block_sizes_must_be_positive_ints(block_q, block_k):
  with pytest.raises(ValueError, match="block_pattern.block_"):
    BlockPattern(np.zeros((1, 1), np.int8), block_q, block_k)


@pytest.mark.parametrize("bad,match", [
    (np.ones((2, 4, 3, 3), np.int8), r"block_pattern must be an nmattn.BlockPattern"),
    (BlockPattern(np.ones((3, 3), np.int8), 4, 6), r"block_k must be a multiple of m=4"),
    (BlockPattern([[1, 1, 1]], 4, 8),
     r"modes must be an int8 array; got block_pattern.modes=list"),
    (BlockPattern(np.ones((3, 3), np.int32), 4, 8), r"modes.dtype=int32"),
    (BlockPattern(jnp.ones((3, 3), jnp.float32), 4, 8), r"modes.dtype=float32"),
    (BlockPattern(np.ones((3, 4), np.int8), 4, 8), r"modes.shape=\(3, 4\)"),
    (BlockPattern(np.ones((3, 3, 3), np.int8), 4, 8), r"modes.shape=\(3, 3, 3\)"),
    (BlockPattern(np.ones((1, 1, 1, 3, 3), np.int8), 4, 8),
     r"modes.shape=\(1, 1, 1, 3, 3\)"),
    (BlockPattern(np.full((3, 3), 3, np.int8), 4, 8), r"got values \[3\]"),
    (BlockPattern(jnp.asarray([[0, -1, 2]], jnp.int8), 4, 8), r"got values \[-1\]"),
], ids=["not_a_pattern", "block_k", "list", "int32", "float32", "shape", "heads",
        "rank5", "value3", "value-1"])
def test_bad_patterns_raise_naming_block_pattern(bad, match):
  with pytest.raises(ValueError, match=match) as info:
    patterns.canonical_modes(bad, batch=2, heads=4, q_len=10, kv_len=20, m=4)
  assert "block_pattern" in str(info.value)


def test_element_modes_match_indexing(rng):
  modes = rng.integers(0, 3, (2, 1, 3, 4)).astype(np.int8)
  with jax.numpy_rank_promotion("raise"):
    # A tile reaching past the last blocks on both axes: those positions SKIP.
    q_pos, k_pos = np.arange(6, 6 + 9), np.arange(24, 24 + 16)
    got = np.asarray(patterns.element_modes(modes, q_pos, k_pos, block_q=4,
                                            block_k=8))
  assert got.shape == (2, 1, 9, 16)
  for i, qp in enumerate(q_pos):
    for j, kp in enumerate(k_pos):
      inside = qp // 4 < 3 and kp // 8 < 4
      want = modes[:, :, qp // 4, kp // 8] if inside else SKIP
      np.testing.assert_array_equal(got[:, :, i, j], want)
  # Traced offsets (a blocked backend's loop).
  tile = jax.jit(lambda start: patterns.element_modes(
      jnp.asarray(modes), start + jnp.arange(4), jnp.arange(32), block_q=4,
      block_k=8))(jnp.int32(8))
  np.testing.assert_array_equal(
      tile, np.repeat(modes[:, :, 2:3], 4, axis=2).repeat(8, axis=3))


# --- static constructors -------------------------------------------------------


def test_causal_blocks_by_hand():
  square = patterns.causal(10, 12, block_q=4, block_k=4)
  np.testing.assert_array_equal(_modes(square), [[1, 0, 0], [1, 1, 0], [1, 1, 1]])
  # Rectangular blocks, top-left aligned: query block i holds 2i, 2i + 1.
  rect = patterns.causal(8, 12, block_q=2, block_k=4, mode=DENSE)
  np.testing.assert_array_equal(_modes(rect), [[2, 0, 0], [2, 0, 0], [2, 2, 0],
                                               [2, 2, 0]])
  assert isinstance(rect.modes, np.ndarray) and rect.modes.shape == (1, 1, 4, 3)


def _brute_cover(q_len, kv_len, block_q, block_k, keep):
  """bool blocks holding a pair (q, k) with keep(q, k), from every element."""
  q, k = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
  element = np.broadcast_to(keep(q, k), (q_len, kv_len))
  nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
  return np.array([[element[i * block_q:(i + 1) * block_q,
                            j * block_k:(j + 1) * block_k].any()
                    for j in range(nk)] for i in range(nq)])


@pytest.mark.parametrize("q_len,kv_len,block_q,block_k", [(13, 22, 4, 8),
                                                          (16, 16, 8, 4)])
def test_causal_and_band_match_their_element_masks(q_len, kv_len, block_q, block_k):
  geometry = dict(block_q=block_q, block_k=block_k)
  np.testing.assert_array_equal(
      _modes(patterns.causal(q_len, kv_len, **geometry)) == NM,
      _brute_cover(q_len, kv_len, block_q, block_k, lambda q, k: k <= q))
  reach = 2 * block_k
  np.testing.assert_array_equal(
      _modes(patterns.local_band(q_len, kv_len, width=3, **geometry)) == DENSE,
      _brute_cover(q_len, kv_len, block_q, block_k,
                   lambda q, k: abs(k - q) <= reach))


def test_band_sinks_dilated_by_hand():
  geometry = dict(block_q=4, block_k=4)
  np.testing.assert_array_equal(
      _modes(patterns.local_band(16, 16, width=2, **geometry)),
      [[2, 2, 0, 0], [2, 2, 2, 0], [0, 2, 2, 2], [0, 0, 2, 2]])
  np.testing.assert_array_equal(
      _modes(patterns.local_band(16, 16, width=1, mode=NM, **geometry)), np.eye(4))
  np.testing.assert_array_equal(
      _modes(patterns.sinks(12, 16, count=2, **geometry)), [[2, 2, 0, 0]] * 3)
  np.testing.assert_array_equal(
      _modes(patterns.dilated(16, 16, stride=2, **geometry)),
      [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]])
  np.testing.assert_array_equal(
      _modes(patterns.dilated(16, 16, stride=3, offset=1, **geometry)),
      [[0, 0, 1, 0], [1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]])
  # block_q = 2 block_k: query block i's diagonal key block is 2i.
  np.testing.assert_array_equal(
      _modes(patterns.dilated(8, 16, block_q=4, block_k=2, stride=4)),
      [[1, 0, 0, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0, 1, 0]])


def test_segments_by_hand():
  ids = patterns.segment_ids_from_lengths(jnp.array([[3, 4], [2, 6]]), 8)
  np.testing.assert_array_equal(ids, [[0, 0, 0, 1, 1, 1, 1, -1],
                                      [0, 0, 1, 1, 1, 1, 1, 1]])
  pattern = patterns.segments(ids, block_q=2, block_k=2)
  assert pattern.modes.shape == (2, 1, 4, 4)
  # Row 0's blocks hold ids {0}, {0, 1}, {1}, {1, pad}; row 1's {0}, {1}, {1}, {1}.
  np.testing.assert_array_equal(pattern.modes[:, 0], [
      [[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]],
      [[1, 0, 0, 0], [0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]]])
  # Cross-attention: separate key ids, other block sizes; padding meets nothing.
  cross = patterns.segments(jnp.array([[0, 0, 1, 1]]),
                            jnp.array([[1, 1, 1, -1, 0, 0]]), block_q=2,
                            block_k=3, mode=DENSE)
  np.testing.assert_array_equal(cross.modes[0, 0], [[0, 2], [2, 0]])


def test_union_intersect_with_mode_by_hand():
  geometry = dict(block_q=4, block_k=4)
  causal = patterns.causal(12, 12, **geometry)                     # NM below
  band = patterns.local_band(12, 12, width=2, **geometry)          # DENSE
  sink = patterns.sinks(12, 12, count=1, mode=NM, **geometry)
  np.testing.assert_array_equal(_modes(patterns.union(causal, band)),
                                [[2, 2, 0], [2, 2, 2], [1, 2, 2]])
  np.testing.assert_array_equal(_modes(patterns.intersect(causal, band)),
                                [[1, 0, 0], [1, 1, 0], [0, 1, 1]])
  # Restricting to causal blocks at DENSE keeps the other pattern's modes.
  restricted = patterns.intersect(band, patterns.with_mode(causal, DENSE))
  np.testing.assert_array_equal(_modes(restricted), [[2, 0, 0], [2, 2, 0], [0, 2, 2]])
  np.testing.assert_array_equal(_modes(patterns.union(restricted, sink)),
                                [[2, 0, 0], [2, 2, 0], [1, 2, 2]])
  assert isinstance(patterns.union(restricted, sink).modes, np.ndarray)
  # Patterns of other ranks broadcast; jax modes give jax modes.
  per_head = BlockPattern(jnp.asarray([[[0, 0, 2]], [[1, 0, 0]]], jnp.int8), 4, 4)
  both = patterns.union(causal, per_head)
  assert isinstance(both.modes, jax.Array) and both.modes.shape == (1, 2, 3, 3)
  np.testing.assert_array_equal(both.modes[0], [
      [[1, 0, 2], [1, 1, 2], [1, 1, 2]], [[1, 0, 0], [1, 1, 0], [1, 1, 1]]])


@pytest.mark.parametrize("build,match", [
    (lambda: patterns.causal(0, 8, block_q=4, block_k=4), "q_len"),
    (lambda: patterns.causal(8, 8, block_q=4, block_k=4, mode=SKIP), "mode"),
    (lambda: patterns.causal(8, 8, block_q=4, block_k=4, mode=3), "mode"),
    (lambda: patterns.local_band(8, 8, block_q=4, block_k=4, width=0), "width"),
    (lambda: patterns.sinks(8, 8, block_q=4, block_k=0, count=1), "block_k"),
    (lambda: patterns.sinks(8, 8, block_q=4, block_k=4, count=0), "count"),
    (lambda: patterns.dilated(8, 8, block_q=4, block_k=4, stride=0), "stride"),
    (lambda: patterns.dilated(8, 8, block_q=4, block_k=4, stride=2, offset=-1),
     "offset"),
    (lambda: patterns.segments(jnp.zeros((8,), jnp.int32), block_q=4, block_k=4),
     "q_segment_ids"),
    (lambda: patterns.segments(jnp.zeros((1, 8)), block_q=4, block_k=4),
     "q_segment_ids"),
    (lambda: patterns.segments(jnp.zeros((1, 8), jnp.int32),
                               jnp.zeros((2, 8), jnp.int32), block_q=4, block_k=4),
     "kv_segment_ids"),
    (lambda: patterns.segment_ids_from_lengths(jnp.array([3, 4]), 8), "lengths"),
    (lambda: patterns.union(), "union"),
    (lambda: patterns.union(patterns.causal(8, 8, block_q=4, block_k=4),
                            patterns.causal(8, 8, block_q=2, block_k=4)),
     "equal block sizes"),
    (lambda: patterns.intersect(np.ones((2, 2), np.int8)), "intersect"),
    (lambda: patterns.with_mode(patterns.causal(8, 8, block_q=4, block_k=4), 0),
     "mode"),
])
def test_constructor_errors(build, match):
  with pytest.raises(ValueError, match=match):
    build()


# --- adaptive patterns ---------------------------------------------------------


def _dominant_key_block(rng, *, kv_len=32, block_k=8, blocks=(3, 1)):
  """q, k where key block `blocks[g]` of kv head g is aligned with every query."""
  q, k = _random_qk(rng, batch=1, q_len=24, kv_len=kv_len, heads=4, kv_heads=2)
  direction = rng.standard_normal(8)
  q = q + jnp.asarray(3 * direction, jnp.float32)
  for head, block in enumerate(blocks):
    k = k.at[0, block * block_k:(block + 1) * block_k, head].add(
        jnp.asarray(3 * direction, jnp.float32))
  return q, k


def test_topk_blocks_chooses_the_dominant_block(rng):
  q, k = _dominant_key_block(rng)
  pattern = patterns.topk_blocks(q, k, block_q=8, block_k=8, k=1, local_blocks=0,
                                 sink_blocks=0)
  assert pattern.modes.shape == (1, 4, 3, 4) and pattern.modes.dtype == jnp.int8
  # GQA: query heads 0, 1 read kv head 0 (block 3), heads 2, 3 kv head 1 (block 1).
  want = np.zeros((4, 3, 4), np.int8)
  want[:2, :, 3] = want[2:, :, 1] = NM
  np.testing.assert_array_equal(pattern.modes[0], want)
  # Causal: heads 2, 3 take block 1 once it is reachable; block 3 never is.
  causal = np.asarray(patterns.topk_blocks(
      q, k, block_q=8, block_k=8, k=1, local_blocks=0, sink_blocks=0,
      is_causal=True).modes[0])
  np.testing.assert_array_equal(causal[2:], [[[1, 0, 0, 0], [0, 1, 0, 0],
                                              [0, 1, 0, 0]]] * 2)
  assert np.all(causal[:2, :, 3] == SKIP) and np.all((causal[:2] == NM).sum(-1) == 1)
  # The band and the sinks are DENSE and count towards k.
  forced = patterns.topk_blocks(q, k, block_q=8, block_k=8, k=3, local_blocks=1,
                                sink_blocks=1, is_causal=True)
  np.testing.assert_array_equal(forced.modes[0], [[[2, 0, 0, 0], [2, 2, 0, 0],
                                                   [2, 1, 2, 0]]] * 4)


def test_topk_blocks_ties_go_to_the_lower_block(rng):
  q, k = _random_qk(rng, batch=1, q_len=8, kv_len=32)  # nk = 4
  # Key blocks 1 and 3 hold the same keys: equal pooled scores, next to each
  # other in the order, so some count in 1..3 cuts between them.
  k = k.at[:, 24:].set(k[:, 8:16])
  scores = np.einsum("hd,khd->hk", np.asarray(q).mean(1)[0],
                     np.asarray(k).reshape(4, 8, 2, 8).mean(1).repeat(2, 1))
  for count in (1, 2, 3):
    got = np.asarray(patterns.topk_blocks(q, k, block_q=8, block_k=8, k=count,
                                          local_blocks=0, sink_blocks=0).modes)[0, :, 0]
    for h in range(4):
      order = sorted(range(4), key=lambda j: (-scores[h, j], j))
      np.testing.assert_array_equal(got[h] == NM, np.isin(np.arange(4), order[:count]))


def test_topk_blocks_density_counts_blocks(rng):
  q, k = _random_qk(rng, q_len=20, kv_len=44)  # nq = 3, nk = 6 (both ragged)
  pattern = patterns.topk_blocks(q, k, block_q=8, block_k=8, density=0.5,
                                 local_blocks=2, sink_blocks=1)
  modes = np.asarray(pattern.modes)
  assert modes.shape == (2, 4, 3, 6)
  # The forced blocks: sink 0 and the band |key - query| <= 8 (width 2).
  forced = _modes(patterns.union(
      patterns.local_band(20, 44, block_q=8, block_k=8, width=2),
      patterns.sinks(20, 44, block_q=8, block_k=8, count=1))) == DENSE
  np.testing.assert_array_equal(np.broadcast_to(forced, modes.shape), modes == DENSE)
  # ceil(0.5 * 6) = 3 blocks a row, more where the forced ones are more.
  np.testing.assert_array_equal(forced.sum(-1), [2, 3, 4])
  np.testing.assert_array_equal((modes != SKIP).sum(-1),
                                np.broadcast_to([3, 3, 4], (2, 4, 3)))


def _numpy_topk(q, k, mask, *, block_q, block_k, count, local_blocks,
                sink_blocks, is_causal):
  """topk_blocks with a mask in float64 numpy, one (batch, head, query block) at a time."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  mask = np.broadcast_to(mask, (batch, heads, q_len, kv_len))
  nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
  q_valid, k_valid = mask.any(axis=(1, 3)), mask.any(axis=(1, 2))
  modes = np.zeros((batch, heads, nq, nk), np.int8)
  for b in range(batch):
    for h in range(heads):
      g = h // (heads // kv_heads)
      for i in range(nq):
        rows = slice(i * block_q, (i + 1) * block_q)
        qv = q_valid[b, rows]
        q_mean = q[b, rows, h][qv].sum(0) / max(qv.sum(), 1)
        candidates, forced = [], []
        for j in range(nk):
          cols = slice(j * block_k, (j + 1) * block_k)
          if not mask[b, h, rows, cols].any():
            continue  # no valid pair: never kept
          q_first, q_last = i * block_q, min((i + 1) * block_q, q_len) - 1
          k_first, k_last = j * block_k, min((j + 1) * block_k, kv_len) - 1
          if is_causal and k_first > q_last:
            continue
          reach = (local_blocks - 1) * block_k
          in_band = (local_blocks > 0 and k_first - q_last <= reach
                     and k_last - q_first >= -reach)
          if in_band or j < sink_blocks:
            forced.append(j)
            continue
          kv = k_valid[b, cols]
          k_mean = k[b, cols, g][kv].sum(0) / max(kv.sum(), 1)
          candidates.append((-(q_mean @ k_mean), j))
        modes[b, h, i, forced] = DENSE
        for _, j in sorted(candidates)[:max(count - len(forced), 0)]:
          modes[b, h, i, j] = NM
  return modes


@pytest.mark.parametrize("is_causal", [False, True])
def test_topk_blocks_with_a_mask_matches_numpy(rng, is_causal):
  q, k = _random_qk(rng, batch=3, q_len=29, kv_len=37)  # nq = 4, nk = 5, ragged
  kv_lengths = rng.integers(1, 38, 3)
  q_lengths = rng.integers(1, 30, 3)
  key_padding = np.arange(37)[None, :] < kv_lengths[:, None]
  query_padding = np.arange(29)[None, :] < q_lengths[:, None]
  per_head = rng.random((1, 4, 29, 37)) < 0.9  # also a mask with heads
  for mask in (key_padding[:, None, None, :],
               key_padding[:, None, None, :] & query_padding[:, None, :, None],
               key_padding[:, None, None, :] & per_head):
    for count in (1, 3):
      got = patterns.topk_blocks(q, k, block_q=8, block_k=8, k=count,
                                 local_blocks=1, sink_blocks=1,
                                 is_causal=is_causal, mask=jnp.asarray(mask))
      want = _numpy_topk(q, k, mask, block_q=8, block_k=8, count=count,
                         local_blocks=1, sink_blocks=1, is_causal=is_causal)
      np.testing.assert_array_equal(got.modes, want)


def test_topk_blocks_never_selects_padding(rng):
  q, k = _dominant_key_block(rng)  # kv head 0 prefers key block 3, head 1 block 1
  # Keys from 22 on are padding: block 3 (24..31) holds no valid key.
  padding = jnp.arange(32)[None, None, None, :] < 22
  got = np.asarray(patterns.topk_blocks(q, k, block_q=8, block_k=8, k=2,
                                        local_blocks=0, sink_blocks=0,
                                        mask=padding).modes[0])
  assert np.all(got[..., 3] == SKIP)
  assert np.all((got != SKIP).sum(-1) == 2)  # the place goes to another block
  np.testing.assert_array_equal(got[2:, :, 1], NM)
  # Queries from 16 on are padding: query block 2 keeps nothing, band and sinks
  # included; the other blocks keep theirs.
  both = padding & (jnp.arange(24)[:, None] < 16)
  got = np.asarray(patterns.topk_blocks(q, k, block_q=8, block_k=8, k=2,
                                        local_blocks=1, sink_blocks=1,
                                        mask=both).modes[0])
  assert np.all(got[:, 2] == SKIP)
  np.testing.assert_array_equal(got[:, :2, 0], DENSE)
  # A mask that keeps everything changes nothing.
  no_mask = patterns.topk_blocks(q, k, block_q=8, block_k=8, k=2)
  all_true = patterns.topk_blocks(q, k, block_q=8, block_k=8, k=2,
                                  mask=jnp.ones((1, 1, 24, 32), bool))
  np.testing.assert_array_equal(all_true.modes, no_mask.modes)


def test_topk_blocks_mask_under_jit_vmap_and_unbatched(rng):
  q, k = _random_qk(rng, batch=2, q_len=16, kv_len=24, heads=2, kv_heads=1)
  mask = jnp.asarray(rng.random((2, 1, 16, 24)) < 0.3)
  build = lambda q, k, mask: patterns.topk_blocks(q, k, block_q=8, block_k=8, k=2,
                                                  is_causal=True, mask=mask)
  # Against numpy, not the eager call: eagerly each op compiles on its own.
  want = _numpy_topk(q, k, np.asarray(mask), block_q=8, block_k=8, count=2,
                     local_blocks=1, sink_blocks=1, is_causal=True)
  np.testing.assert_array_equal(jax.jit(build)(q, k, mask).modes, want)
  # Unbatched inputs take a mask of batch 1 (or none): vmap over the batch.
  np.testing.assert_array_equal(jax.vmap(build)(q, k, mask).modes, want)


@pytest.mark.parametrize("mask,match", [
    (np.ones((1, 1, 24, 32), np.int32), "mask must be a bool array.*int32"),
    ([[True]], r"mask must be a bool array.*; got mask=list"),
    (np.ones((1, 1, 24, 31), bool), r"mask must be broadcastable .*\(1, 4, 24, 32\)"
     r"; got mask.shape=\(1, 1, 24, 31\)"),
    (np.ones((2, 1, 1, 32), bool), r"got mask.shape=\(2, 1, 1, 32\)"),
    (np.ones((1, 1, 1, 24, 32), bool), r"got mask.shape=\(1, 1, 1, 24, 32\)"),
])
def test_topk_blocks_mask_errors(rng, mask, match):
  q, k = _dominant_key_block(rng)
  with pytest.raises(ValueError, match=match):
    patterns.topk_blocks(q, k, block_q=8, block_k=8, k=1, mask=mask)


def _numpy_sample_attention(q, k, *, block_q, block_k, r, alpha, is_causal):
  """SampleAttention's block choice in float64 numpy, loops over heads (no band)."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  nk = -(-kv_len // block_k)
  columns = np.zeros((batch, heads, nk), bool)
  for b in range(batch):
    for h in range(heads):
      mass = np.zeros(kv_len)
      rows = range(0, q_len, r)
      for i in rows:
        s = k[b, :, h // (heads // kv_heads)] @ q[b, i, h] * dim ** -0.5
        if is_causal:
          s[i + 1:] = -np.inf
        p = np.exp(s - s.max())
        mass += p / p.sum()
      block_mass = np.array([mass[j * block_k:(j + 1) * block_k].sum()
                             for j in range(nk)]) / len(rows)
      covered = 0.0
      for j in sorted(range(nk), key=lambda j: -block_mass[j]):
        if covered >= alpha:
          break
        columns[b, h, j] = True
        covered += block_mass[j]
  return columns


@pytest.mark.parametrize("is_causal", [False, True])
def test_sample_attention_matches_numpy(rng, is_causal):
  q, k = _random_qk(rng, q_len=22, kv_len=30)
  pattern = patterns.sample_attention(q, k, block_q=4, block_k=8, sample_every=3,
                                      alpha=0.7, local_blocks=0,
                                      is_causal=is_causal)
  columns = _numpy_sample_attention(q, k, block_q=4, block_k=8, r=3, alpha=0.7,
                                    is_causal=is_causal)
  reachable = np.ones((6, 4), bool)
  if is_causal:
    reachable = _modes(patterns.causal(22, 30, block_q=4, block_k=8)) == NM
  want = np.where(columns[:, :, None, :] & reachable, NM, SKIP)
  np.testing.assert_array_equal(pattern.modes, want)
  with_band = patterns.sample_attention(q, k, block_q=4, block_k=8, sample_every=3,
                                        alpha=0.7, local_blocks=1,
                                        is_causal=is_causal, mode=DENSE)
  band = _modes(patterns.local_band(22, 30, block_q=4, block_k=8, width=1))
  np.testing.assert_array_equal(with_band.modes,
                                np.where((band == DENSE) & reachable, DENSE, want * 2))


def test_sample_attention_chooses_the_dominant_block(rng):
  q, k = _dominant_key_block(rng)
  pattern = patterns.sample_attention(q, k, block_q=8, block_k=8, sample_every=4,
                                      alpha=0.5, local_blocks=0)
  want = np.zeros((4, 3, 4), np.int8)
  want[:2, :, 3] = want[2:, :, 1] = NM
  np.testing.assert_array_equal(pattern.modes[0], want)


ADAPTIVE = {
    "topk": lambda q, k: patterns.topk_blocks(q, k, block_q=8, block_k=8,
                                              density=0.5, is_causal=True),
    "sample": lambda q, k: patterns.sample_attention(
        q, k, block_q=8, block_k=8, sample_every=2, alpha=0.6, is_causal=True),
}


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_adaptive_patterns_under_jit_vmap_grad(rng, name):
  build = ADAPTIVE[name]
  q, k = _random_qk(rng, batch=2, q_len=16, kv_len=24, heads=2, kv_heads=1)
  v = jnp.asarray(rng.standard_normal(k.shape), jnp.float32)
  eager = build(q, k)
  np.testing.assert_array_equal(jax.jit(build)(q, k).modes, eager.modes)
  np.testing.assert_array_equal(jax.jit(jax.vmap(build))(q, k).modes, eager.modes)

  def loss(q, k, v, pattern=None):
    pattern = build(q, k) if pattern is None else pattern
    out = reference.nm_attention_reference(q, k, v, is_causal=True,
                                           block_pattern=pattern)
    return jnp.sum(out ** 2)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  # The pattern carries no gradient: the same as with it held constant.
  want = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v, eager)
  for got, expected in zip(grads, want):
    assert np.all(np.isfinite(np.asarray(got))) and np.any(np.asarray(got) != 0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_q,block_k", [(16, 16), (16, 8), (8, 24)])
def test_autoregressive_topk_reads_only_earlier_positions(rng, block_q, block_k):
  """Query block i's choice is the same whatever q and k hold from its first
  position on (block means would read them: the plain causal choice
  changes); blocks reaching the block's own positions are kept."""
  q, k = _random_qk(rng, q_len=96, kv_len=96)
  choose = lambda q, k, **kw: np.asarray(patterns.topk_blocks(
      q, k, block_q=block_q, block_k=block_k, k=3, local_blocks=0,
      sink_blocks=1, is_causal=True, **kw).modes)
  modes = choose(q, k, autoregressive=True)
  nq = modes.shape[2]
  leaky = 0
  for i in range(1, nq):
    start = i * block_q
    later_q, later_k = _random_qk(rng, q_len=96 - start - 1, kv_len=96 - start)
    q2 = q.at[:, start + 1:].set(later_q)
    k2 = k.at[:, start:].set(later_k)
    np.testing.assert_array_equal(choose(q2, k2, autoregressive=True)[:, :, i],
                                  modes[:, :, i])
    leaky += np.any(choose(q2, k2)[:, :, i] != choose(q, k)[:, :, i])
    own = np.arange(1, modes.shape[3] + 1) * block_k > start
    reach = np.arange(modes.shape[3]) * block_k < start + block_q
    assert np.all(modes[:, :, i, own & reach] != SKIP)
    kept = (modes[:, :, i] != SKIP).sum(-1)
    always = (own | (np.arange(own.size) < 1)) & reach  # own blocks and the sink
    assert np.all(kept == max(min(3, reach.sum()), always.sum()))
  assert leaky  # the check can fail: block means do read later positions


@pytest.mark.parametrize("name,kwargs,match", [
    ("topk", dict(k=None), "exactly one of k and density"),
    ("topk", dict(k=2, density=0.5), "exactly one of k and density"),
    ("topk", dict(k=0), "k must be"),
    ("topk", dict(k=None, density=0.0), "density"),
    ("topk", dict(k=None, density=1.5), "density"),
    ("topk", dict(sink_blocks=-1), "sink_blocks"),
    ("topk", dict(local_blocks=-1), "local_blocks"),
    ("topk", dict(is_causal=1), "is_causal"),
    ("topk", dict(mode=SKIP), "mode"),
    ("topk", dict(autoregressive=True), "needs is_causal=True; got is_causal=False"),
    ("topk", dict(autoregressive=1, is_causal=True), "autoregressive must be a bool"),
    ("topk", dict(block_k=0), "block_k"),
    ("sample", dict(alpha=0.0), "alpha"),
    ("sample", dict(alpha=1.5), "alpha"),
    ("sample", dict(sample_every=0), "sample_every"),
    ("sample", dict(scale="x"), "scale"),
    ("sample", dict(mode=4), "mode"),
])
def test_adaptive_argument_errors(rng, name, kwargs, match):
  q, k = _random_qk(rng, q_len=8, kv_len=8)
  fn = dict(topk=patterns.topk_blocks, sample=patterns.sample_attention)[name]
  base = dict(block_q=4, block_k=4) | (dict(k=1) if name == "topk" else {})
  with pytest.raises(ValueError, match=match):
    fn(q, k, **(base | kwargs))


@pytest.mark.parametrize("query_shape,key_shape,dtype,match", [
    ((8, 4), (8, 4), jnp.float32, "query must have rank 4"),
    ((1, 8, 4, 8), (8, 2, 8), jnp.float32, "key must have the rank"),
    ((1, 8, 4, 8), (1, 8, 3, 8), jnp.float32, "heads % kv_heads"),
    ((1, 8, 4, 8), (1, 8, 2, 4), jnp.float32, "head_dim"),
    ((1, 8, 4, 8), (1, 8, 2, 8), jnp.int32, "query must be a float array"),
])
def test_adaptive_input_errors(query_shape, key_shape, dtype, match):
  q, k = jnp.ones(query_shape, dtype), jnp.ones(key_shape, jnp.float32)
  for fn in (lambda q, k: patterns.topk_blocks(q, k, block_q=4, block_k=4, k=1),
             lambda q, k: patterns.sample_attention(q, k, block_q=4, block_k=4)):
    with pytest.raises(ValueError, match=match):
      fn(q, k)
