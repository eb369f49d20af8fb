"""The canonical description of one attention call, shared by every backend.

`nmattn` validates a user's arguments once (`nmattn._validation.canonicalize`)
and hands every backend an `AttentionCall`: 4-D query/key/value, 4-D bias and
mask whose dims are each 1 or full, int32 lengths, and the hashable static
`AttentionSpec`. Kernels consume it as it is: they neither re-validate nor
rename (docs/ARCHITECTURE.md, "The call description"). This module imports
neither Triton nor Mosaic GPU, so the dispatcher can read it anywhere.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax.numpy as jnp

# Group sizes of the N:M selection.
SUPPORTED_M = (1, 2, 4, 8, 16)
# Every supported m divides this: key tiles that are multiples of it keep
# N:M groups whole.
KEY_ALIGN = 16
LOG2E = math.log2(math.e)
# Block modes of a block pattern (`AttentionCall.block_modes`): the block's
# scores are masked, N:M-selected, or all kept.
SKIP, NM, DENSE = 0, 1, 2


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def cdiv(x: int, y: int) -> int:
  return -(-x // y)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """Static description of one attention call; hashable, used for dispatch.

  Shapes follow Flax: query `[batch, q_len, heads, head_dim]`, key/value
  `[batch, kv_len, kv_heads, head_dim]`; `bias_shape` / `mask_shape` are the
  4-D canonical shapes (each dim 1 or full) or None; `window` is
  `(left, right)` or None. A block pattern (rule 7 of docs/ARCHITECTURE.md,
  "The semantics") has its block sizes here and its modes, int8
  `[B|1, H|1, ceil(q_len / block_q), ceil(kv_len / block_k)]`, in the call.
  """
  batch: int
  q_len: int
  kv_len: int
  heads: int
  kv_heads: int
  head_dim: int
  dtype: Any
  bias_shape: tuple[int, int, int, int] | None
  mask_shape: tuple[int, int, int, int] | None
  has_q_lengths: bool
  has_kv_lengths: bool
  scale: float
  is_causal: bool
  window: tuple[int, int] | None
  n: int
  m: int
  block_q: int | None = None
  block_k: int | None = None
  modes_shape: tuple[int, int, int, int] | None = None

  @property
  def has_pattern(self) -> bool:
    """Whether the call carries a block pattern."""
    return self.modes_shape is not None

  @property
  def groups(self) -> int:
    """Query heads per key/value head."""
    return self.heads // self.kv_heads

  @property
  def full_shape(self) -> tuple[int, int, int, int]:
    """`[batch, heads, q_len, kv_len]`, the shape bias and mask broadcast to."""
    return (self.batch, self.heads, self.q_len, self.kv_len)

  @property
  def bias_full(self) -> tuple[bool, bool, bool, bool] | None:
    """Per dim of `full_shape`: whether the bias spans it (None: no bias)."""
    return self._spans(self.bias_shape)

  @property
  def mask_full(self) -> tuple[bool, bool, bool, bool] | None:
    """Per dim of `full_shape`: whether the mask spans it (None: no mask)."""
    return self._spans(self.mask_shape)

  def _spans(self, shape):
    if shape is None:
      return None
    return tuple(d != 1 or f == 1 for d, f in zip(shape, self.full_shape))

  @property
  def is_dense(self) -> bool:
    """`n == m`: no N:M selection."""
    return self.n == self.m


class AttentionCall(NamedTuple):
  """Canonical arrays (query/key/value 4-D, bias/mask 4-D or None) plus spec;
  `block_modes` the int8 block modes of a pattern, or None."""
  query: Any
  key: Any
  value: Any
  bias: Any
  mask: Any
  q_lengths: Any
  kv_lengths: Any
  spec: AttentionSpec
  block_modes: Any = None


def pad_axis(x, axis: int, size: int, value=0):
  """`x` padded with `value` at the end of `axis` to `size`."""
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def pad_broadcast(x, q_size: int, k_size: int, value=0):
  """A 4-D bias or mask padded along its full (non-1) query and key dims."""
  if x is None:
    return None
  if x.shape[2] > 1:
    x = pad_axis(x, 2, q_size, value)
  if x.shape[3] > 1:
    x = pad_axis(x, 3, k_size, value)
  return x
