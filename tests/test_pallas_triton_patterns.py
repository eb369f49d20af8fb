"""Block patterns on the "pallas_triton" backend, on the CPU.

The tile lists (`tile_plan.pattern_tiles`) against brute force over random
modes and positional masks; the kernels in Pallas interpret mode against the
reference, forward and gradients, with several tiles per axis and pattern
blocks larger than the kernel tiles; the kernel's own keep-mask; the
lowering of the compiled (per-segment) path for CUDA; and which pattern
blocks the kernels take. GPU tests at real sizes are in
`test_pallas_triton_gpu.py`.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nmattn
from attention_test_base import check_against_reference, random_inputs
from nmattn import reference
from nmattn._validation import canonicalize
from nmattn.attention import select_backend
from pallas_kernels import tile_plan
from pallas_kernels import triton as nm_triton
from pallas_kernels.triton import _common

TRITON = nmattn.backends.PallasTriton()


def _modes(rng, shape):
  return jnp.asarray(rng.integers(0, 3, shape), jnp.int8)


def _positional_validity(spec, q_limit, kv_limit, t_pad, s_pad):
  qp, kp = np.arange(t_pad)[:, None], np.arange(s_pad)[None, :]
  valid = (qp < q_limit) & (kp < kv_limit)
  if spec.is_causal:
    valid &= kp <= qp
  if spec.window is not None:
    valid &= (kp >= qp - spec.window[0]) & (kp <= qp + spec.window[1])
  return valid


@pytest.mark.parametrize("kwargs", [
    dict(n=2, m=4),
    dict(n=2, m=4, is_causal=True, lengths=True),
    dict(n=4, m=4, local_window_size=(40, 10)),
])
@pytest.mark.parametrize("transposed", [False, True])
def test_pattern_tiles_match_brute_force(rng, kwargs, transposed):
  """Every tile with a valid pair in an NM/DENSE block is listed once, in its
  segment (dense by mode or n == m; full only where every pair is valid),
  ascending within the segment; the rest is SKIPPED."""
  kwargs = dict(kwargs)
  batch, q_len, kv_len, heads = 3, 90, 150, 2
  lengths = kwargs.pop("lengths", False)
  q, k, v = random_inputs(rng, batch=batch, q_len=q_len, kv_len=kv_len,
                          heads=heads, kv_heads=heads, head_dim=16)
  q_lengths = jnp.asarray(rng.integers(1, q_len + 1, (batch,)), jnp.int32)
  kv_lengths = jnp.asarray(rng.integers(0, kv_len + 1, (batch,)), jnp.int32)
  if lengths:
    kwargs.update(query_seq_lengths=q_lengths, key_value_seq_lengths=kv_lengths)
  block_q, block_k, tile_q, tile_k = 32, 64, 16, 32
  # One extra mode value (3) that must act as SKIP, as traced modes do.
  modes = jnp.asarray(rng.integers(0, 4, (1, heads, 3, 3)), jnp.int8)
  call = canonicalize(q, k, v, block_pattern=nmattn.BlockPattern(
      np.asarray(modes).clip(0, 2).astype(np.int8), block_q, block_k),
                      **kwargs)[0]
  spec = call.spec
  t_pad, s_pad = 96, 160
  rows, cols = (s_pad // tile_k, t_pad // tile_q) if transposed else (
      t_pad // tile_q, s_pad // tile_k)
  got = tile_plan.pattern_tiles(
      spec, modes, tile_k if transposed else tile_q,
      tile_q if transposed else tile_k, rows, cols,
      call.q_lengths, call.kv_lengths, transposed=transposed)
  assert got.tiles.shape == ((batch if lengths else 1), heads, rows, cols)
  assert got.bounds.shape[-1] == tile_plan.BOUNDS_SIZE
  for b in range(got.tiles.shape[0]):
    q_limit = int(q_lengths[b]) if lengths else q_len
    kv_limit = int(kv_lengths[b]) if lengths else kv_len
    valid = _positional_validity(spec, q_limit, kv_limit, t_pad, s_pad)
    if transposed:
      valid = valid.T
    tile_rows, tile_cols = (tile_k, tile_q) if transposed else (tile_q, tile_k)
    blocks = valid.reshape(rows, tile_rows, cols, tile_cols)
    any_valid, all_valid = blocks.any(axis=(1, 3)), blocks.all(axis=(1, 3))
    for h in range(heads):
      for r in range(rows):
        tiles = np.asarray(got.tiles[b, h, r])
        bounds = np.asarray(got.bounds[b, h, r])
        assert sorted(tiles) == list(range(cols))
        assert bounds[0] == 0 and list(bounds[tile_plan.SKIPPED + 1:]) == [cols] * 3
        for c in range(cols):
          qt, kt = (c, r) if transposed else (r, c)
          mode = int(modes[0, h, qt * tile_q // block_q, kt * tile_k // block_k])
          visit = any_valid[r, c] and mode in (nmattn.NM, nmattn.DENSE)
          where = int(np.flatnonzero(tiles == c)[0])
          segment = int(np.searchsorted(bounds, where, side="right")) - 1
          if not visit:
            assert segment == tile_plan.SKIPPED, (b, h, r, c)
            continue
          dense = mode == nmattn.DENSE or spec.is_dense
          assert segment in ((tile_plan.DENSE_PARTIAL, tile_plan.DENSE_FULL)
                             if dense else
                             (tile_plan.NM_PARTIAL, tile_plan.NM_FULL))
          if segment in (tile_plan.NM_FULL, tile_plan.DENSE_FULL):
            assert all_valid[r, c], (b, h, r, c)
        for s in range(tile_plan.SKIPPED):
          part = tiles[bounds[s]:bounds[s + 1]]
          assert list(part) == sorted(part)


# name -> (nm_attention kwargs builder(rng, batch, t, s), modes shape).
CASES = {
    "causal_gqa_2of4_bias": (lambda r, b, t, s: dict(
        n=2, m=4, is_causal=True,
        bias=jnp.asarray(r.standard_normal((1, 4, t, s)), jnp.float32)),
                             (2, 4, 3, 3)),
    "lengths_window_mask_1of2": (lambda r, b, t, s: dict(
        n=1, m=2, local_window_size=(70, 20),
        mask=jnp.asarray(r.random((b, 1, t, s)) < 0.8),
        query_seq_lengths=jnp.asarray([t, t // 2], jnp.int32),
        key_value_seq_lengths=jnp.asarray([s - 7, s // 3], jnp.int32)),
                                 (1, 4, 3, 3)),
    "block_sparse_key_bias": (lambda r, b, t, s: dict(
        n=4, m=4,
        bias=jnp.asarray(r.standard_normal((b, 1, 1, s)), jnp.float32)),
                              (2, 1, 3, 3)),
}


@pytest.mark.parametrize("name", CASES)
def test_triton_pattern_matches_reference(rng, name):
  """Forward and gradients (dbias too) in interpret mode; blocks 32 x 64
  hold several dK/dV query tiles (SMALL tiles) and whole N:M lanes."""
  batch, q_len, kv_len = 2, 70, 150
  q, k, v = random_inputs(rng, batch=batch, q_len=q_len, kv_len=kv_len,
                          heads=4, kv_heads=2, head_dim=16)
  build, modes_shape = CASES[name]
  kwargs = build(rng, batch, q_len, kv_len)
  pattern = nmattn.BlockPattern(_modes(rng, modes_shape), block_q=32, block_k=64)
  bias = kwargs.pop("bias", None)
  cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  backend = nmattn.backends.PallasTriton(config=nm_triton.TuningConfig(
      block_q=32, block_k=64, block_q_dq=16, block_k_dq=64, block_q_dkv=16,
      block_k_dkv=64))
  check_against_reference(backend, q, k, v, bias, cotangent,
                          block_pattern=pattern, **kwargs)


def test_kernel_selection_with_pattern_matches_reference(rng):
  """The forward's keep-mask: skipped tiles cleared, dense tiles all valid
  scores, N:M tiles the reference's selection (ties aside)."""
  q, k, v = random_inputs(rng, batch=1, q_len=64, kv_len=128, heads=2,
                          kv_heads=2, head_dim=16)
  pattern = nmattn.BlockPattern(_modes(rng, (1, 2, 2, 2)), block_q=32,
                                block_k=64)
  def call_of(q, k, v):
    return canonicalize(q, k, v, is_causal=True, n=2, m=4,
                        block_pattern=pattern)[0]

  keep = jax.jit(lambda q, k, v: nm_triton.nm_flash_attention_selection(
      call_of(q, k, v), interpret=True))(q, k, v)
  call = call_of(q, k, v)
  want = reference.call_keep(call, reference.call_scores(call))
  assert keep.shape == want.shape == (1, 2, 64, 128)
  differs = np.asarray(keep) != np.asarray(want)
  assert differs.mean() < 0.005, differs.mean()
  skipped = np.repeat(np.repeat(np.asarray(pattern.modes) == nmattn.SKIP, 32, 2),
                      64, 3)
  assert not np.asarray(keep)[skipped].any()


def test_pattern_lowers_through_triton_for_cuda():
  """The compiled path (one loop per segment, static masks and selection)
  lowers for CUDA without a GPU: forward, dQ and dK/dV."""
  q = jax.ShapeDtypeStruct((2, 300, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 300, 2, 128), jnp.bfloat16)
  modes = jax.ShapeDtypeStruct((2, 4, 3, 3), jnp.int8)
  lengths = jax.ShapeDtypeStruct((2,), jnp.int32)

  def loss(q, k, v, modes, kv_lengths):
    call = canonicalize(q, k, v, key_value_seq_lengths=kv_lengths,
                        is_causal=True, n=2, m=4,
                        block_pattern=nmattn.BlockPattern(modes, 128, 128))[0]
    out = nm_triton.nm_flash_attention(call, interpret=False)
    return jnp.sum(out.astype(jnp.float32))

  traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(
      q, kv, kv, modes, lengths)
  try:
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
  except RuntimeError as e:  # jax >= 0.11 needs a GPU (or an abstract one).
    pytest.skip(f"this jax cannot lower for CUDA without a GPU: {e}")
  assert text.count("__gpu$xla.gpu.triton") == 3


@pytest.mark.parametrize("block_q,block_k,n,m,ok", [
    (128, 128, 2, 4, True), (64, 64, 2, 4, True), (96, 192, 2, 4, True),
    (96, 96, 2, 4, False),
    (24, 64, 2, 4, False), (32, 32, 4, 4, True), (32, 48, 4, 4, True),
    (32, 8, 4, 4, False)])
def test_which_pattern_blocks_the_kernels_take(rng, block_q, block_k, n, m, ok):
  """Kernel tiles must divide the blocks; otherwise an explicit request
  raises naming block_pattern, and `None` falls back to xla."""
  q, k, v = random_inputs(rng, batch=1, q_len=64, kv_len=64, heads=2,
                          kv_heads=2, head_dim=16)
  pattern = nmattn.BlockPattern(np.ones((1, 1), np.int8), block_q, block_k)
  spec = canonicalize(q, k, v, n=n, m=m, block_pattern=pattern)[0].spec
  reason = TRITON.unsupported_reason(spec)
  assert (reason is None) == ok, reason
  if not ok:
    assert "block_pattern.block_" in reason
    with pytest.raises(nmattn.UnsupportedCallError, match="block_pattern"):
      nmattn.nm_attention(q, k, v, n=n, m=m, block_pattern=pattern,
                          implementation="pallas_triton")
  # On a CPU the interpret-mode kernels are never picked automatically.
  assert select_backend(spec).name == "xla"


def test_patterned_calls_take_the_pattern_tuning(rng):
  """At head_dim 128 a pattern's forward walks key tiles of 64 with 4 warps
  (measured faster, `default_tuning`); calls without a pattern keep 128."""
  q, k, v = random_inputs(rng, batch=1, q_len=512, kv_len=512, heads=2,
                          kv_heads=2, head_dim=128, dtype=jnp.bfloat16)
  pattern = nmattn.BlockPattern(np.ones((1, 1), np.int8), 128, 128)
  for block_pattern, blocks, warps in ((pattern, (128, 64), 4),
                                       (None, (128, 128), 8)):
    spec = canonicalize(q, k, v, n=2, m=4, block_pattern=block_pattern)[0].spec
    plan = _common.make_plan(spec)
    assert plan.forward_blocks == blocks and plan.tuning.num_warps == warps
