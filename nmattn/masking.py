"""N:M selection and the validity masks (docs/ARCHITECTURE.md rules 2 and 3).

Both are written for arbitrary key/query offsets so that the reference (one
block covering everything) and the blocked XLA backend share them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.call import SUPPORTED_M


def check_nm(n: Any, m: Any) -> None:
  """Raises ValueError unless `n:m` is a supported sparsity pattern."""
  for name, value in (("n", n), ("m", m)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ValueError(f"{name} must be a Python int; got {name}={value!r}")
  if m not in SUPPORTED_M:
    raise ValueError(f"m must be one of {SUPPORTED_M}; got m={m}")
  if n < 1:
    raise ValueError(f"n must be >= 1; got n={n}")
  if n > m:
    raise ValueError(f"n must be <= m; got n={n}, m={m}")


def group_rank(groups: jax.Array) -> jax.Array:
  """Rank of each element inside its group (last axis): 0 for the largest.

  An element is outranked by every larger element and by every equal element
  at a lower index, so ties go to the lower key index and ranks are distinct.
  NaN outranks nothing and is outranked by nothing (rank 0).
  """
  m = groups.shape[-1]
  mine = groups[..., :, None]
  other = groups[..., None, :]
  # [m, m]: the other element (column) sits at a lower index than mine (row);
  # broadcast to the group axes explicitly (rank promotion may be "raise").
  lower_index = jnp.arange(m)[None, :] < jnp.arange(m)[:, None]
  lower_index = jnp.broadcast_to(lower_index, mine.shape[:-2] + (m, m))
  beats = (other > mine) | ((other == mine) & lower_index)
  return jnp.sum(beats, axis=-1, dtype=jnp.int32)


def nm_mask(scores: jax.Array, n: int, m: int) -> jax.Array:
  """Boolean keep-mask of N:M selection along the last axis.

  Groups are positions `[g*m, (g+1)*m)`; each keeps its `n` largest scores,
  ties going to the lower index. A `-inf` score is never kept, so a group with
  fewer than `n` finite scores keeps only those; when the length is not a
  multiple of `m` the last group is padded with `-inf`. NaN scores are kept so
  that they propagate to the output as in dense attention. Scores compare as
  XLA compares floats: on the CPU subnormals are flushed, so a subnormal score
  ties with zero. The mask carries no gradient.

  Args:
    scores: float array `[..., length]`.
    n: scores kept per group, `1 <= n <= m`.
    m: group size, one of `nmattn.SUPPORTED_M`.

  Returns:
    bool array of the shape of `scores`.
  """
  check_nm(n, m)
  scores = jax.lax.stop_gradient(jnp.asarray(scores))
  not_neg_inf = scores != -jnp.inf
  if n == m:
    return not_neg_inf
  length = scores.shape[-1]
  pad = -length % m
  padded = jnp.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(0, pad)],
                   constant_values=-jnp.inf)
  groups = padded.reshape(padded.shape[:-1] + (padded.shape[-1] // m, m))
  rank = group_rank(groups).reshape(padded.shape)[..., :length]
  return (rank < n) & not_neg_inf


def validity_mask(q_pos, k_pos, *, mask=None, is_causal=False, window=None,
                  q_lengths=None, kv_lengths=None, kv_len=None):
  """Which (query, key) pairs may attend, before N:M selection.

  Args:
    q_pos: int `[tq]` global query positions of the block.
    k_pos: int `[tk]` global key positions of the block.
    mask: optional bool broadcastable to `[batch, heads, tq, tk]`.
    is_causal: key position <= query position (top-left aligned).
    window: optional (left, right): `q - left <= k <= q + right`.
    q_lengths, kv_lengths: optional int `[batch]`; positions at or beyond the
      length are padding.
    kv_len: if given, key positions `>= kv_len` (block padding) are invalid.

  Returns:
    bool array broadcastable to `[batch, heads, tq, tk]`, or None when every
    pair is valid.
  """
  # Every term is rank 4 ([batch, heads, tq, tk] or broadcastable), so no
  # operation relies on implicit rank promotion.
  q = q_pos[None, None, :, None]
  k = k_pos[None, None, None, :]
  valid = None

  def both(a, b):
    return b if a is None else a & b

  if mask is not None:
    valid = both(valid, mask)
  if is_causal:
    valid = both(valid, k <= q)
  if window is not None:
    left, right = window
    valid = both(valid, (k >= q - left) & (k <= q + right))
  if kv_len is not None:
    valid = both(valid, k < kv_len)
  if q_lengths is not None:
    valid = both(valid, q < q_lengths[:, None, None, None])
  if kv_lengths is not None:
    valid = both(valid, k < kv_lengths[:, None, None, None])
  return valid
