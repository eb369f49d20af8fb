"""`nm_dot_product_attention`: a drop-in `attention_fn` for Flax (linen and NNX)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.dtypes import promote_dtype as linen_promote_dtype

from nmattn import patterns, reference
from nmattn.masking import check_nm
from nmattn.attention import nm_attention, resolve_implementation
from nmattn.backends import UnsupportedCallError


def check_layer_config(n, m, implementation, block_pattern=None) -> None:
  """Raises ValueError unless a layer's `n`, `m`, `implementation` and
  `block_pattern` are valid.

  The layers call it at construction, so a bad value fails there rather than
  on the first call. A static pattern is checked as far as it can be without
  a call (`nmattn.patterns.check_block_pattern`); a function only for being
  callable, its result on every call.
  """
  check_nm(n, m)
  resolve_implementation(implementation)
  if block_pattern is None:
    return
  if isinstance(block_pattern, patterns.BlockPattern):
    patterns.check_block_pattern(block_pattern, m)
  elif not callable(block_pattern):
    raise ValueError(
        "block_pattern must be an nmattn.BlockPattern, a function (query, key) "
        f"-> BlockPattern, or None; got block_pattern={block_pattern!r}")


def _resolve_pattern(block_pattern, query, key):
  """The call's `BlockPattern`: `block_pattern` itself or its result on q, k."""
  if block_pattern is None or isinstance(block_pattern, patterns.BlockPattern):
    return block_pattern
  if not callable(block_pattern):
    return block_pattern  # nm_attention raises, naming it
  pattern = block_pattern(query, key)
  if not isinstance(pattern, patterns.BlockPattern):
    raise ValueError(
        "block_pattern(query, key) must return an nmattn.BlockPattern; got "
        f"{type(pattern).__name__} from block_pattern={block_pattern!r}")
  return pattern


def _check_fused_products(einsum_dot_general, qk_attn_weights_einsum,
                          attn_weights_value_einsum) -> None:
  """Raises ValueError for a custom product that nmattn cannot run.

  q.k and p.v run inside nmattn (a kernel, or the reference that the N:M
  selection is defined on), so only Flax's defaults apply: `None`, or
  `jax.lax.dot_general` / `jnp.einsum` given explicitly.
  """
  for name, value, default in (
      ("einsum_dot_general", einsum_dot_general, jax.lax.dot_general),
      ("qk_attn_weights_einsum", qk_attn_weights_einsum, jnp.einsum),
      ("attn_weights_value_einsum", attn_weights_value_einsum, jnp.einsum)):
    if value is not None and value is not default:
      raise ValueError(
          f"{name} cannot apply: nmattn computes q.k and p.v itself (its "
          "kernels select the N:M scores in float32), so a custom product "
          "(e.g. a quantized einsum) cannot run; leave it None; got "
          f"{name}={value!r}")


def _flatten_batch(name, x, batch_shape):
  """`[batch..., a, b, c]` -> `[prod(batch), a, b, c]` (broadcast batch dims kept 1)."""
  if x is None:
    return None
  x = jnp.asarray(x)
  rank = len(batch_shape) + 3
  if x.ndim > rank:
    raise ValueError(f"{name} must have rank <= {rank} ([batch..., heads, "
                     f"q_len, kv_len]); got {name}.shape={x.shape}")
  x = jnp.reshape(x, (1,) * (rank - x.ndim) + x.shape)
  lead = x.shape[:len(batch_shape)]
  if all(d == 1 for d in lead):
    return x.reshape((1,) + x.shape[len(batch_shape):])
  try:
    x = jnp.broadcast_to(x, tuple(batch_shape) + x.shape[len(batch_shape):])
  except ValueError:
    raise ValueError(f"{name} batch dims must broadcast to {tuple(batch_shape)}; "
                     f"got {name}.shape={x.shape}") from None
  return x.reshape((math.prod(batch_shape),) + x.shape[len(batch_shape):])


def nm_dot_product_attention(query, key, value, bias=None, mask=None,
                             broadcast_dropout=True, dropout_rng=None,
                             dropout_rate=0.0, deterministic=False, dtype=None,
                             precision=None, module=None,
                             force_fp32_for_softmax=False,
                             einsum_dot_general=None,
                             qk_attn_weights_einsum=None,
                             attn_weights_value_einsum=None, *,
                             promote_dtype=None, is_causal=False, n=2, m=4,
                             block_pattern=None, implementation=None):
  """N:M sparse attention with the signature of `flax.linen.dot_product_attention`.

  Use it as `attention_fn=functools.partial(nm_dot_product_attention, n=2, m=4)`
  in `flax.linen.MultiHeadDotProductAttention` or `flax.nnx.MultiHeadAttention`.

  Args:
    query: `[batch..., q_len, heads, head_dim]`.
    key: `[batch..., kv_len, kv_heads, head_dim]` (`heads % kv_heads == 0`).
    value: `[batch..., kv_len, kv_heads, head_dim]`.
    bias: optional, broadcastable to `[batch..., heads, q_len, kv_len]`.
    mask: optional, broadcastable like `bias`; zero / False masks a pair.
    broadcast_dropout: share the dropout mask across batch and heads.
    dropout_rng: PRNG key, required when dropout is active.
    dropout_rate: dropout on the (pruned) attention probabilities.
    deterministic: disables dropout.
    dtype: computation dtype (default: promoted from the inputs).
    precision: matmul precision of the materialised path (dropout or `module`).
    module: if given, the pruned weights `[batch..., heads, q_len, kv_len]` are
      sown into its intermediates as `attention_weights`.
    force_fp32_for_softmax: the softmax always runs in float32 (float64 for
      float64 inputs), so this changes only the materialised path: its
      probabilities stay float32 for sowing, dropout and `p @ v`, as in Flax.
      The output is in the computation dtype either way.
    einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum: Flax's
      hooks for custom products; only their defaults apply (`None`, or
      `jax.lax.dot_general` / `jnp.einsum`): nmattn computes both products
      itself, so anything else raises a ValueError.
    promote_dtype: as in `flax.nnx.dot_product_attention`: called as
      `promote_dtype((query, key, value), dtype=dtype)`; default: promoted
      by `flax.linen.dtypes.promote_dtype`.
    is_causal: causal masking (passed by `flax.nnx.MultiHeadAttention`).
    n, m, implementation: as in `nmattn.nm_attention`.
    block_pattern: an `nmattn.BlockPattern` as in `nmattn.nm_attention`, or
      a function `(query, key) -> BlockPattern` called on every call with
      the query `[batch, q_len, heads, head_dim]` and key `[batch, kv_len,
      kv_heads, head_dim]` after dtype promotion (an adaptive pattern such as
      `functools.partial(nmattn.patterns.topk_blocks, block_q=128,
      block_k=128, density=0.25)`), or None. The batch dims flatten into one,
      which the pattern's modes (and the function's inputs) index.

  Returns:
    `[batch..., q_len, heads, head_dim]`.

  Dropout and `module` need the probabilities, so they run on a materialised
  XLA path; with an explicit kernel `implementation` they raise.
  """
  if not isinstance(force_fp32_for_softmax, bool):
    raise ValueError("force_fp32_for_softmax must be a bool; got "
                     f"force_fp32_for_softmax={force_fp32_for_softmax!r}")
  _check_fused_products(einsum_dot_general, qk_attn_weights_einsum,
                        attn_weights_value_einsum)
  if promote_dtype is None:
    query, key, value = linen_promote_dtype(query, key, value, dtype=dtype)
  else:
    query, key, value = promote_dtype((query, key, value), dtype=dtype)
  if not query.ndim == key.ndim == value.ndim:
    raise ValueError("query, key and value must have the same rank; got "
                     f"query.shape={query.shape}, key.shape={key.shape}, "
                     f"value.shape={value.shape}")
  if query.ndim < 3:
    raise ValueError("query must be [batch..., q_len, heads, head_dim]; got "
                     f"query.shape={query.shape}")
  batch_shape = query.shape[:-3]
  for name, x in (("key", key), ("value", value)):
    if x.shape[:-3] != batch_shape:
      raise ValueError(f"{name} batch dims must equal query's {batch_shape}; "
                       f"got {name}.shape={x.shape}")
  flat = lambda x: x.reshape((math.prod(batch_shape),) + x.shape[-3:])
  q, k, v = flat(query), flat(key), flat(value)
  bias = _flatten_batch("bias", bias, batch_shape)
  mask = _flatten_batch("mask", mask, batch_shape)
  if mask is not None and mask.dtype != jnp.bool_:
    mask = mask.astype(jnp.bool_)
  block_pattern = _resolve_pattern(block_pattern, q, k)

  dropout = not deterministic and dropout_rate > 0.0
  if not dropout and module is None:
    out = nm_attention(q, k, v, bias, mask, is_causal=is_causal, n=n, m=m,
                       block_pattern=block_pattern,
                       implementation=implementation)
    return out.reshape(query.shape[:-1] + (value.shape[-1],))

  if implementation not in (None, "xla"):
    raise UnsupportedCallError(
        f"implementation={implementation!r} cannot apply dropout or sow "
        "attention weights; use implementation=None or 'xla'")
  weights = reference.nm_attention_weights(q, k, bias, mask,
                                           is_causal=is_causal, n=n, m=m,
                                           block_pattern=block_pattern)
  if not force_fp32_for_softmax:
    weights = weights.astype(query.dtype)
  if module is not None:
    sown = weights.reshape(batch_shape + weights.shape[1:])
    collection = (nnx.Intermediate if isinstance(module, nnx.Module)
                  else "intermediates")
    module.sow(collection, "attention_weights", sown)
  if dropout:
    if dropout_rng is None:
      raise ValueError("dropout_rng must be given when dropout_rate > 0 and "
                       f"not deterministic; got dropout_rate={dropout_rate}")
    keep_prob = 1.0 - dropout_rate
    shape = ((1, 1) + weights.shape[2:]) if broadcast_dropout else weights.shape
    keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
    weights = weights * (keep.astype(weights.dtype) / keep_prob)
  out = reference.apply_weights(weights, v, precision=precision)
  return out.astype(query.dtype).reshape(query.shape[:-1] + (value.shape[-1],))
