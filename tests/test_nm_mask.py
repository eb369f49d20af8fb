"""Property tests of `nm_mask` (ARCHITECTURE.md rule 3)."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nmattn
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
  keep = _groups(np.asarray(nmattn.nm_mask(jnp.asarray(scores), n, m)), m)
  groups = _groups(scores, m)
  # Stable descending order = larger first, then lower index: keep its first n.
  order = np.argsort(-groups, axis=-1, kind="stable")
  expected = np.zeros_like(keep)
  np.put_along_axis(expected, order[..., :n], True, axis=-1)
  expected &= np.isfinite(groups)
  np.testing.assert_array_equal(keep, expected)


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
