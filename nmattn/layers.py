"""Flax linen attention layers with N:M sparse scores.

Subclasses of Flax's own layers: the parameter tree is Flax's, so a dense
checkpoint loads unchanged, and `n == m` reproduces the dense layer.
"""

from __future__ import annotations

import functools

from flax import linen as nn

from nmattn.flax_attention import nm_dot_product_attention


class NMMultiHeadDotProductAttention(nn.MultiHeadDotProductAttention):
  """`flax.linen.MultiHeadDotProductAttention` keeping `n` of every `m` scores.

  Fields and call signature are Flax's (inputs `[batch..., length, features]`)
  plus `n`, `m` and `implementation` (see `nmattn.nm_attention`). The
  `attention_fn` field is derived from those three and must not be set.

  Calling it with `inputs_q [batch..., q_len, features]`, optional `inputs_k`
  and `inputs_v [batch..., kv_len, features]` (default: `inputs_q`) and an
  optional bool `mask` broadcastable to `[batch..., num_heads, q_len, kv_len]`
  (True = attend) returns `[batch..., q_len, out_features]` (`out_features`
  defaults to `features`).
  """
  n: int = 2
  m: int = 4
  implementation: str | None = None

  def __post_init__(self):
    if self.attention_fn is not nn.dot_product_attention and not (
        isinstance(self.attention_fn, functools.partial)
        and self.attention_fn.func is nm_dot_product_attention):
      raise ValueError(
          f"{type(self).__name__} sets attention_fn from n, m and "
          f"implementation; got attention_fn={self.attention_fn!r}")
    # Linen modules are frozen dataclasses; derived fields are set this way.
    object.__setattr__(
        self, "attention_fn",
        functools.partial(nm_dot_product_attention, n=self.n, m=self.m,
                          implementation=self.implementation))
    super().__post_init__()


class NMSelfAttention(NMMultiHeadDotProductAttention):
  """Self-attention form of `NMMultiHeadDotProductAttention` (`flax.linen.SelfAttention`)."""

  @nn.compact
  def __call__(self, inputs_q, mask=None, deterministic=None, dropout_rng=None,
               sow_weights=False):
    """`inputs_q [batch..., length, features]` -> `[batch..., length, out_features]`."""
    return super().__call__(inputs_q, mask=mask, deterministic=deterministic,
                            dropout_rng=dropout_rng, sow_weights=sow_weights)
