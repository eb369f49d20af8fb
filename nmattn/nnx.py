"""Flax NNX attention layer with N:M sparse scores."""

from __future__ import annotations

import functools

from flax import nnx

from nmattn.flax_attention import (check_layer_config,
                                   nm_dot_product_attention)


class NMMultiHeadAttention(nnx.MultiHeadAttention):
  """`flax.nnx.MultiHeadAttention` keeping `n` of every `m` scores.

  Takes the arguments of `nnx.MultiHeadAttention` (same parameters, so dense
  weights load unchanged) plus keyword-only `n`, `m` and `implementation`
  (see `nmattn.nm_attention`), checked at construction (ValueError);
  `attention_fn` is derived from them.

  Calling it with `inputs_q [batch..., q_len, in_features]`, optional
  `inputs_k` and `inputs_v [batch..., kv_len, in_features]` (default:
  `inputs_q`) and an optional bool `mask` broadcastable to `[batch...,
  num_heads, q_len, kv_len]` (True = attend) returns `[batch..., q_len,
  out_features]` (`out_features` defaults to `in_features`).
  """

  def __init__(self, *args, n: int = 2, m: int = 4,
               implementation: str | None = None, **kwargs):
    if "attention_fn" in kwargs:
      raise ValueError(
          "NMMultiHeadAttention sets attention_fn from n, m and implementation;"
          f" got attention_fn={kwargs['attention_fn']!r}")
    check_layer_config(n, m, implementation)
    super().__init__(
        *args,
        attention_fn=functools.partial(nm_dot_product_attention, n=n, m=m,
                                       implementation=implementation),
        **kwargs)
    self.n, self.m, self.implementation = n, m, implementation
