"""Cascade token and head pruning and KV-cache eviction by attention importance.

The software form of SpAtten (Wang, Zhang, Han, HPCA 2021): a token's
importance is the attention probability it receives as a key
(`nmattn.importance.key_importance`), summed over heads and accumulated over
layers; tokens of low cumulative importance are removed for every later layer
(cascade), heads likewise by the magnitude of their outputs, and a decoder's
KV cache stays within a budget by evicting its least important entries. N:M
attention composes with it: N:M prunes scores inside a row, this removes rows
and columns.

Small functions to compose inside a model, every shape static under `jit`:

* tokens: `keep_counts` (a schedule -> static counts), `accumulate_tokens`,
  `top_indices` (which to keep), `gather_tokens`, then for pooling
  `kept_mean` or `scatter_tokens`;
* heads: `head_importance`, `top_indices`, `prune_heads` (Flax attention
  parameters of the kept heads);
* decoding: `KVCache`, `init_kv_cache`, `append` (evicting where full, by
  an `Eviction` policy), `store`, `add_importance`.

Ties: wherever entries rank equally, the lower index is kept.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def keep_counts(schedule: Sequence[int | float], length: int) -> tuple[int, ...]:
  """Static keep counts, one per layer, for a sequence of `length` tokens.

  Args:
    schedule: per layer, the tokens kept after that layer: an int count
      (capped at `length`: a shorter input keeps all of its tokens) or a float
      ratio in (0, 1] of `length` (rounded to the nearest count, halves up, at
      least 1). The counts must not increase: a removed token never returns.
    length: the input's (static) sequence length.

  Returns:
    A tuple of Python ints, `length >= counts[0] >= counts[1] >= ... >= 1`.
  """
  if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or (
      length < 1):
    raise ValueError(f"length must be a positive int; got length={length!r}")
  counts = []
  for layer, entry in enumerate(schedule):
    if isinstance(entry, (int, np.integer)) and not isinstance(entry, bool):
      if entry < 1:
        raise ValueError(f"schedule counts must be >= 1; got schedule[{layer}]"
                         f"={entry!r}")
      counts.append(min(int(entry), length))
    elif isinstance(entry, (float, np.floating)):
      if not 0.0 < entry <= 1.0:
        raise ValueError(f"schedule ratios must be in (0, 1]; got "
                         f"schedule[{layer}]={entry!r}")
      counts.append(max(1, math.floor(entry * length + 0.5)))
    else:
      raise ValueError("schedule entries must be int counts or float ratios; "
                       f"got schedule[{layer}]={entry!r}")
  for layer in range(1, len(counts)):
    if counts[layer] > counts[layer - 1]:
      raise ValueError(
          "schedule must not increase (pruned tokens do not return); got "
          f"schedule={tuple(schedule)!r}, counts {tuple(counts)} for "
          f"length={length}")
  return tuple(counts)


def accumulate_tokens(cumulative: jax.Array, key_importance: jax.Array):
  """`cumulative [batch, len] + key_importance [batch, heads, len]` summed over heads."""
  return cumulative + jnp.sum(key_importance.astype(jnp.float32), axis=-2)


def _broadcast_flags(name: str, flags, shape: tuple[int, ...]) -> jax.Array:
  """`flags` broadcast to `shape`, or a ValueError naming the argument."""
  flags_shape = tuple(np.shape(flags))
  if len(flags_shape) > len(shape) or any(
      a not in (1, b) for a, b in zip(flags_shape[::-1], shape[::-1])):
    raise ValueError(f"{name} must be broadcastable to scores.shape={shape}; "
                     f"got {name}.shape={flags_shape}")
  return jnp.broadcast_to(jnp.asarray(flags, bool), shape)


def top_indices(scores: jax.Array, keep: int, *, valid: jax.Array | None = None,
                pinned: jax.Array | None = None) -> jax.Array:
  """Indices of the `keep` highest-ranked entries along the last axis, ascending.

  Ranking: pinned entries first, then valid ones, then the rest (padding is
  never kept over a real entry); within each class the higher score first;
  equal scores keep the lower index. A NaN score ranks last in its class.
  Sorting the result keeps the kept entries in their original order.

  Args:
    scores: float `[..., length]` (e.g. cumulative token importance).
    keep: static int in `[1, length]`.
    valid: optional bool, broadcastable to `scores`, False for padding.
    pinned: optional bool, broadcastable to `scores`, entries kept before all
      others (e.g. a `[CLS]` token); if more than `keep` are pinned, they
      rank among themselves by score, then index.

  Returns:
    int32 `[..., keep]`, increasing along the last axis.
  """
  length = scores.shape[-1]
  if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or not (
      1 <= keep <= length):
    raise ValueError(f"keep must be an int in [1, {length}]; got keep={keep!r}")
  valid, pinned = (None if x is None else _broadcast_flags(name, x, scores.shape)
                   for name, x in (("valid", valid), ("pinned", pinned)))
  # Class 0 pinned, 1 valid, 2 padding; lax.sort orders by (class, -score,
  # index) and treats -0.0 as 0.0, so equal scores fall back to the index.
  rank_class = jnp.ones(scores.shape, jnp.int32)
  if valid is not None:
    rank_class = jnp.where(valid, rank_class, 2)
  if pinned is not None:
    rank_class = jnp.where(pinned, 0, rank_class)
  index = lax.broadcasted_iota(jnp.int32, scores.shape, scores.ndim - 1)
  _, _, order = lax.sort((rank_class, -scores.astype(jnp.float32), index),
                         dimension=scores.ndim - 1, num_keys=3)
  return jnp.sort(order[..., :keep], axis=-1)


def gather_tokens(tree: Any, indices: jax.Array) -> Any:
  """Each `[batch, len, ...]` leaf of `tree` at `indices [batch, k]` -> `[batch, k, ...]`."""

  def take(x):
    idx = indices.reshape(indices.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)

  return jax.tree.map(take, tree)


def scatter_tokens(base: jax.Array, kept: jax.Array,
                   positions: jax.Array) -> jax.Array:
  """`base [batch, len, ...]` with `kept [batch, k, ...]` written at `positions [batch, k]`.

  Scattering back after every pruning step gives each pruned token the state
  it had when it was removed, and each kept token its final state: a
  full-length output for models that pool or read positions.
  """
  return jax.vmap(lambda b, x, p: b.at[p].set(x))(base, kept, positions)


def kept_mean(hidden: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean over the valid kept tokens: `[batch, k, d]`, `[batch, k]` -> `[batch, d]`.

  A row with no valid token gives zeros.
  """
  weights = valid.astype(hidden.dtype)[..., None]
  return jnp.sum(hidden * weights, axis=-2) / jnp.maximum(
      jnp.sum(weights, axis=-2), 1.0)


def head_importance(attention_out: jax.Array,
                    valid: jax.Array | None = None) -> jax.Array:
  """Mean `|output|` of each head over batch, valid queries and features.

  Args:
    attention_out: the heads' outputs before the output projection,
      `[batch, q_len, heads, head_dim]`.
    valid: optional bool `[batch, q_len]`, False for padding queries.

  Returns:
    float32 `[heads]`; accumulated over layers (a sum of these) it ranks the
    heads for cascade head pruning (`top_indices`, then `prune_heads`). One
    set of heads serves the whole batch, as the projection weights do.
  """
  magnitude = jnp.abs(attention_out.astype(jnp.float32))
  if valid is None:
    return jnp.mean(magnitude, axis=(0, 1, 3))
  weights = valid.astype(jnp.float32)[:, :, None, None]
  count = jnp.maximum(jnp.sum(weights) * attention_out.shape[-1], 1.0)
  return jnp.sum(magnitude * weights, axis=(0, 1, 3)) / count


def prune_heads(attention_params: Any, heads: jax.Array) -> Any:
  """Parameters of `flax.linen.MultiHeadDotProductAttention` for the kept `heads` only.

  `attention_params` is the layer's tree (`query`, `key`, `value` kernels
  `[features, heads, head_dim]` and biases `[heads, head_dim]`; `out` kernel
  `[heads, head_dim, features]`); `heads` int `[k]`. The result is the tree of
  a layer with `num_heads=k` and `qkv_features=k * head_dim`: the dropped
  heads' projection slices are gone, so their scores, softmax and output are
  never computed. Its output equals the full layer's with the dropped heads'
  outputs set to zero.
  """
  pruned = dict(attention_params)
  for name in ("query", "key", "value"):
    pruned[name] = {"kernel": jnp.take(attention_params[name]["kernel"], heads,
                                       axis=1)}
    if "bias" in attention_params[name]:
      pruned[name]["bias"] = jnp.take(attention_params[name]["bias"], heads,
                                      axis=0)
  pruned["out"] = dict(attention_params["out"],
                       kernel=jnp.take(attention_params["out"]["kernel"], heads,
                                       axis=0))
  return pruned


class KVCache(NamedTuple):
  """A fixed-size decoder KV cache whose entries stay in position order.

  Slots `[0, length)` hold entries; later slots are empty. Attend with
  `key_value_seq_lengths=length`; N:M groups then form over the kept
  entries in order, as they do over the kept tokens of a pruned encoder.
  """
  key: jax.Array  # [layers, batch, budget, kv_heads, head_dim]
  value: jax.Array  # [layers, batch, budget, kv_heads, head_dim]
  positions: jax.Array  # int32 [batch, budget]: each entry's position, -1 empty
  importance: jax.Array  # float32 [batch, budget]: cumulative importance
  length: jax.Array  # int32 [batch]: filled slots

  @property
  def budget(self) -> int:
    return self.positions.shape[-1]


def init_kv_cache(num_layers: int, batch: int, budget: int, kv_heads: int,
                  head_dim: int, dtype) -> KVCache:
  """An empty cache of `budget` entries per layer."""
  for name, value in (("num_layers", num_layers), ("batch", batch),
                      ("budget", budget), ("kv_heads", kv_heads),
                      ("head_dim", head_dim)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
        value < 1):
      raise ValueError(f"{name} must be a positive int; got {name}={value!r}")
  entries = jnp.zeros((num_layers, batch, budget, kv_heads, head_dim), dtype)
  return KVCache(entries, entries, jnp.full((batch, budget), -1, jnp.int32),
                 jnp.zeros((batch, budget), jnp.float32),
                 jnp.zeros((batch,), jnp.int32))


EVICTION_POLICIES = ("importance", "recent")
EVICTION_SCORES = ("importance", "mean_importance", "oldest")


@dataclasses.dataclass(frozen=True)
class Eviction:
  """Which entry a full `KVCache` evicts (hashable: a static argument under `jit`).

  Attributes:
    score: what ranks the entries; the lowest goes.
      `"importance"`: the cumulative importance (the attention probability an
      entry received, summed over heads, layers and decoding steps: SpAtten's
      score). `"mean_importance"`: that sum divided by the number of steps the
      entry has been attended to (its position to the newest one, inclusive),
      the attention it received per query (H2O's and SpAtten's scores are
      sums; the mean does not favour old entries for their age).
      `"oldest"`: the entry of lowest position goes (a sliding window).
    recent: the newest entries that are never evicted: an int count in
      `[0, budget)` or a float ratio in `[0, 1)` of the budget (rounded to
      the nearest count, halves up, at most `budget - 1`). Without it
      (`recent=0`) a summed score evicts the newest entry at nearly every
      step: it has received one step's attention against the others' many
      (measured in docs/results/spatten.md). With `"oldest"` it changes
      nothing.
  """
  score: str = "importance"
  recent: int | float = 0

  def __post_init__(self):
    if self.score not in EVICTION_SCORES:
      raise ValueError(f"score must be one of {EVICTION_SCORES}; got "
                       f"score={self.score!r}")
    recent = self.recent
    if isinstance(recent, (int, np.integer)) and not isinstance(recent, bool):
      if recent < 0:
        raise ValueError(f"recent must be an int >= 0 or a float in [0, 1); "
                         f"got recent={recent!r}")
    elif isinstance(recent, (float, np.floating)):
      if not 0.0 <= recent < 1.0:
        raise ValueError(f"recent must be an int >= 0 or a float in [0, 1); "
                         f"got recent={recent!r}")
    else:
      raise ValueError("recent must be an int count or a float ratio of the "
                       f"budget; got recent={recent!r}")

  def recent_count(self, budget: int) -> int:
    """The protected entries at `budget` (a ratio at most `budget - 1`).

    Raises a ValueError naming `recent` where an int count is not below
    `budget`: nothing could be evicted.
    """
    if isinstance(self.recent, (float, np.floating)):
      # A ratio below 1 leaves at least one entry to evict at any budget.
      return min(math.floor(self.recent * budget + 0.5), budget - 1)
    count = int(self.recent)
    if count >= budget:
      raise ValueError(
          f"recent must protect fewer entries than the budget, so that one "
          f"can be evicted; got recent={self.recent!r} ({count} entries) for "
          f"budget={budget}")
    return count

  @property
  def name(self) -> str:
    """Short name for tables: `mean_importance, recent 0.25`."""
    return self.score + (f", recent {self.recent}" if self.recent else "")


# The named policies: "importance" is the best of the importance scores
# measured on a byte LM (docs/results/spatten.md; ratios 0.25 and 0.5 tie),
# "recent" the sliding-window baseline.
_NAMED_EVICTIONS = {"importance": Eviction("mean_importance", 0.5),
                    "recent": Eviction("oldest")}


def eviction(policy: str | Eviction) -> Eviction:
  """The `Eviction` of a policy name in `EVICTION_POLICIES`, or `policy` itself.

  `"importance"` is `Eviction("mean_importance", recent=0.5)`: the mean
  attention received per step, the newest half of the budget protected;
  `"recent"` is `Eviction("oldest")`.
  """
  if isinstance(policy, Eviction):
    return policy
  if isinstance(policy, str) and policy in _NAMED_EVICTIONS:
    return _NAMED_EVICTIONS[policy]
  raise ValueError(f"policy must be one of {EVICTION_POLICIES} or an "
                   f"Eviction; got policy={policy!r}")


def evict(cache: KVCache, policy: str | Eviction = "importance") -> KVCache:
  """Frees one slot where the cache is full; unchanged where it has room.

  `policy` names a policy (`EVICTION_POLICIES`, see `eviction`) or is an
  `Eviction`: the lowest-scoring entry outside the `recent` newest goes;
  among equal scores the newest goes, so the lower index is kept. Later
  entries move down one slot, so the order of positions is kept and the
  free slot is the last.

  The mean score counts the steps an entry has been attended to from the
  positions: the newest entry's position minus its own, plus one. That
  holds when each step appends one entry at the next position and then
  attends with it (as `experiments.models.transformer.decoder_step` does).
  """
  policy = eviction(policy)
  budget = cache.budget
  protected = policy.recent_count(budget)
  full = cache.length >= budget
  slots = jnp.arange(budget, dtype=jnp.int32)[None, :]
  if policy.score == "oldest":
    victim = jnp.zeros_like(cache.length)
  else:
    score = cache.importance
    if policy.score == "mean_importance":
      newest = jnp.max(cache.positions, axis=-1, keepdims=True)
      steps = jnp.maximum(newest - cache.positions + 1, 1)
      score = score / steps.astype(jnp.float32)
    # A full cache's newest entries are its last slots.
    score = jnp.where(slots >= budget - protected, jnp.inf, score)
    victim = budget - 1 - jnp.argmin(score[:, ::-1], axis=-1)
  victim = jnp.where(full, victim, budget).astype(jnp.int32)
  source = jnp.minimum(slots + (slots >= victim[:, None]), budget - 1)
  freed = full[:, None] & (slots == budget - 1)

  def move(entries):
    idx = source[None, :, :, None, None]
    return jnp.take_along_axis(entries, idx, axis=2)

  return KVCache(
      move(cache.key), move(cache.value),
      jnp.where(freed, -1, jnp.take_along_axis(cache.positions, source, 1)),
      jnp.where(freed, 0.0, jnp.take_along_axis(cache.importance, source, 1)),
      cache.length - full.astype(jnp.int32))


def append(cache: KVCache, position: jax.Array,
           policy: str | Eviction = "importance") -> tuple[KVCache, jax.Array]:
  """Reserves a slot for a token at `position` (int `[batch]` or scalar).

  Where the cache is full, `evict(cache, policy)` frees one first, so the
  budget always holds. Returns the cache, with the new entry counted and of
  importance 0, and the slot `[batch]` to `store` each layer's key and value
  in.
  """
  cache = evict(cache, policy)
  slot = cache.length
  position = jnp.broadcast_to(jnp.asarray(position, jnp.int32), slot.shape)
  batch = jnp.arange(slot.shape[0])
  return cache._replace(
      positions=cache.positions.at[batch, slot].set(position),
      importance=cache.importance.at[batch, slot].set(0.0),
      length=slot + 1), slot


def store(cache: KVCache, layer: int, slot: jax.Array, key: jax.Array,
          value: jax.Array) -> KVCache:
  """Writes one token's `key`, `value` `[batch, kv_heads, head_dim]` of `layer` at `slot`."""
  batch = jnp.arange(slot.shape[0])
  return cache._replace(key=cache.key.at[layer, batch, slot].set(key),
                        value=cache.value.at[layer, batch, slot].set(value))


def add_importance(cache: KVCache, key_importance: jax.Array) -> KVCache:
  """Accumulates `key_importance [batch, heads, budget]` (summed over heads)."""
  return cache._replace(importance=accumulate_tokens(cache.importance,
                                                     key_importance))
