"""`nmattn.pruning`: token and head selection, gathers, and the evicting KV cache."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import nmattn
from nmattn import pruning
from nmattn.importance import key_importance


def test_keep_counts_from_counts_and_ratios():
  assert pruning.keep_counts((100, 50, 7), 64) == (64, 50, 7)
  assert pruning.keep_counts((1.0, 0.5, 0.3, 0.01), 10) == (10, 5, 3, 1)
  assert pruning.keep_counts((0.25,), 6) == (2,)  # 1.5 rounds up
  assert pruning.keep_counts((), 5) == ()


@pytest.mark.parametrize("schedule,length,match", [
    ((0,), 8, r"schedule\[0\]=0"),
    ((4, 1.5), 8, r"schedule\[1\]=1.5"),
    ((4, 0.0), 8, r"schedule\[1\]=0.0"),
    ((True,), 8, r"schedule\[0\]=True"),
    (("4",), 8, r"schedule\[0\]='4'"),
    ((4, 6), 8, r"must not increase.*\(4, 6\)"),
    ((0.5, 1.0), 8, r"must not increase"),
    ((4,), 0, "length=0"),
])
def test_keep_counts_rejects(schedule, length, match):
  with pytest.raises(ValueError, match=match):
    pruning.keep_counts(schedule, length)


def test_top_indices_hand_made():
  scores = jnp.asarray([[0.1, 0.5, 0.5, 0.2, 0.9],
                        [1.0, 1.0, 1.0, 1.0, 1.0]])
  np.testing.assert_array_equal(pruning.top_indices(scores, 3),
                                [[1, 2, 4], [0, 1, 2]])
  # Ties (0.5, 0.5) keep the lower index; 0.0 and -0.0 are equal.
  np.testing.assert_array_equal(
      pruning.top_indices(jnp.asarray([0.5, 0.2, 0.5]), 1), [0])
  np.testing.assert_array_equal(
      pruning.top_indices(jnp.asarray([1.0, -0.0, 0.0, -0.0]), 2), [0, 1])


def test_top_indices_padding_and_pinned():
  scores = jnp.asarray([[0.0, 5.0, 1.0, 9.0, 8.0]])
  valid = jnp.asarray([[True, False, True, True, False]])
  # Padding is never kept over a real token, whatever its score.
  np.testing.assert_array_equal(
      pruning.top_indices(scores, 2, valid=valid), [[2, 3]])
  # Only three real tokens: the fourth slot goes to the best padding (8.0).
  np.testing.assert_array_equal(
      pruning.top_indices(scores, 4, valid=valid), [[0, 2, 3, 4]])
  pinned = jnp.asarray([[True, False, False, False, False]])
  np.testing.assert_array_equal(
      pruning.top_indices(scores, 2, valid=valid, pinned=pinned), [[0, 3]])
  # More pinned than kept: the pinned ones rank among themselves by score.
  np.testing.assert_array_equal(
      pruning.top_indices(scores, 1, pinned=jnp.asarray([[0, 0, 1, 1, 0]],
                                                        bool)), [[3]])


def test_top_indices_random_against_numpy(rng):
  # Few distinct values, so ties are common.
  scores = rng.integers(0, 4, (3, 4, 17)).astype(np.float32)
  valid = rng.random((3, 4, 17)) < 0.6
  pinned = rng.random((3, 4, 17)) < 0.1
  got = jax.jit(functools.partial(pruning.top_indices, keep=6))(
      scores, valid=valid, pinned=pinned)
  for idx in np.ndindex(scores.shape[:2]):
    rank_class = np.where(pinned[idx], 0, np.where(valid[idx], 1, 2))
    order = np.lexsort((np.arange(17), -scores[idx], rank_class))
    np.testing.assert_array_equal(got[idx], np.sort(order[:6]))


def test_top_indices_rejects():
  scores = jnp.zeros((2, 5))
  for keep in (0, 6, 2.0):
    with pytest.raises(ValueError, match=f"keep={keep!r}"):
      pruning.top_indices(scores, keep)
  with pytest.raises(ValueError, match=r"valid.shape=\(2, 4\)"):
    pruning.top_indices(scores, 2, valid=jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match=r"pinned.shape=\(3, 5\)"):
    pruning.top_indices(scores, 2, pinned=jnp.ones((3, 5), bool))


def test_gather_scatter_and_pool(rng):
  hidden = jnp.asarray(rng.standard_normal((2, 6, 3)), jnp.float32)
  valid = jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
  indices = jnp.asarray([[0, 2, 5], [1, 3, 4]])
  kept, kept_valid = pruning.gather_tokens((hidden, valid), indices)
  np.testing.assert_array_equal(kept[1], hidden[1, jnp.asarray([1, 3, 4])])
  np.testing.assert_array_equal(kept_valid, [[1, 1, 0], [1, 1, 1]])
  base = jnp.asarray(rng.standard_normal((2, 6, 3)), jnp.float32)
  back = pruning.scatter_tokens(base, kept * 2.0, indices)
  for b in range(2):
    for j in range(6):
      where = list(np.asarray(indices[b])).index(j) if j in indices[b] else None
      want = base[b, j] if where is None else 2.0 * kept[b, where]
      np.testing.assert_array_equal(back[b, j], want)
  np.testing.assert_allclose(
      pruning.kept_mean(kept, kept_valid),
      [np.mean(np.asarray(kept[0, :2]), 0), np.mean(np.asarray(kept[1]), 0)],
      rtol=1e-6)
  np.testing.assert_array_equal(
      pruning.kept_mean(kept, jnp.zeros((2, 3), bool)), np.zeros((2, 3)))


def test_accumulate_tokens_sums_heads(rng):
  importance = rng.random((2, 3, 5)).astype(np.float32)
  cumulative = rng.random((2, 5)).astype(np.float32)
  np.testing.assert_allclose(pruning.accumulate_tokens(cumulative, importance),
                             cumulative + importance.sum(1), rtol=1e-6)


def test_head_importance(rng):
  out = rng.standard_normal((2, 5, 3, 4)).astype(np.float32)
  np.testing.assert_allclose(pruning.head_importance(out),
                             np.abs(out).mean((0, 1, 3)), rtol=1e-5)
  valid = np.arange(5)[None, :] < np.asarray([[2], [5]])
  rows = np.concatenate([out[0, :2], out[1]])  # [7, heads, dim]
  np.testing.assert_allclose(pruning.head_importance(out, valid),
                             np.abs(rows).mean((0, 2)), rtol=1e-5)


def test_pruned_heads_equal_the_full_layer_without_them(rng):
  x = jnp.asarray(rng.standard_normal((2, 7, 24)), jnp.float32)
  full = nn.MultiHeadDotProductAttention(num_heads=4)
  params = full.init(jax.random.key(0), x)["params"]
  heads = pruning.top_indices(jnp.asarray([0.3, 0.1, 0.7, 0.2]), 2)
  np.testing.assert_array_equal(heads, [0, 2])
  pruned = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=12)
  got = pruned.apply({"params": pruning.prune_heads(params, heads)}, x)
  # The full layer with heads 1 and 3 cut from the output projection.
  cut = jax.tree.map(lambda p: p, params)
  cut["out"]["kernel"] = params["out"]["kernel"].at[jnp.asarray([1, 3])].set(0)
  np.testing.assert_allclose(got, full.apply({"params": cut}, x), rtol=1e-5,
                             atol=1e-6)


def _cache_with(importance, length):
  """A one-layer cache of budget len(importance) whose entry i is position i."""
  budget = len(importance)
  cache = pruning.init_kv_cache(1, 1, budget, 1, 1, jnp.float32)
  filled = np.arange(budget) < length
  entries = jnp.asarray(np.where(filled, np.arange(budget), 0),
                        jnp.float32).reshape(1, 1, budget, 1, 1)
  return cache._replace(
      key=entries, value=-entries,
      positions=jnp.asarray([np.where(filled, np.arange(budget), -1)], jnp.int32),
      importance=jnp.asarray([importance], jnp.float32),
      length=jnp.asarray([length], jnp.int32))


SUM = pruning.Eviction("importance")  # SpAtten's summed score, no window
NAMED_IMPORTANCE = pruning.Eviction("mean_importance", 0.5)


def test_evict_removes_the_least_important_and_keeps_order():
  cache = pruning.evict(_cache_with([3.0, 1.0, 2.0, 1.0], 4), SUM)
  # Slots 1 and 3 tie; the lower index is kept, so slot 3 goes.
  np.testing.assert_array_equal(cache.positions, [[0, 1, 2, -1]])
  np.testing.assert_array_equal(cache.key[0, 0, :3, 0, 0], [0, 1, 2])
  np.testing.assert_array_equal(cache.value[0, 0, :3, 0, 0], [0, -1, -2])
  np.testing.assert_array_equal(cache.importance, [[3, 1, 2, 0]])
  np.testing.assert_array_equal(cache.length, [3])
  cache = pruning.evict(_cache_with([3.0, 0.5, 2.0, 1.0], 4), SUM)
  np.testing.assert_array_equal(cache.positions, [[0, 2, 3, -1]])
  np.testing.assert_array_equal(cache.key[0, 0, :3, 0, 0], [0, 2, 3])
  recent = pruning.evict(_cache_with([3.0, 0.5, 2.0, 1.0], 4), "recent")
  np.testing.assert_array_equal(recent.positions, [[1, 2, 3, -1]])


@pytest.mark.parametrize("policy,kept", [
    (SUM, [0, 1, 3]),  # slot 2 (0.5) is the least important
    # The newest two (slots 2, 3) are protected: of 3.0 and 2.0, slot 1 goes.
    (pruning.Eviction("importance", 2), [0, 2, 3]),
    (pruning.Eviction("importance", 0.5), [0, 2, 3]),  # 0.5 * 4 = 2
    # 0.9 * 4 rounds to 4, capped at budget - 1: only slot 0 may go.
    (pruning.Eviction("importance", 0.9), [1, 2, 3]),
    (pruning.Eviction("oldest", 2), [1, 2, 3]),
])
def test_evict_protects_the_recent_window(policy, kept):
  cache = pruning.evict(_cache_with([3.0, 2.0, 0.5, 1.0], 4), policy)
  np.testing.assert_array_equal(cache.positions, [kept + [-1]])
  np.testing.assert_array_equal(cache.key[0, 0, :3, 0, 0], kept)


def test_evict_by_mean_importance_divides_by_the_steps_attended():
  # Entry i has been attended to by positions i..3: 4, 3, 2, 1 steps; means
  # 0.75, 0.83, 0.5, 0.6. The sum would evict the newest (0.6).
  importance = [3.0, 2.5, 1.0, 0.6]
  np.testing.assert_array_equal(
      pruning.evict(_cache_with(importance, 4), SUM).positions, [[0, 1, 2, -1]])
  mean = pruning.evict(_cache_with(importance, 4),
                       pruning.Eviction("mean_importance"))
  np.testing.assert_array_equal(mean.positions, [[0, 1, 3, -1]])
  np.testing.assert_allclose(mean.importance, [[3.0, 2.5, 0.6, 0.0]])
  # Protecting the newest two leaves 0.75 against 0.83: slot 0 goes.
  np.testing.assert_array_equal(
      pruning.evict(_cache_with(importance, 4),
                    pruning.Eviction("mean_importance", 2)).positions,
      [[1, 2, 3, -1]])


def test_named_policies():
  assert pruning.eviction("recent") == pruning.Eviction("oldest")
  assert pruning.eviction("importance") == NAMED_IMPORTANCE
  policy = pruning.Eviction("mean_importance", 0.25)
  assert pruning.eviction(policy) is policy
  assert hash(policy) == hash(pruning.Eviction("mean_importance", 0.25))
  assert policy.name == "mean_importance, recent 0.25"
  assert SUM.name == "importance"


@pytest.mark.parametrize("kwargs,match", [
    ({"score": "lru"}, "score='lru'"),
    ({"recent": -1}, "recent=-1"),
    ({"recent": 1.0}, "recent=1.0"),
    ({"recent": -0.5}, "recent=-0.5"),
    ({"recent": True}, "recent=True"),
    ({"recent": "2"}, "recent='2'"),
])
def test_eviction_rejects(kwargs, match):
  with pytest.raises(ValueError, match=match):
    pruning.Eviction(**kwargs)


def test_evict_rejects():
  cache = _cache_with([3.0, 1.0, 0.0, 0.0], 2)
  with pytest.raises(ValueError, match="policy='oldest'"):
    pruning.evict(cache, "oldest")
  with pytest.raises(ValueError, match="policy=3"):
    pruning.append(cache, 2, 3)
  # An int window as large as the budget would leave nothing to evict.
  with pytest.raises(ValueError, match=r"recent=4 \(4 entries\) for budget=4"):
    pruning.evict(cache, pruning.Eviction("importance", 4))
  pruning.evict(cache, pruning.Eviction("importance", 3))


def test_evict_leaves_a_cache_with_room_unchanged():
  cache = _cache_with([3.0, 1.0, 0.0, 0.0], 2)
  for policy in (SUM, "importance", "recent",
                 pruning.Eviction("mean_importance", 1)):
    for field, want in zip(pruning.evict(cache, policy), cache):
      np.testing.assert_array_equal(field, want)


def test_append_evicts_when_full():
  cache, slot = pruning.append(_cache_with([3.0, 1.0, 2.0, 4.0], 4), 9, SUM)
  np.testing.assert_array_equal(slot, [3])
  np.testing.assert_array_equal(cache.positions, [[0, 2, 3, 9]])
  np.testing.assert_array_equal(cache.importance, [[3, 2, 4, 0]])
  cache = pruning.store(cache, 0, slot, jnp.full((1, 1, 1), 7.0),
                        jnp.full((1, 1, 1), -7.0))
  np.testing.assert_array_equal(cache.key[0, 0, :, 0, 0], [0, 2, 3, 7])
  np.testing.assert_array_equal(cache.length, [4])


def test_init_kv_cache_rejects():
  with pytest.raises(ValueError, match="budget=0"):
    pruning.init_kv_cache(1, 2, 0, 1, 8, jnp.float32)


def _decode(q, k, v, budget, n, m, policy="importance"):
  """Token-by-token attention over an evicting cache; returns outputs and positions."""
  batch, length, heads, dim = q.shape

  @jax.jit
  def step(cache, t):
    cache, slot = pruning.append(cache, t, policy)
    cache = pruning.store(cache, 0, slot, k[:, t], v[:, t])
    args = (jax.lax.dynamic_slice_in_dim(q, t, 1, axis=1), cache.key[0])
    kwargs = dict(key_value_seq_lengths=cache.length, n=n, m=m)
    out = nmattn.nm_attention(*args, cache.value[0], **kwargs)
    cache = pruning.add_importance(cache, key_importance(*args, **kwargs))
    return cache, (out[:, 0], cache.positions)

  cache = pruning.init_kv_cache(1, batch, budget, heads, dim, q.dtype)
  _, (out, positions) = jax.lax.scan(step, cache, jnp.arange(length))
  return jnp.moveaxis(out, 0, 1), positions


@pytest.mark.parametrize("budget", [11, 16])
def test_decoding_within_budget_equals_full_attention(rng, budget):
  q, k, v = (jnp.asarray(rng.standard_normal((2, 11, 2, 8)), jnp.float32)
             for _ in range(3))
  out, positions = _decode(q, k, v, budget, 2, 4)
  full = nmattn.nm_attention(q, k, v, is_causal=True, n=2, m=4)
  # Bit-identical: no entry is evicted, and the cache and the full sequence
  # are both one 16-key tile of the xla backend.
  np.testing.assert_array_equal(out, full)
  assert (positions[-1, :, :11] == jnp.arange(11)).all()


# Jitted once for the module: the replay's 5 cache sizes compile once, not
# once per policy and step.
_one_of_two_weights = jax.jit(functools.partial(nmattn.nm_attention_weights,
                                                n=1, m=2))


@pytest.mark.parametrize("policy", [
    SUM, pruning.Eviction("importance", 2), pruning.Eviction("mean_importance"),
    pruning.Eviction("mean_importance", 0.4), "importance", "recent"],
    ids=lambda p: p if isinstance(p, str) else p.name)
def test_decoding_over_budget_keeps_the_most_important(rng, policy):
  q, k, v = (jnp.asarray(rng.standard_normal((1, 12, 2, 8)), jnp.float32)
             for _ in range(3))
  _, positions = _decode(q, k, v, 5, 1, 2, policy)
  # Replay the rule in numpy on the dense probabilities of the kept entries.
  rule = pruning.eviction(policy)
  protected = rule.recent_count(5)
  kept, importance = [], []
  for t in range(12):
    if len(kept) == 5:
      if rule.score == "oldest":
        victim = 0
      else:
        score = np.asarray(importance, np.float32)
        if rule.score == "mean_importance":
          score = score / (t - 1 - np.asarray(kept) + 1)
        score[5 - protected:] = np.inf
        victim = 4 - int(np.argmin(score[::-1]))
      del kept[victim], importance[victim]
    kept.append(t)
    importance.append(0.0)
    weights = _one_of_two_weights(q[:, t:t + 1], k[:, jnp.asarray(kept)])
    importance = list(np.asarray(importance) + np.asarray(weights).sum((0, 1, 2)))
    np.testing.assert_array_equal(positions[t, 0, :len(kept)], kept)
    # The protected window and the new entry are always in the cache.
    assert set(range(max(t - protected, 0), t + 1)) <= set(kept)
  assert len(kept) == 5
