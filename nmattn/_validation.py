"""Argument checking: the one place a call's arguments are validated.

`canonicalize` turns the user's arguments into an `AttentionCall`: 4-D query/key/
value, 4-D bias and mask whose dims are each 1 or full, validated lengths and
window, and a hashable `AttentionSpec` that backends use to decide whether they
can run the call (both defined in `pallas_kernels.call`, which every backend
consumes as it is; docs/ARCHITECTURE.md, "The call description").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from nmattn import patterns
from nmattn.masking import check_nm
from pallas_kernels.call import AttentionCall, AttentionSpec

INPUT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64)


def canonical_window(local_window_size: Any) -> tuple[int, int] | None:
  """`local_window_size` as (left, right), as jax.nn.dot_product_attention reads it."""
  if local_window_size is None:
    return None
  if isinstance(local_window_size, (int, np.integer)) and not isinstance(
      local_window_size, bool):
    window = (int(local_window_size), int(local_window_size))
  elif (isinstance(local_window_size, (tuple, list))
        and len(local_window_size) == 2
        and all(isinstance(w, (int, np.integer)) and not isinstance(w, bool)
                for w in local_window_size)):
    window = (int(local_window_size[0]), int(local_window_size[1]))
  else:
    raise ValueError(
        "local_window_size must be an int or a (left, right) pair of ints; "
        f"got local_window_size={local_window_size!r}")
  if min(window) < 0:
    raise ValueError(
        f"local_window_size must be >= 0; got local_window_size={local_window_size!r}")
  return window


def _shape_of(name: str, x: Any) -> tuple[int, ...]:
  shape = getattr(x, "shape", None)
  if shape is None:
    raise ValueError(f"{name} must be an array; got {name}={type(x).__name__}")
  return tuple(shape)


def _canonical_broadcast(name: str, x: Any, full: tuple[int, int, int, int]):
  shape = _shape_of(name, x)
  if len(shape) > 4:
    raise ValueError(
        f"{name} must have rank <= 4 (broadcastable to [batch, heads, q_len, "
        f"kv_len]={full}); got {name}.shape={shape}")
  shape4 = (1,) * (4 - len(shape)) + shape
  for got, want in zip(shape4, full):
    if got not in (1, want):
      raise ValueError(
          f"{name} must be broadcastable to [batch, heads, q_len, kv_len]="
          f"{full}; got {name}.shape={shape}")
  return jnp.reshape(x, shape4)


def _lengths(name: str, x: Any, batch: int):
  if x is None:
    return None
  shape = _shape_of(name, x)
  if shape != (batch,):
    raise ValueError(f"{name} must have shape [batch]=({batch},); got "
                     f"{name}.shape={shape}")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array; got {name}.dtype={x.dtype}")
  return jnp.asarray(x, jnp.int32)


def canonicalize(query, key, value, bias=None, mask=None, *, scale=None,
                 is_causal=False, query_seq_lengths=None,
                 key_value_seq_lengths=None, local_window_size=None, n=2,
                 m=4, block_pattern=None) -> tuple[AttentionCall, bool]:
  """Validates arguments; returns the canonical call and whether a batch dim was added.

  Query `[batch, q_len, heads, head_dim]` (or without `batch`), key and value
  `[batch, kv_len, kv_heads, head_dim]`. Raises ValueError naming the argument.
  """
  check_nm(n, m)
  q_shape = _shape_of("query", query)
  k_shape = _shape_of("key", key)
  v_shape = _shape_of("value", value)
  if len(q_shape) not in (3, 4):
    raise ValueError(
        "query must have rank 4 ([batch, q_len, heads, head_dim]) or 3 "
        f"([q_len, heads, head_dim]); got query.shape={q_shape}")
  for name, shape in (("key", k_shape), ("value", v_shape)):
    if len(shape) != len(q_shape):
      raise ValueError(f"{name} must have the rank of query ({len(q_shape)}); "
                       f"got {name}.shape={shape}, query.shape={q_shape}")
  added_batch = len(q_shape) == 3
  if added_batch:
    query, key, value = (x[None] for x in (query, key, value))
    q_shape, k_shape, v_shape = (1,) + q_shape, (1,) + k_shape, (1,) + v_shape

  dtype = jnp.dtype(query.dtype)
  if dtype not in [jnp.dtype(d) for d in INPUT_DTYPES]:
    raise ValueError("query dtype must be one of bfloat16, float16, float32, "
                     f"float64; got query.dtype={dtype}")
  for name, x in (("key", key), ("value", value)):
    if jnp.dtype(x.dtype) != dtype:
      raise ValueError(f"{name}.dtype must equal query.dtype={dtype}; got "
                       f"{name}.dtype={x.dtype}")
  batch, q_len, heads, head_dim = q_shape
  if k_shape != v_shape:
    raise ValueError(f"key and value must have the same shape; got "
                     f"key.shape={k_shape}, value.shape={v_shape}")
  if k_shape[0] != batch:
    raise ValueError(f"key batch must equal query batch ({batch}); got "
                     f"key.shape={k_shape}")
  if k_shape[3] != head_dim:
    raise ValueError(f"key head_dim must equal query head_dim ({head_dim}); "
                     f"got key.shape={k_shape}")
  kv_len, kv_heads = k_shape[1], k_shape[2]
  if min(q_len, kv_len, heads, kv_heads, head_dim) < 1:
    raise ValueError(f"empty dimension in query.shape={q_shape} or "
                     f"key.shape={k_shape}")
  if heads % kv_heads:
    raise ValueError(f"query heads ({heads}) must be a multiple of key/value "
                     f"heads; got kv_heads={kv_heads}")

  full = (batch, heads, q_len, kv_len)
  if bias is not None:
    bias = _canonical_broadcast("bias", bias, full)
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise ValueError(f"bias must be a float array; got bias.dtype={bias.dtype}")
  if mask is not None:
    mask = _canonical_broadcast("mask", mask, full)
    if mask.dtype != jnp.bool_:
      raise ValueError("mask must be a boolean array (True = attend); got "
                       f"mask.dtype={mask.dtype}")
  q_lengths = _lengths("query_seq_lengths", query_seq_lengths, batch)
  kv_lengths = _lengths("key_value_seq_lengths", key_value_seq_lengths, batch)
  if not isinstance(is_causal, (bool, np.bool_)):
    raise ValueError(f"is_causal must be a bool; got is_causal={is_causal!r}")
  if scale is None:
    scale = head_dim ** -0.5
  elif isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating,
                                                         np.integer)):
    raise ValueError(f"scale must be a Python float or None; got scale={scale!r}")
  spec = AttentionSpec(
      batch=batch, q_len=q_len, kv_len=kv_len, heads=heads, kv_heads=kv_heads,
      head_dim=head_dim, dtype=dtype,
      bias_shape=None if bias is None else tuple(bias.shape),
      mask_shape=None if mask is None else tuple(mask.shape),
      has_q_lengths=q_lengths is not None, has_kv_lengths=kv_lengths is not None,
      scale=float(scale), is_causal=bool(is_causal),
      window=canonical_window(local_window_size), n=int(n), m=int(m))
  modes = None
  if block_pattern is not None:
    modes = jnp.asarray(patterns.canonical_modes(
        block_pattern, batch=batch, heads=heads, q_len=q_len, kv_len=kv_len,
        m=spec.m), jnp.int8)
    spec = dataclasses.replace(
        spec, block_q=block_pattern.block_q, block_k=block_pattern.block_k,
        modes_shape=tuple(modes.shape))
  call = AttentionCall(query, key, value, bias, mask, q_lengths, kv_lengths,
                       spec, modes)
  return call, added_batch
