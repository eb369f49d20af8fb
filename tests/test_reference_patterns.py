"""The reference with block patterns: a naive loop, block-sparse dense, finite differences."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from attention_test_base import random_inputs, rel_err
from nmattn import patterns, reference
from nmattn._validation import canonicalize
from nmattn.patterns import DENSE, NM, SKIP, BlockPattern


def naive_pattern_attention(q, k, v, modes, block_q, block_k, *, bias=None,
                            valid=None, n, m):
  """Row-by-row float64 numpy attention with a mode per block, groups sorted by hand."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  full = (batch, heads, q_len, kv_len)
  modes = np.broadcast_to(modes, (batch, heads, -(-q_len // block_q),
                                  -(-kv_len // block_k)))
  out = np.zeros_like(q)
  for b in range(batch):
    for h in range(heads):
      kh = h // (heads // kv_heads)
      for i in range(q_len):
        s = dim ** -0.5 * k[b, :, kh] @ q[b, i, h]
        if bias is not None:
          s = s + np.broadcast_to(bias, full)[b, h, i]
        if valid is not None:
          s = np.where(np.broadcast_to(valid, full)[b, h, i], s, -np.inf)
        keep = np.zeros(kv_len, bool)
        for start in range(0, kv_len, m):
          mode = modes[b, h, i // block_q, start // block_k]
          group = s[start:start + m]
          if mode == DENSE:
            keep[start:start + m] = np.isfinite(group)
          elif mode == NM:
            # Python's sort is stable: descending score, then ascending index.
            for j in sorted(range(len(group)), key=lambda j: -group[j])[:n]:
              keep[start + j] = np.isfinite(group[j])
        if keep.any():
          w = np.where(keep, np.exp(s - s[keep].max()), 0.0)
          out[b, i, h] = (w / w.sum()) @ v[b, :, kh]
  return out


def _random_modes(rng, shape):
  return rng.integers(0, 3, shape).astype(np.int8)


@pytest.mark.parametrize("n,m,is_causal,modes_shape", [
    (2, 4, False, (2, 4, 4, 3)),
    (1, 2, True, (2, 4, 4, 3)),
    (3, 8, True, (1, 4, 1, 3)),
], ids=["2of4", "1of2_causal", "3of8_causal_broadcast"])
def test_matches_naive_loop(rng, n, m, is_causal, modes_shape):
  # Ragged: 13 queries in blocks of 4, 22 keys in blocks of 8; GQA; bias; mask.
  q, k, v = random_inputs(rng, batch=2, q_len=13, kv_len=22, heads=4, kv_heads=2,
                          head_dim=8)
  bias = rng.standard_normal((2, 1, 13, 22)).astype(np.float32)
  mask = rng.random((1, 4, 13, 22)) < 0.85
  modes = _random_modes(rng, modes_shape)
  modes[0, 0, 0] = SKIP  # rows with no kept score
  pattern = BlockPattern(modes, 4, 8)
  with jax.numpy_rank_promotion("raise"):
    out = reference.nm_attention_reference(
        q, k, v, jnp.asarray(bias), jnp.asarray(mask), is_causal=is_causal, n=n,
        m=m, block_pattern=pattern)
  valid = mask & (np.tril(np.ones((13, 22), bool)) if is_causal else True)
  want = naive_pattern_attention(q, k, v, modes, 4, 8, bias=bias, valid=valid,
                                 n=n, m=m)
  assert rel_err(out, want) < 1e-5
  np.testing.assert_array_equal(np.asarray(out[0, :4, 0]), 0.0)


def test_weights_follow_the_modes(rng):
  q, k, _ = random_inputs(rng, batch=1, q_len=8, kv_len=24, heads=2, kv_heads=1,
                          head_dim=8)
  modes = np.array([[[SKIP, NM, DENSE], [DENSE, DENSE, SKIP]],
                    [[NM, NM, NM], [SKIP, SKIP, SKIP]]], np.int8)  # [H, nq, nk]
  pattern = BlockPattern(modes, 4, 8)
  w = np.asarray(reference.nm_attention_weights(q, k, block_pattern=pattern, n=1, m=4))
  blocks = (w > 0).reshape(1, 2, 2, 4, 3, 8)        # [B, H, nq, rows, nk, keys]
  kept_per_group = blocks.reshape(1, 2, 2, 4, 3, 2, 4).sum(-1)
  for h in range(2):
    for i in range(2):
      for j in range(3):
        want = {SKIP: 0, NM: 1, DENSE: 4}[modes[h, i, j]]
        assert np.all(kept_per_group[0, h, i, :, j] == want)
  np.testing.assert_allclose(w[0, 0].sum(-1), 1.0, rtol=1e-6)
  assert np.all(w[0, 1, 4:] == 0.0)  # an all-SKIP query block gives zeros


def test_all_nm_pattern_is_bit_identical_to_no_pattern(rng):
  q, k, v = random_inputs(rng, batch=2, q_len=11, kv_len=20, heads=2, kv_heads=1,
                          head_dim=8)
  bias = jnp.asarray(rng.standard_normal((2, 2, 11, 20)), jnp.float32)
  kwargs = dict(is_causal=True, n=2, m=4)
  for block_q, block_k in ((4, 8), (11, 20)):
    pattern = BlockPattern(np.ones((2, 1, -(-11 // block_q), -(-20 // block_k)),
                                   np.int8), block_q, block_k)
    np.testing.assert_array_equal(
        reference.nm_attention_reference(q, k, v, bias, block_pattern=pattern,
                                         **kwargs),
        reference.nm_attention_reference(q, k, v, bias, **kwargs))
    np.testing.assert_array_equal(
        reference.nm_attention_weights(q, k, bias, block_pattern=pattern, **kwargs),
        reference.nm_attention_weights(q, k, bias, **kwargs))


def test_n_equal_m_is_block_sparse_dense_attention(rng):
  q, k, v = random_inputs(rng, batch=2, q_len=18, kv_len=28, heads=4, kv_heads=2,
                          head_dim=8)
  bias = jnp.asarray(rng.standard_normal((2, 4, 18, 28)), jnp.float32)
  modes = _random_modes(rng, (2, 4, 3, 4))
  modes[..., 0] = rng.integers(1, 3, modes.shape[:-1])  # every row keeps key 0
  pattern = BlockPattern(modes, 6, 8)
  element_mask = jnp.asarray(np.repeat(np.repeat(modes != SKIP, 6, 2), 8, 3)[
      :, :, :18, :28])

  @jax.jit
  def ours(q, k, v):
    return reference.nm_attention_reference(q, k, v, bias, is_causal=True, n=4,
                                            m=4, block_pattern=pattern)

  @jax.jit
  def dense(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, bias, element_mask, is_causal=True)

  assert rel_err(ours(q, k, v), dense(q, k, v)) < 1e-5
  cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  grads = jax.vjp(ours, q, k, v)[1](cotangent)
  want = jax.vjp(dense, q, k, v)[1](cotangent)
  for got, expected in zip(grads, want):
    assert rel_err(got, expected) < 1e-4


def _well_separated(rng, *, margin=1e-4, **shape):
  """float64 q, k, v, bias whose finite scores in each group differ by > margin."""
  for _ in range(100):
    q, k, v = random_inputs(rng, dtype=jnp.float64, **shape)
    bias = jnp.asarray(rng.standard_normal((q.shape[0], q.shape[2], q.shape[1],
                                            k.shape[1])))
    call, _ = canonicalize(q, k, v, bias, n=2, m=4)
    groups = np.asarray(reference.call_scores(call)).reshape(-1, 4)
    gaps = np.abs(groups[:, :, None] - groups[:, None, :])
    gaps[:, np.arange(4), np.arange(4)] = np.inf
    if gaps.min() > margin:
      return q, k, v, bias
  raise AssertionError("no well-separated draw in 100 tries")


def test_check_grads_float64(rng, enable_x64):
  del enable_x64
  modes = np.array([[SKIP, NM], [DENSE, NM], [NM, DENSE]], np.int8)
  pattern = BlockPattern(modes, 2, 8)
  q, k, v, bias = _well_separated(rng, batch=1, q_len=6, kv_len=16,
                                  heads=2, kv_heads=1, head_dim=4)
  fn = jax.jit(functools.partial(reference.nm_attention_reference, n=2, m=4,
                                 block_pattern=pattern))
  check_grads(fn, (q, k, v, bias), order=1, modes=["rev"], eps=1e-6)
  # No gradient reaches a score that is not kept (a SKIP block, pruned, masked).
  dbias = jax.grad(lambda b: jnp.sum(fn(q, k, v, b) ** 2))(bias)
  weights = reference.nm_attention_weights(q, k, bias, n=2, m=4, block_pattern=pattern)
  assert np.all(np.asarray(dbias)[np.asarray(weights) == 0] == 0)
  assert np.all(np.asarray(dbias)[0, :, :2, :8] == 0)  # the SKIP block


def test_unbatched_inputs_and_rank_three_modes(rng):
  q, k, v = random_inputs(rng, batch=1, q_len=8, kv_len=16, heads=2, kv_heads=1,
                          head_dim=8)
  pattern = BlockPattern(_random_modes(rng, (2, 2, 2)), 4, 8)
  out = reference.nm_attention_reference(q[0], k[0], v[0], block_pattern=pattern)
  np.testing.assert_array_equal(
      out, reference.nm_attention_reference(q, k, v, block_pattern=pattern)[0])


def test_vmap_over_examples_and_their_patterns(rng):
  q, k, v = random_inputs(rng, batch=3, q_len=8, kv_len=16, heads=2, kv_heads=1,
                          head_dim=8)
  modes = jnp.asarray(_random_modes(rng, (3, 2, 2, 2)))
  mapped = jax.vmap(lambda q, k, v, modes: reference.nm_attention_reference(
      q, k, v, block_pattern=BlockPattern(modes, 4, 8)))(q, k, v, modes)
  batched = reference.nm_attention_reference(q, k, v,
                                             block_pattern=BlockPattern(modes, 4, 8))
  assert rel_err(mapped, batched) < 1e-6


def test_traced_out_of_range_modes_act_as_skip(rng):
  q, k, v = random_inputs(rng, batch=1, q_len=8, kv_len=16, heads=2, kv_heads=1,
                          head_dim=8)
  modes = np.array([[3, NM], [DENSE, -1]], np.int8)
  run = jax.jit(lambda modes: reference.nm_attention_reference(
      q, k, v, block_pattern=BlockPattern(modes, 4, 8)))
  skipped = np.where((modes == NM) | (modes == DENSE), modes, SKIP).astype(np.int8)
  np.testing.assert_array_equal(run(jnp.asarray(modes)), run(jnp.asarray(skipped)))
  with pytest.raises(ValueError, match=r"block_pattern.modes must hold only.*\[-1, 3\]"):
    reference.nm_attention_reference(q, k, v, block_pattern=BlockPattern(modes, 4, 8))


@pytest.mark.parametrize("pattern,match", [
    ("dense", "block_pattern must be an nmattn.BlockPattern"),
    (BlockPattern(np.ones((2, 2), np.int8), 4, 6), "block_pattern.block_k"),
    (BlockPattern(np.ones((2, 2), np.int16), 4, 8), "block_pattern.modes.dtype"),
    (BlockPattern(np.ones((2, 3), np.int8), 4, 8), "block_pattern.modes.shape"),
    (BlockPattern(np.ones((3, 2, 2), np.int8), 4, 8), "block_pattern.modes.shape"),
    (BlockPattern(np.full((2, 2), 7, np.int8), 4, 8), "block_pattern.modes must hold"),
], ids=["not_a_pattern", "block_k", "int16", "blocks", "heads", "value"])
def test_bad_patterns_raise(rng, pattern, match):
  q, k, v = random_inputs(rng, batch=2, q_len=8, kv_len=16, heads=2, kv_heads=1,
                          head_dim=8)
  for fn in (lambda: reference.nm_attention_reference(q, k, v, block_pattern=pattern),
             lambda: reference.nm_attention_weights(q, k, block_pattern=pattern)):
    with pytest.raises(ValueError, match=match):
      fn()
