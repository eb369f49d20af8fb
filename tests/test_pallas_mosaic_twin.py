"""CPU checks of the Hopper kernel's register code against its numpy twin.

The kernel runs `tile_select` with `MlirOps`; here the same functions run with
`NumpyOps` on all 128 threads of a warpgroup at once, and the results are
decoded with `sparse_fragments.decode_sparse_a`, the numpy model of how the
PTX ISA says `wgmma.mma_async.sp` reads its sparse operand.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from nmattn import masking
from pallas_kernels.mosaic_gpu import sparse_fragments as sf
from pallas_kernels.mosaic_gpu import tile_select as ts

OPS = sf.NumpyOps()


def _thread_lists(regs):
  """`[128, 2, L]` -> vals[r][c], each a `[128]` per-thread vector."""
  return [[regs[:, r, c] for c in range(regs.shape[2])] for r in range(2)]


def _from_lists(vals):
  return np.stack([np.stack(row, axis=1) for row in vals], axis=1)


def _scores(rng, cols, *, ties=0.0, neg_inf=0.0, nan=0.0):
  """(raw q.k, scores after masking): -inf (masked) never reaches raw."""
  s = rng.standard_normal((64, cols)).astype(np.float32)
  if ties:  # coarse values: many exact ties inside groups
    s = np.round(s * 2) / 2
  s[rng.random(s.shape) < nan] = np.nan
  raw = s.copy()
  s[rng.random(s.shape) < neg_inf] = -np.inf
  return raw, s


def _poison(raw, width):
  regs = sf.to_thread_registers(sf.permute_keys(raw, width, axis=1))
  return ts.nan_poison(OPS, _thread_lists(regs))


@pytest.mark.parametrize("width", [0, 4, 8, 16])
def test_key_order_makes_runs_of_width_keys_per_thread(width):
  cols = max(8, 4 * width) * 2
  order = sf.permute_keys(np.arange(cols), width, axis=0)
  assert sorted(order) == list(range(cols))
  regs = sf.to_thread_registers(np.broadcast_to(order, (64, cols)))
  for tid in range(sf.WARPGROUP):
    _, _, t = sf.thread_coords(tid)
    for c in range(regs.shape[2]):
      want = sf.thread_key_offset(width) * t + sf.static_key(width, c)
      assert regs[tid, 0, c] == want == regs[tid, 1, c]


def test_thread_registers_round_trip(rng):
  mat = rng.standard_normal((64, 48)).astype(np.float32)
  regs = sf.to_thread_registers(mat)
  np.testing.assert_array_equal(sf.from_thread_registers(regs), mat)
  # Thread 37 = warp 1, lane 5: g = 1, t = 1 -> rows 17 and 25, cols 2, 3, 10, ...
  assert regs[37, 0, 0] == mat[17, 2] and regs[37, 1, 3] == mat[25, 11]


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("selector", [0, 1])
def test_sparse_operand_encode_decode_round_trip(rng, selector, descending):
  dense = rng.standard_normal((64, 32)).astype(ml_dtypes.bfloat16)
  keep = np.zeros((64, 32), bool)
  for row in range(64):
    for chunk in range(8):
      kept = rng.choice(4, size=rng.integers(0, 3), replace=False)
      keep[row, 4 * chunk + kept] = True
  dense = np.where(keep, dense, 0).astype(ml_dtypes.bfloat16)
  a_regs, meta = sf.encode_sparse_a(dense, selector, descending=descending)
  other = np.arange(sf.WARPGROUP) % 4 // 2 != selector
  assert not meta[other].any(), "only the selected quad threads carry metadata"
  decoded = sf.decode_sparse_a(a_regs, meta, selector, ml_dtypes.bfloat16)
  np.testing.assert_array_equal(decoded.view(np.uint16), dense.view(np.uint16))


def test_sparse_operand_orders_and_invalid_nibbles():
  dense = np.zeros((64, 32), ml_dtypes.bfloat16)
  dense[0, 1], dense[0, 3] = 2.0, 5.0  # thread 0's chunk 0, positions 1 and 3
  up, meta_up = sf.encode_sparse_a(dense, 0)
  down, meta_down = sf.encode_sparse_a(dense, 0, descending=True)
  assert meta_up[0] & 0xF == sf.nibble(1, 3) and meta_down[0] & 0xF == sf.nibble(3, 1)
  assert up[0, 0] == (down[0, 0] >> 16 | (down[0, 0] & 0xFFFF) << 16)
  bad = meta_up.copy()
  bad[0] = (bad[0] & ~np.uint32(0xF)) | np.uint32(sf.nibble(2, 2))
  with pytest.raises(ValueError, match="invalid metadata nibble 0xa"):
    sf.decode_sparse_a(up, bad, 0, ml_dtypes.bfloat16)


def test_sparse_operand_rejects_three_in_a_chunk():
  dense = np.zeros((64, 32), ml_dtypes.bfloat16)
  dense[5, 8:11] = 1
  with pytest.raises(ValueError, match="row 5 chunk 2"):
    sf.encode_sparse_a(dense, 0)


def _thread_tile(mat_nat):
  """A natural-order `[64, K]` tile as `Q K_permuted^T` leaves it in registers."""
  return _thread_lists(sf.to_thread_registers(sf.permute_keys(mat_nat, 4, axis=1)))


def _kernel_sparse_tile(s_nat, n, m):
  """Runs the kernel's selection+compression on a natural-order score tile.

  Returns the dense `[64, K]` matrix (natural key order) that the sparse
  instructions would multiply, decoded per the PTX ISA.
  """
  t = OPS.thread_id() % 4
  comp, words, _ = ts.select_compress(OPS, _thread_tile(s_nat), n, m, t)
  return _decode_compressed(comp, words, s_nat.shape[1])


def _decode_compressed(comp, words, keys):
  """The dense natural-order `[64, keys]` matrix behind a compressed tile.

  The float32 values travel through the 16-bit operand as 1-based codes
  into a value table.
  """
  # The kernel writes each chunk's positions in ascending order.
  nibbles = np.stack([(np.asarray(w).view(np.uint32) >> (4 * c)) & 0xF
                      for w in words for c in range(8)])
  assert ((nibbles & 3) < (nibbles >> 2)).all()
  comp_regs = _from_lists(comp)  # [128, 2, K // 8]
  table = comp_regs.reshape(-1)
  codes = np.arange(1, table.size + 1, dtype=np.uint32).reshape(comp_regs.shape)
  dense = np.zeros((64, keys), np.float32)
  for kb in range(keys // 32):
    a_regs = np.zeros((sf.WARPGROUP, 4), np.uint32)
    for h in range(2):
      for r in range(2):
        j = 2 * kb + h  # 16-key block: register j of the compressed array
        a_regs[:, 2 * h + r] = codes[:, r, 2 * j] | (codes[:, r, 2 * j + 1] << 16)
    block = sf.decode_sparse_a(a_regs, words[kb // 2], kb % 2, np.uint16)
    block = block.astype(np.int64)
    dense[:, 32 * kb:32 * kb + 32] = np.where(block > 0, table[block - 1], 0.0)
  return dense


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 2)])
@pytest.mark.parametrize("kind", ["normal", "ties", "masked", "nan"])
def test_kernel_compression_matches_reference_selection(rng, n, m, kind):
  raw, s = _scores(rng, 128, ties=kind == "ties",
                   neg_inf=0.3 * (kind == "masked"), nan=0.02 * (kind == "nan"))
  got = _kernel_sparse_tile(s, n, m)
  keep = np.asarray(masking.nm_mask(s, n, m))
  want = np.where(keep, s, 0.0)
  # The compressed operand holds -inf where a chunk has fewer than two kept
  # scores; exp(-inf) = 0 in the kernel, so compare with -inf as 0.
  got = np.where(got == -np.inf, 0.0, got)
  nan_rows = np.isnan(s).any(axis=1)
  np.testing.assert_array_equal(got[~nan_rows], want[~nan_rows])
  # NaN compares false in the kernel's selection, but its min/max carry every
  # NaN into a kept score, so the row's output is NaN as the reference's.
  assert np.all(np.isnan(got[nan_rows]).any(axis=1))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 2)])
@pytest.mark.parametrize("kind", ["normal", "ties", "masked"])
def test_backward_ds_lands_in_the_compressed_form(rng, n, m, kind):
  """`dS = P * (dP - delta)` from the compressed scores and `gather_kept(dP)`
  decodes to the reference's dS: kept entries, zero elsewhere."""
  _, s = _scores(rng, 128, ties=kind == "ties", neg_inf=0.3 * (kind == "masked"))
  dp = rng.standard_normal(s.shape).astype(np.float32)
  delta = np.float32(0.3)
  t = OPS.thread_id() % 4
  comp, words, nibbles = ts.select_compress(OPS, _thread_tile(s), n, m, t)
  dp_comp = ts.gather_kept(OPS, _thread_tile(dp), nibbles)
  with np.errstate(invalid="ignore"):
    ds = [[np.exp(x) * (y - delta) for x, y in zip(xr, yr)]
          for xr, yr in zip(comp, dp_comp)]
  got = _decode_compressed(ds, words, s.shape[1])
  keep = np.asarray(masking.nm_mask(s, n, m))
  with np.errstate(invalid="ignore"):
    want = np.where(keep, np.exp(s) * (dp - delta), 0.0)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_gather_kept_reads_every_position_pair():
  """Each valid nibble (i0 < i1) picks exactly positions i0 and i1."""
  vals = [[OPS.f32(10 * r + c) for c in range(4)] for r in range(2)]
  for i0 in range(3):
    for i1 in range(i0 + 1, 4):
      nib = OPS.i32(sf.nibble(i0, i1))
      got = ts.gather_kept(OPS, vals, [[nib], [nib]])
      for r in range(2):
        assert (got[r][0] == 10 * r + i0).all() and (got[r][1] == 10 * r + i1).all()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 2)])
def test_kernel_compression_is_exact_on_every_small_chunk(n, m):
  """All 5^4 chunks over {-inf, -1, 0, 1, 2}: ties and -inf in every position."""
  values = np.array([-np.inf, -1.0, 0.0, 1.0, 2.0], np.float32)
  chunks = np.stack(np.meshgrid(*[values] * 4, indexing="ij"), -1).reshape(-1, 4)
  # 625 chunks fit one 64x128 tile (2048 groups); repeat them to fill it.
  s = np.resize(chunks, (64 * 32, 4)).reshape(64, 128)
  got = _kernel_sparse_tile(s, n, m)
  want = np.where(np.asarray(masking.nm_mask(s, n, m)), s, 0.0)
  np.testing.assert_array_equal(np.where(got == -np.inf, 0.0, got), want)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 2)])
def test_kernel_compression_keeps_a_nan_in_any_position(n, m):
  """One NaN in one chunk, in each of its four places, among finite scores."""
  for pos in range(4):
    s = np.random.default_rng(pos).standard_normal((64, 128)).astype(np.float32)
    s[7, 40 + pos] = np.nan
    got = _kernel_sparse_tile(s, n, m)
    assert np.isnan(got[7]).any()
    assert not np.isnan(np.delete(got, 7, axis=0)).any()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 2), (3, 8), (5, 16), (1, 8), (3, 4)])
@pytest.mark.parametrize("kind", ["normal", "ties", "masked"])
def test_kernel_dense_selection_matches_reference(rng, n, m, kind):
  width = max(4, m)
  raw, s = _scores(rng, 4 * width * 2, ties=kind == "ties",
                   neg_inf=0.3 * (kind == "masked"))
  acc = sf.permute_keys(s, width, axis=1)
  vals = _thread_lists(sf.to_thread_registers(acc))
  selected = ts.add_poison(OPS, ts.select_dense(OPS, vals, n, m),
                          _poison(raw, width))
  out = sf.from_thread_registers(_from_lists(selected))
  order = sf.permute_keys(np.arange(s.shape[1]), width, axis=0)
  got = np.empty_like(out)
  got[:, order] = out
  keep = np.asarray(masking.nm_mask(s, n, m))
  np.testing.assert_array_equal(got, np.where(keep, s, -np.inf))


@pytest.mark.parametrize("width", [0, 4, 8])
@pytest.mark.parametrize("causal,window,bounded", [
    (True, None, False), (False, (13, 5), False), (False, None, True),
    (True, (7, 0), True)])
def test_kernel_masks_match_validity_mask(rng, width, causal, window, bounded):
  keys = max(8, 4 * width) * 4
  q0, k0 = int(rng.integers(0, 200)), int(rng.integers(0, 50)) * 4
  kv_valid = k0 + int(rng.integers(0, keys))
  s = rng.standard_normal((64, keys)).astype(np.float32)
  acc = sf.permute_keys(s, width, axis=1)
  vals = _thread_lists(sf.to_thread_registers(acc))
  tid = OPS.thread_id()
  warp, g, t = sf.thread_coords(tid)
  thread_key = k0 + sf.thread_key_offset(width) * t
  row0 = q0 + 16 * warp + g
  mask = ts.MaskSpec(causal=causal, window=window, kv_bound=bounded)
  out = ts.apply_masks(OPS, vals, mask, width, (row0 - thread_key).astype(np.int32),
                       (kv_valid - thread_key).astype(np.int32))
  out = sf.from_thread_registers(_from_lists(out))
  order = sf.permute_keys(np.arange(keys), width, axis=0)
  got = np.empty_like(out)
  got[:, order] = out
  valid = masking.validity_mask(
      q0 + np.arange(64), k0 + np.arange(keys), is_causal=causal, window=window,
      kv_len=kv_valid if bounded else None)
  valid = np.ones((64, keys), bool) if valid is None else np.asarray(valid)[0, 0]
  np.testing.assert_array_equal(got, np.where(valid, s, -np.inf))


def test_metadata_gather_delivers_each_word_to_its_thread(rng):
  # partial[d] of thread t holds t's bits (8 of them) of the word thread d needs.
  t = OPS.thread_id() % 4
  nibbles = rng.integers(0, 16, (sf.WARPGROUP, 4, 2)).astype(np.int32)
  partial = [sum((nibbles[:, d, r] << sf.metadata_bit(t, r)) for r in range(2))
             .astype(np.int32) for d in range(4)]
  word = sf.gather_metadata(OPS, partial, t)
  for tid in range(sf.WARPGROUP):
    quad = 4 * (tid // 4)
    want = 0
    for src in range(4):
      for r in range(2):
        want |= int(nibbles[quad + src, tid % 4, r]) << sf.metadata_bit(src, r)
    assert int(word[tid]) & 0xFFFFFFFF == want


def test_sparse_wgmma_ptx_operands():
  asm, constraints = sf.sparse_wgmma_ptx(128, "bfloat16", 1, True)
  assert asm.startswith("wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.bf16.bf16 ")
  assert asm.endswith("$132, $133, 1, 1, 1, 1, 1;")
  parts = constraints.split(",")
  assert len(parts) == 64 + 64 + 4 + 2 and parts[-2:] == ["l", "r"]
  assert "{$128,$129,$130,$131}" in asm
  with pytest.raises(ValueError, match="selector"):
    sf.sparse_wgmma_ptx(64, "float16", 2, True)
  with pytest.raises(ValueError, match="dtype"):
    sf.sparse_wgmma_ptx(64, "float32", 0, True)
