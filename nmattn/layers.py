"""Flax linen attention layers with N:M sparse scores.

Subclasses of Flax's own layers: the parameter tree is Flax's, so a dense
checkpoint loads unchanged, and `n == m` reproduces the dense layer up to
rounding.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from flax import linen as nn

from nmattn.flax_attention import (check_layer_config,
                                   nm_dot_product_attention)


class _DerivedAttentionFn(functools.partial):
  """The `attention_fn` a layer derives from its `n`, `m`, `implementation`
  and `block_pattern`.

  Its type tells it apart from a function given by the user when `clone`
  (or Flax's module machinery) passes the fields back to the constructor.
  """


class NMMultiHeadDotProductAttention(nn.MultiHeadDotProductAttention):
  """`flax.linen.MultiHeadDotProductAttention` keeping `n` of every `m` scores.

  Fields and call signature are Flax's (inputs `[batch..., length, features]`)
  plus `n`, `m`, `implementation` (see `nmattn.nm_attention`) and
  `block_pattern`, checked at construction (ValueError). The `attention_fn`
  field is derived from those four; setting it raises a ValueError at
  construction.

  `block_pattern` (hierarchical sparsity: which blocks are skipped, pruned
  N:M or kept dense) is None, a static `nmattn.BlockPattern`, or a function
  `(query, key) -> BlockPattern` that the layer calls on every call with its
  projected query `[batch, q_len, num_heads, head_dim]` and key (batch dims
  flattened into one), e.g. `functools.partial(nmattn.patterns.topk_blocks,
  block_q=128, block_k=128, density=0.25)` (training a causal model, add
  `is_causal=True, autoregressive=True`: the plain choice reads later
  positions): a pattern usually depends on the inputs or their length, so
  a function is the usual form. A static
  pattern's modes must broadcast to `[batch, num_heads, q blocks, kv blocks]`
  of every call.

  Calling it with `inputs_q [batch..., q_len, features]`, optional `inputs_k`
  and `inputs_v [batch..., kv_len, features]` (default: `inputs_q`) and an
  optional bool `mask` broadcastable to `[batch..., num_heads, q_len, kv_len]`
  (True = attend) returns `[batch..., q_len, out_features]` (`out_features`
  defaults to `features`).
  """
  attention_fn: Callable[..., Any] | None = None
  n: int = 2
  m: int = 4
  implementation: str | None = None
  block_pattern: Any = None

  def __post_init__(self):
    # Linen runs __post_init__ when a module is constructed (and cloned).
    if not (self.attention_fn is None
            or isinstance(self.attention_fn, _DerivedAttentionFn)):
      raise ValueError(
          f"{type(self).__name__} sets attention_fn from n, m, "
          f"implementation and block_pattern; got attention_fn="
          f"{self.attention_fn!r}")
    check_layer_config(self.n, self.m, self.implementation, self.block_pattern)
    # Linen modules are frozen dataclasses; derived fields are set this way.
    object.__setattr__(
        self, "attention_fn",
        _DerivedAttentionFn(nm_dot_product_attention, n=self.n, m=self.m,
                            implementation=self.implementation,
                            block_pattern=self.block_pattern))
    super().__post_init__()


class NMSelfAttention(NMMultiHeadDotProductAttention):
  """Self-attention form of `NMMultiHeadDotProductAttention` (`flax.linen.SelfAttention`)."""

  @nn.compact
  def __call__(self, inputs_q, mask=None, deterministic=None, dropout_rng=None,
               sow_weights=False):
    """`inputs_q [batch..., length, features]` -> `[batch..., length, out_features]`."""
    return super().__call__(inputs_q, mask=mask, deterministic=deterministic,
                            dropout_rng=dropout_rng, sow_weights=sow_weights)
