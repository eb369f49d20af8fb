"""Property tests of `nm_mask` (ARCHITECTURE.md rule 3)."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nmattn
from nmattn import masking
from nmattn.masking import group_rank

NM = [(n, m) for m in nmattn.SUPPORTED_M for n in range(1, m + 1)]


@st.composite
def scores_and_pattern(draw, allow_neg_inf=True, few_values=False):
  n, m = draw(st.sampled_from(NM))
  # A few shapes only: each new shape costs a compilation.
  rows = 2
  length = draw(st.sampled_from([1, 3, 8, 13, 16, 37]))
  if few_values:  # a handful of distinct values: many exact ties
    elements = st.sampled_from([-1.0, 0.0, 0.5, 2.0])
  else:
    elements = st.floats(-1e3, 1e3, width=32)
  if allow_neg_inf:
    elements = st.one_of(elements, st.just(-np.inf))
  scores = draw(hnp.arrays(np.float32, (rows, length), elements=elements))
  return scores, n, m


def _as_xla_compares(x):
  """Subnormals as zero where XLA compares with denormals flushed (the CPU)."""
  if jax.default_backend() != "cpu":
    return x
  return np.where(np.abs(x) < np.finfo(x.dtype).tiny, np.zeros_like(x), x)


def _groups(x, m):
  """Pads the last axis to a multiple of m (-inf, or False for masks); splits it."""
  pad = -x.shape[-1] % m
  fill = False if x.dtype == bool else -np.inf
  x = np.pad(x, [(0, 0), (0, pad)], constant_values=fill)
  return x.reshape(x.shape[0], -1, m)


@settings(max_examples=150, deadline=None)
@given(scores_and_pattern())
def test_keeps_exactly_min_n_finite(args):
  scores, n, m = args
  keep = np.asarray(nmattn.nm_mask(jnp.asarray(scores), n, m))
  assert keep.shape == scores.shape and keep.dtype == bool
  kept = _groups(keep, m).sum(-1)
  finite = np.isfinite(_groups(scores, m)).sum(-1)
  np.testing.assert_array_equal(kept, np.minimum(n, finite))


@settings(max_examples=150, deadline=None)
@given(scores_and_pattern())
def test_every_kept_score_beats_every_dropped_one(args):
  scores, n, m = args
  keep = _groups(np.asarray(nmattn.nm_mask(jnp.asarray(scores), n, m)), m)
  groups = _groups(_as_xla_compares(scores), m)
  kept_min = np.where(keep, groups, np.inf).min(-1)
  dropped_max = np.where(keep, -np.inf, groups).max(-1)
  assert np.all(kept_min >= dropped_max)
  assert not np.any(keep & np.isneginf(groups))


def test_subnormal_scores_compare_as_xla_compares():
  # The case hypothesis found: on the CPU 0.0 and a subnormal tie.
  x = np.array([0.0, 1e-41, 1e-41, 1e-41], np.float32)
  keep = _groups(np.asarray(nmattn.nm_mask(jnp.asarray(x), 1, 2))[None], 2)[0]
  first_wins = _as_xla_compares(x)[0] >= _as_xla_compares(x)[1]
  np.testing.assert_array_equal(keep, [[first_wins, not first_wins], [True, False]])


@settings(max_examples=150, deadline=None)
@given(scores_and_pattern(allow_neg_inf=False, few_values=True))
def test_ties_go_to_the_lower_index(args):
  scores, n, m = args
  keep = np.asarray(nmattn.nm_mask(jnp.asarray(scores), n, m))
  np.testing.assert_array_equal(keep, _lower_index_top_n(scores, n, m))


def _lower_index_top_n(scores, n, m):
  """The n largest finite scores of each group, ties to the lower index."""
  rows = scores.reshape(-1, scores.shape[-1])
  groups = _groups(rows, m)
  # Stable descending order = larger first, then lower index: keep its first n.
  order = np.argsort(-groups, axis=-1, kind="stable")
  keep = np.zeros(groups.shape, bool)
  np.put_along_axis(keep, order[..., :n], True, axis=-1)
  keep &= np.isfinite(groups)
  return keep.reshape(rows.shape[0], -1)[:, :rows.shape[1]].reshape(scores.shape)


def test_nm_mask_without_rank_promotion(rng):
  # Some users make implicit rank promotion an error; nm_mask broadcasts
  # explicitly (here rank 3 with a padded last group).
  scores = rng.standard_normal((2, 3, 13)).astype(np.float32)
  with jax.numpy_rank_promotion("raise"):
    for n, m in NM:
      keep = np.asarray(nmattn.nm_mask(jnp.asarray(scores), n, m))
      np.testing.assert_array_equal(keep, _lower_index_top_n(scores, n, m))


def test_validity_mask_matches_brute_force_without_rank_promotion(rng):
  batch, heads, tq, tk, q0, k0 = 2, 3, 6, 10, 7, 4
  q_pos, k_pos = q0 + np.arange(tq), k0 + np.arange(tk)
  mask = rng.random((batch, 1, tq, tk)) < 0.7
  q_lengths = rng.integers(q0, q0 + tq + 1, (batch,))
  kv_lengths = rng.integers(k0, k0 + tk + 1, (batch,))
  left, right, kv_len = 2, 3, k0 + tk - 3
  with jax.numpy_rank_promotion("raise"):
    valid = masking.validity_mask(
        jnp.asarray(q_pos), jnp.asarray(k_pos), mask=jnp.asarray(mask),
        is_causal=True, window=(left, right), q_lengths=jnp.asarray(q_lengths),
        kv_lengths=jnp.asarray(kv_lengths), kv_len=kv_len)
    assert masking.validity_mask(jnp.asarray(q_pos), jnp.asarray(k_pos)) is None
  want = np.zeros((batch, heads, tq, tk), bool)
  for b, h, i, j in np.ndindex(want.shape):
    q, k = q_pos[i], k_pos[j]
    want[b, h, i, j] = (mask[b, 0, i, j] and k <= q and q - left <= k <= q + right
                        and k < kv_len and q < q_lengths[b] and k < kv_lengths[b])
  np.testing.assert_array_equal(np.broadcast_to(np.asarray(valid), want.shape), want)


def test_examples():
  x = jnp.array([[3.0, 1.0, 2.0, 2.0, -jnp.inf, 5.0, -jnp.inf, -jnp.inf, 7.0]])
  keep = nmattn.nm_mask(x, 2, 4)
  np.testing.assert_array_equal(
      keep, [[True, False, True, False, False, True, False, False, True]])
  np.testing.assert_array_equal(nmattn.nm_mask(x, 4, 4), x != -jnp.inf)


def test_nan_is_kept_so_it_propagates():
  x = jnp.array([1.0, jnp.nan, 3.0, 4.0])
  assert bool(nmattn.nm_mask(x, 1, 4)[1])


def test_group_rank_is_a_permutation():
  x = jax.random.normal(jax.random.key(np.random.randint(2**31)), (5, 7, 8))
  ranks = np.sort(np.asarray(group_rank(x)), axis=-1)
  np.testing.assert_array_equal(ranks, np.broadcast_to(np.arange(8), ranks.shape))


def test_works_under_jit_vmap_and_on_leading_axes():
  x = jax.random.normal(jax.random.key(np.random.randint(2**31)), (3, 2, 16))
  direct = nmattn.nm_mask(x, 2, 4)
  jitted = jax.jit(nmattn.nm_mask, static_argnums=(1, 2))(x, 2, 4)
  mapped = jax.vmap(lambda r: nmattn.nm_mask(r, 2, 4))(x)
  np.testing.assert_array_equal(direct, jitted)
  np.testing.assert_array_equal(direct, mapped)


def test_has_no_gradient():
  x = jax.random.normal(jax.random.key(0), (8,))
  grad = jax.grad(lambda x: jnp.sum(jnp.where(nmattn.nm_mask(x, 2, 4), x, 0.0)))(x)
  np.testing.assert_array_equal(grad, np.asarray(nmattn.nm_mask(x, 2, 4), float))


@pytest.mark.parametrize("n,m,match", [
    (0, 4, "n must be >= 1"), (5, 4, "n must be <= m"), (1, 3, "m must be one of"),
    (2.0, 4, "n must be a Python int"), (2, True, "m must be a Python int"),
])
def test_rejects_bad_patterns(n, m, match):
  with pytest.raises(ValueError, match=match):
    nmattn.nm_mask(jnp.zeros((4,)), n, m)
