"""Attention kinds for the experiment models, chosen by config.

`kind` is one of:
  * "dense": softmax attention over every valid key (`nmattn` with n == m);
  * "nm": DFSS N:M attention, `n` of every `m` consecutive keys per query
    (`nmattn.layers.NMMultiHeadDotProductAttention`; a causal layer puts
    that layer's `nmattn.nm_dot_product_attention` in Flax's own layer,
    with `is_causal=True`);
  * "topk": unstructured top-k per query row at the density of `n:m`
    (k = ceil(n / m * valid keys in that row));
  * "local": a fixed local window at the same density: each query keeps the
    k = ceil(n / m * valid keys) valid keys nearest to it (ties go left);
  * "cudnn": dense attention through cuDNN's flash attention,
    `jax.nn.dot_product_attention(implementation="cudnn")`, the baseline every
    JAX user has on a GPU. It needs a CUDA GPU and 16-bit inputs (bf16, fp16):
    on any other backend, or with float32 activations, the layer raises a
    ValueError naming the kind rather than run something else; use "dense"
    there;
  * "pattern": hierarchical N:M attention (`nmattn.nm_dot_product_attention`
    with `block_pattern=`): `block_pattern(query, key)` gives the
    `nmattn.BlockPattern` of each call from that layer's projected query and
    key (a static pattern may ignore them), with `n:m` inside its NM blocks.
    The fraction of scores kept depends on the pattern and the inputs, so the
    spec has no fixed density; the kind is built in code, not from a config.

"topk" and "local" are the comparison patterns of the DFSS paper; they run on
a materialised score matrix (fine at experiment sizes) with the same parameter
tree as the nmattn layer, so one checkpoint serves every kind.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

import nmattn

KINDS = ("dense", "nm", "topk", "local", "cudnn", "pattern")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """Which attention a model uses: `kind` in KINDS and the density n / m.

  `block_pattern` (kind "pattern" only, and required there) maps a layer's
  `query [batch, q_len, heads, d]` and `key` to its `nmattn.BlockPattern`.
  """
  kind: str = "dense"
  n: int = 2
  m: int = 4
  block_pattern: Callable | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"attention kind must be one of {KINDS}; got "
                       f"kind={self.kind!r}")
    if self.m not in nmattn.SUPPORTED_M:
      raise ValueError(f"attention m must be one of {nmattn.SUPPORTED_M}; got "
                       f"m={self.m}")
    if not 1 <= self.n <= self.m:
      raise ValueError(f"attention n must be in [1, m={self.m}]; got "
                       f"n={self.n}")
    if (self.kind == "pattern") != callable(self.block_pattern):
      raise ValueError("attention block_pattern must be a function (query, key)"
                       " -> nmattn.BlockPattern for kind 'pattern' and None for"
                       f" the other kinds; got kind={self.kind!r}, "
                       f"block_pattern={self.block_pattern!r}")

  @property
  def density(self) -> float | None:
    """Fraction of the valid scores kept (1.0 for dense; None for "pattern",
    where it depends on the pattern and the inputs)."""
    if self.kind == "pattern":
      return None
    return 1.0 if self.kind in ("dense", "cudnn") else self.n / self.m

  @property
  def label(self) -> str:
    """Short name for tables: dense, 2:4, topk@0.50, local@0.50."""
    if self.kind in ("dense", "cudnn"):
      return self.kind
    if self.kind == "nm":
      return f"{self.n}:{self.m}"
    if self.kind == "pattern":
      return f"pattern+{self.n}:{self.m}"
    return f"{self.kind}@{self.density:.2f}"


def density_keep_mask(priority, valid, density):
  """Keep the `ceil(density * valid keys)` highest-`priority` valid keys per row.

  Args:
    priority: `[..., q_len, kv_len]` float; larger is kept first. Distinct
      values within a row (ties keep every tied element).
    valid: `[..., q_len, kv_len]` bool, the keys a query may attend to.
    density: fraction in (0, 1].

  Returns:
    `[..., q_len, kv_len]` bool, a subset of `valid`.
  """
  priority = jnp.where(valid, priority, -jnp.inf)
  num_valid = jnp.sum(valid, axis=-1, keepdims=True)
  k = jnp.ceil(density * num_valid).astype(jnp.int32)
  ranked = -jnp.sort(-priority, axis=-1)
  threshold = jnp.take_along_axis(ranked, jnp.maximum(k - 1, 0), axis=-1)
  return valid & (priority >= threshold) & (k > 0)


def _local_priority(q_len, kv_len):
  """`[q_len, kv_len]`: larger for keys nearer the query; left wins ties."""
  q = jnp.arange(q_len)[:, None]
  kv = jnp.arange(kv_len)[None, :]
  return -(2 * jnp.abs(q - kv) + (kv > q)).astype(jnp.float32)


def density_attention(query, key, value, bias=None, mask=None, *, kind,
                      density, is_causal=False, dropout_rate=0.0,
                      deterministic=True):
  """Attention keeping a `density` fraction of each row: "topk" or "local".

  The Flax `attention_fn` signature (dropout is not supported and must be
  off; Flax hands an `attention_fn` only the keyword arguments it names, so
  `dropout_rate` and `deterministic` are named here to be checked). Shapes: `query [batch, q_len, heads, d]`, `key`/`value
  [batch, kv_len, heads, d]`, `mask` broadcastable to
  `[batch, heads, q_len, kv_len]` (True = attend); returns
  `[batch, q_len, heads, d]`. The selection carries no gradient.
  """
  if kind not in ("topk", "local"):
    raise ValueError(f"density_attention kind must be 'topk' or 'local'; got "
                     f"kind={kind!r}")
  _check_no_dropout(kind, dropout_rate, deterministic)
  q_len, kv_len = query.shape[-3], key.shape[-3]
  scores = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                      preferred_element_type=jnp.float32)
  scores = scores * (query.shape[-1] ** -0.5)
  if bias is not None:
    scores = scores + bias
  valid = jnp.ones(scores.shape, bool)
  if mask is not None:
    valid = valid & jnp.broadcast_to(mask.astype(bool), scores.shape)
  if is_causal:
    valid = valid & jnp.tril(jnp.ones((q_len, kv_len), bool))
  if kind == "topk":
    priority = jax.lax.stop_gradient(scores)
  else:
    priority = jnp.broadcast_to(_local_priority(q_len, kv_len), scores.shape)
  keep = density_keep_mask(priority, valid, density)
  scores = jnp.where(keep, scores, -jnp.inf)
  weights = jax.nn.softmax(scores, axis=-1, where=keep)
  weights = jnp.where(keep, weights, 0.0).astype(value.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


def _check_no_dropout(kind, dropout_rate, deterministic):
  if dropout_rate and not deterministic:
    raise ValueError(f"attention kind {kind!r} has no attention dropout; got "
                     f"dropout_rate={dropout_rate}")


def cudnn_attention(query, key, value, bias=None, mask=None, *,
                    is_causal=False, dropout_rate=0.0, deterministic=True,
                    implementation="cudnn"):
  """Dense attention through `jax.nn.dot_product_attention`: the "cudnn" kind.

  The Flax `attention_fn` signature (no attention dropout). Shapes:
  `query [batch, q_len, heads, d]`, `key`/`value [batch, kv_len, kv_heads, d]`,
  `bias`/`mask` broadcastable to `[batch, heads, q_len, kv_len]` (mask True =
  attend). `implementation` is "cudnn" for the kind; "xla" runs the same call
  through XLA (how the CPU tests check the wiring).

  Raises ValueError where cuDNN cannot run the call: a backend other than a
  CUDA GPU, or inputs that are not bf16/fp16.
  """
  _check_no_dropout("cudnn", dropout_rate, deterministic)
  if implementation == "cudnn":
    if jax.default_backend() != "gpu":
      raise ValueError(
          "attention kind 'cudnn' runs jax.nn.dot_product_attention("
          "implementation='cudnn') and needs a CUDA GPU; got backend "
          f"{jax.default_backend()!r} (use kind='dense' there)")
    if query.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(
          "attention kind 'cudnn' needs bfloat16 or float16 activations "
          f"(cuDNN flash attention); got query.dtype={query.dtype}")
  if mask is not None:  # jax.nn takes a 4-D bool mask
    mask = mask.astype(bool).reshape((1,) * (4 - mask.ndim) + mask.shape)
  return jax.nn.dot_product_attention(query, key, value, bias, mask,
                                      is_causal=is_causal,
                                      implementation=implementation)


def pattern_attention(query, key, value, bias=None, mask=None, *, n, m,
                      block_pattern, is_causal=False, dropout_rate=0.0,
                      deterministic=True):
  """N:M attention inside the blocks of `block_pattern(query, key)`: the "pattern" kind.

  The Flax `attention_fn` signature (no attention dropout), shapes as
  `nmattn.nm_dot_product_attention`; runs on the backend
  `implementation=None` picks for a patterned call, in the inputs' dtype.
  """
  _check_no_dropout("pattern", dropout_rate, deterministic)
  # The pattern sees float32 copies of 16-bit inputs: its block means and
  # pooled scores (a ranking) then do not round to 8 mantissa bits.
  wide = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
  pattern = block_pattern(wide(query), wide(key))
  return nmattn.nm_dot_product_attention(
      query, key, value, bias, mask, deterministic=True, is_causal=is_causal,
      n=n, m=m, block_pattern=pattern, implementation=None)


def multi_head_attention(spec: AttentionSpec, *, is_causal: bool = False,
                         **mha_kwargs) -> nn.Module:
  """A Flax multi-head attention layer of the given kind.

  `mha_kwargs` are `flax.linen.MultiHeadDotProductAttention` fields
  (`num_heads`, `name`, `dtype`, ...). Every kind has the parameter tree of
  that layer. `is_causal=True` masks the keys after each query inside the
  attention call (`is_causal` of nmattn and of `jax.nn`), so no
  `[q_len, kv_len]` mask is materialised and the kernels skip the tiles above
  the diagonal; a `mask` given to the layer (padding) still applies.
  """
  if spec.kind in ("dense", "nm"):
    n = spec.m if spec.kind == "dense" else spec.n
    if not is_causal:
      return nmattn.layers.NMMultiHeadDotProductAttention(
          n=n, m=spec.m, implementation=None, **mha_kwargs)
    # The nmattn layer has no is_causal field (Flax's layer passes none to
    # its attention_fn): its attention function in Flax's layer instead.
    attention_fn = functools.partial(nmattn.nm_dot_product_attention, n=n,
                                     m=spec.m, implementation=None)
  elif spec.kind == "cudnn":
    attention_fn = cudnn_attention
  elif spec.kind == "pattern":
    attention_fn = functools.partial(pattern_attention, n=spec.n, m=spec.m,
                                     block_pattern=spec.block_pattern)
  else:
    attention_fn = functools.partial(density_attention, kind=spec.kind,
                                     density=spec.density)
  if is_causal:
    attention_fn = functools.partial(attention_fn, is_causal=True)
  return nn.MultiHeadDotProductAttention(attention_fn=attention_fn,
                                         **mha_kwargs)
