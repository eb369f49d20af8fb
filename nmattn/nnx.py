"""Flax NNX attention layer with N:M sparse scores."""

from __future__ import annotations

import functools

from flax import nnx

from nmattn.flax_attention import (check_layer_config,
                                   nm_dot_product_attention)


class NMMultiHeadAttention(nnx.MultiHeadAttention):
  """`flax.nnx.MultiHeadAttention` keeping `n` of every `m` scores.

  Takes the arguments of `nnx.MultiHeadAttention` (same parameters, so dense
  weights load unchanged) plus keyword-only `n`, `m`, `implementation` (see
  `nmattn.nm_attention`) and `block_pattern`, checked at construction
  (ValueError); `attention_fn` is derived from them.

  `block_pattern` is None, a static `nmattn.BlockPattern`, or a function
  `(query, key) -> BlockPattern` called on every call with the projected
  query `[batch, q_len, num_heads, head_dim]` and key (batch dims flattened
  into one; with `decode=True`, the cached keys), e.g.
  `functools.partial(nmattn.patterns.topk_blocks, block_q=128, block_k=128,
  density=0.25)`, as in `nmattn.layers.NMMultiHeadDotProductAttention`.

  Calling it with `inputs_q [batch..., q_len, in_features]`, optional
  `inputs_k` and `inputs_v [batch..., kv_len, in_features]` (default:
  `inputs_q`) and an optional bool `mask` broadcastable to `[batch...,
  num_heads, q_len, kv_len]` (True = attend) returns `[batch..., q_len,
  out_features]` (`out_features` defaults to `in_features`).
  """

  def __init__(self, *args, n: int = 2, m: int = 4,
               implementation: str | None = None, block_pattern=None,
               **kwargs):
    if "attention_fn" in kwargs:
      raise ValueError(
          "NMMultiHeadAttention sets attention_fn from n, m, implementation "
          f"and block_pattern; got attention_fn={kwargs['attention_fn']!r}")
    check_layer_config(n, m, implementation, block_pattern)
    super().__init__(
        *args,
        attention_fn=functools.partial(nm_dot_product_attention, n=n, m=m,
                                       implementation=implementation,
                                       block_pattern=block_pattern),
        **kwargs)
    self.n, self.m, self.implementation = n, m, implementation

  @property
  def block_pattern(self):
    """The layer's `block_pattern` (None, a `BlockPattern` or a function).

    Read from `attention_fn`: NNX keeps no array data (a static pattern's
    modes) in a plain attribute.
    """
    return self.attention_fn.keywords["block_pattern"]
