"""The reference against an independent naive loop, dense attention and finite differences."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import nmattn
from attention_test_base import random_inputs, rel_err
from nmattn import reference
from nmattn._validation import canonicalize


def naive_nm_attention(q, k, v, *, bias=None, valid=None, n, m, scale=None):
  """Row-by-row numpy N:M attention: sort each group, keep the top n, softmax."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  scale = dim ** -0.5 if scale is None else scale
  out = np.zeros_like(q)
  for b in range(batch):
    for h in range(heads):
      kh = h // (heads // kv_heads)
      for i in range(q_len):
        s = scale * k[b, :, kh] @ q[b, i, h]
        if bias is not None:
          s = s + np.broadcast_to(bias, (batch, heads, q_len, kv_len))[b, h, i]
        if valid is not None:
          s = np.where(np.broadcast_to(valid, (batch, heads, q_len, kv_len))[b, h, i],
                       s, -np.inf)
        keep = np.zeros(kv_len, bool)
        for start in range(0, kv_len, m):
          group = s[start:start + m]
          # Python's sort is stable: descending score, then ascending index.
          order = sorted(range(len(group)), key=lambda j: -group[j])
          for j in order[:n]:
            keep[start + j] = np.isfinite(group[j])
        if keep.any():
          w = np.where(keep, np.exp(s - s[keep].max()), 0.0)
          out[b, i, h] = (w / w.sum()) @ v[b, :, kh]
  return out


@pytest.mark.parametrize("n,m", [(2, 4), (1, 2), (3, 8), (5, 16), (1, 1)])
def test_matches_naive_loop(rng, n, m):
  q, k, v = random_inputs(rng, batch=2, q_len=9, kv_len=23, heads=4, kv_heads=2,
                          head_dim=8)
  bias = rng.standard_normal((2, 1, 9, 23)).astype(np.float32)
  valid = rng.random((1, 4, 9, 23)) < 0.8
  valid[0, 0, 3] = False  # a fully masked row
  out = reference.nm_attention_reference(
      q, k, v, jnp.asarray(bias), jnp.asarray(valid), n=n, m=m)
  want = naive_nm_attention(q, k, v, bias=bias, valid=valid, n=n, m=m)
  assert rel_err(out, want) < 1e-5
  np.testing.assert_array_equal(np.asarray(out[0, 3, 0]), 0.0)


def test_masks_match_naive_loop(rng):
  q, k, v = random_inputs(rng, batch=2, q_len=12, kv_len=14, head_dim=8)
  q_lengths, kv_lengths = np.array([12, 7]), np.array([5, 14])
  out = reference.nm_attention_reference(
      q, k, v, is_causal=True, local_window_size=(4, 1),
      query_seq_lengths=jnp.asarray(q_lengths),
      key_value_seq_lengths=jnp.asarray(kv_lengths), n=2, m=4)
  i, j = np.arange(12)[:, None], np.arange(14)[None, :]
  valid = (j <= i) & (j >= i - 4) & (j <= i + 1)
  valid = (valid[None, None]
           & (i < q_lengths[:, None, None, None])
           & (j < kv_lengths[:, None, None, None]))
  assert rel_err(out, naive_nm_attention(q, k, v, valid=valid, n=2, m=4)) < 1e-5


@pytest.mark.parametrize("kwargs", [
    dict(), dict(is_causal=True), dict(local_window_size=(5, 2)),
    dict(key_value_seq_lengths=jnp.array([30, 11], jnp.int32)),
    dict(query_seq_lengths=jnp.array([7, 20], jnp.int32)),
], ids=["plain", "causal", "window", "kv_lengths", "q_lengths"])
def test_n_equal_m_is_dense_attention(rng, kwargs):
  q, k, v = random_inputs(rng, q_len=20, kv_len=30, heads=4, kv_heads=2)
  bias = jnp.asarray(rng.standard_normal((2, 4, 20, 30)), jnp.float32)
  mask = jnp.asarray(rng.random((2, 1, 20, 30)) < 0.9).at[..., 0].set(True)
  dense = jax.nn.dot_product_attention(q, k, v, bias, mask, **kwargs)
  for n, m in ((4, 4), (1, 1), (16, 16)):
    out = reference.nm_attention_reference(q, k, v, bias, mask, n=n, m=m, **kwargs)
    assert rel_err(out, dense) < 1e-5
    out = nmattn.nm_attention(q, k, v, bias, mask, n=n, m=m, **kwargs)
    assert rel_err(out, dense) < 1e-5


def _well_separated_inputs(rng, n, m, kwargs, *, margin=1e-4, **shape):
  """Fresh random q, k, v, bias whose finite scores differ pairwise by > margin.

  Finite differences must not flip a selection, so draws repeat until no two
  finite scores of a group are closer than `margin`.
  """
  for _ in range(100):
    q, k, v = random_inputs(rng, dtype=jnp.float64, **shape)
    bias = jnp.asarray(rng.standard_normal(
        (q.shape[0], q.shape[2], q.shape[1], k.shape[1])))
    call, _ = canonicalize(q, k, v, bias, n=n, m=m, **kwargs)
    groups = np.asarray(reference.call_scores(call)).reshape(-1, m)
    finite = np.where(np.isfinite(groups), groups, np.nan)
    gaps = np.abs(finite[:, :, None] - finite[:, None, :])
    gaps[np.isnan(gaps)] = np.inf
    gaps[:, np.arange(m), np.arange(m)] = np.inf
    if gaps.min() > margin:
      return q, k, v, bias
  raise AssertionError("no well-separated draw in 100 tries")


@pytest.mark.parametrize("n,m,kwargs", [
    (2, 4, dict()), (1, 2, dict(is_causal=True)), (3, 8, dict(local_window_size=3)),
])
def test_check_grads_float64(rng, enable_x64, n, m, kwargs):
  del enable_x64
  q, k, v, bias = _well_separated_inputs(rng, n, m, kwargs, batch=1, q_len=6,
                                         kv_len=16, heads=2, kv_heads=1,
                                         head_dim=4)
  fn = functools.partial(reference.nm_attention_reference, n=n, m=m, **kwargs)
  check_grads(fn, (q, k, v, bias), order=1, modes=["rev"], eps=1e-6)


def test_float64_stays_float64(enable_x64, rng):
  del enable_x64
  q, k, v = random_inputs(rng, dtype=jnp.float64)
  assert nmattn.nm_attention(q, k, v).dtype == jnp.float64
  assert reference.nm_attention_weights(q, k).dtype == jnp.float64


def test_unbatched_inputs(rng):
  q, k, v = random_inputs(rng, batch=1)
  out = nmattn.nm_attention(q[0], k[0], v[0], is_causal=True)
  assert out.shape == q.shape[1:]
  assert rel_err(out, nmattn.nm_attention(q, k, v, is_causal=True)[0]) < 1e-6
  weights = nmattn.nm_attention_weights(q[0], k[0])
  assert weights.shape == (q.shape[2], q.shape[1], k.shape[1])


def test_weights_rows_sum_to_one_or_zero(rng):
  q, k, _ = random_inputs(rng, q_len=10, kv_len=22)
  lengths = jnp.array([22, 5], jnp.int32)
  w = np.asarray(nmattn.nm_attention_weights(q, k, key_value_seq_lengths=lengths,
                                             is_causal=True, n=1, m=4))
  sums = w.sum(-1)
  np.testing.assert_allclose(sums, 1.0, rtol=1e-6)
  assert np.all(w[1, :, :, 5:] == 0.0)
  # at most one kept score per group of 4
  assert np.all((w.reshape(2, 4, 10, -1)[..., :20].reshape(2, 4, 10, 5, 4) > 0)
                .sum(-1) <= 1)


def test_fully_masked_rows_are_zero_with_zero_grads(rng):
  q, k, v = random_inputs(rng, q_len=6, kv_len=8)
  mask = jnp.ones((1, 1, 6, 8), bool).at[:, :, 2].set(False)
  fn = lambda q, k, v: jnp.sum(reference.nm_attention_reference(q, k, v, mask=mask) ** 2)
  grads = jax.grad(fn, argnums=(0, 1, 2))(q, k, v)
  out = reference.nm_attention_reference(q, k, v, mask=mask)
  assert np.all(np.asarray(out[:, 2]) == 0) and np.all(np.asarray(grads[0][:, 2]) == 0)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
