"""Every validation error names the argument and its value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nmattn
from attention_test_base import random_inputs


@pytest.fixture
def qkv(rng):
  return random_inputs(rng, batch=2, q_len=8, kv_len=12, heads=4, kv_heads=2,
                       head_dim=16)


def _call(qkv, **overrides):
  q, k, v = qkv
  args = dict(query=q, key=k, value=v)
  args.update(overrides)
  return nmattn.nm_attention(**args)


@pytest.mark.parametrize("overrides,match", [
    (dict(n=0), r"n must be >= 1; got n=0"),
    (dict(n=5, m=4), r"n must be <= m; got n=5, m=4"),
    (dict(m=3), r"m must be one of .*; got m=3"),
    (dict(m=32), r"m must be one of .*; got m=32"),
    (dict(n=1.5), r"n must be a Python int; got n=1.5"),
    (dict(implementation="cuda"), r"implementation must be one of .*got implementation='cuda'"),
    (dict(scale="big"), r"scale must be a Python float or None; got scale='big'"),
    (dict(is_causal=1), r"is_causal must be a bool; got is_causal=1"),
    (dict(local_window_size=-1), r"local_window_size must be >= 0"),
    (dict(local_window_size=(1, 2, 3)), r"local_window_size must be an int or a \(left, right\)"),
    (dict(local_window_size=2.5), r"got local_window_size=2.5"),
])
def test_bad_scalars(qkv, overrides, match):
  with pytest.raises(ValueError, match=match):
    _call(qkv, **overrides)


def test_bad_shapes_and_dtypes(qkv):
  q, k, v = qkv
  cases = [
      (dict(query=q[0, 0]), r"query must have rank 4 .*got query.shape=\(4, 16\)"),
      (dict(key=k[0]), r"key must have the rank of query"),
      (dict(value=v[:, :5]), r"key and value must have the same shape"),
      (dict(key=k[:1], value=v[:1]), r"key batch must equal query batch \(2\)"),
      (dict(key=k[..., :8], value=v[..., :8]), r"key head_dim must equal query head_dim \(16\)"),
      (dict(key=jnp.concatenate([k] * 3, 2)[:, :, :3], value=jnp.concatenate([v] * 3, 2)[:, :, :3]),
       r"query heads \(4\) must be a multiple of key/value heads; got kv_heads=3"),
      (dict(query=q.astype(jnp.int32)), r"query dtype must be one of .*got query.dtype=int32"),
      (dict(key=k.astype(jnp.bfloat16)), r"key.dtype must equal query.dtype=float32; got key.dtype=bfloat16"),
      (dict(value=v.astype(jnp.float16)), r"value.dtype must equal query.dtype"),
      (dict(query=q[:, :0]), r"empty dimension in query.shape=\(2, 0, 4, 16\)"),
      (dict(bias=jnp.ones((2, 4, 8, 11))), r"bias must be broadcastable to .*\(2, 4, 8, 12\); got bias.shape=\(2, 4, 8, 11\)"),
      (dict(bias=jnp.ones((1, 1, 2, 4, 8, 12))), r"bias must have rank <= 4"),
      (dict(bias=jnp.ones((8, 12), jnp.int32)), r"bias must be a float array; got bias.dtype=int32"),
      (dict(mask=jnp.ones((8, 12))), r"mask must be a boolean array .*got mask.dtype=float32"),
      (dict(mask=jnp.ones((3, 1, 8, 12), bool)), r"mask must be broadcastable .*got mask.shape=\(3, 1, 8, 12\)"),
      (dict(query_seq_lengths=jnp.array([3])), r"query_seq_lengths must have shape \[batch\]=\(2,\); got query_seq_lengths.shape=\(1,\)"),
      (dict(key_value_seq_lengths=jnp.array([3.0, 4.0])), r"key_value_seq_lengths must be an integer array; got key_value_seq_lengths.dtype=float32"),
      (dict(key=np.asarray(k).tolist()), r"key must be an array; got key=list"),
  ]
  for overrides, match in cases:
    with pytest.raises(ValueError, match=match):
      _call(qkv, **overrides)


def test_explicit_unavailable_backend_says_why(qkv):
  if jax.default_backend() == "gpu":
    pytest.skip("kernels may be available on a GPU")
  for name in ("pallas_mosaic",):
    with pytest.raises(nmattn.UnsupportedCallError, match=f"implementation='{name}' cannot run this call: .+"):
      _call(qkv, implementation=name)
  assert issubclass(nmattn.UnsupportedCallError, ValueError)
  assert issubclass(nmattn.UnsupportedCallError, NotImplementedError)


def test_flax_fn_errors(qkv):
  q, k, v = qkv
  with pytest.raises(ValueError, match="query, key and value must have the same rank"):
    nmattn.nm_dot_product_attention(q, k[0], v)
  with pytest.raises(ValueError, match=r"key batch dims must equal query's \(2,\)"):
    nmattn.nm_dot_product_attention(q, k[:1], v[:1])
  with pytest.raises(ValueError, match=r"mask must have rank <= 4"):
    nmattn.nm_dot_product_attention(q, k, v, mask=jnp.ones((1, 1, 2, 4, 8, 12)))
  with pytest.raises(ValueError, match=r"bias batch dims must broadcast to \(2, 2\); got bias.shape=\(3, 2, 4, 8, 12\)"):
    nmattn.nm_dot_product_attention(q[None].repeat(2, 0), k[None].repeat(2, 0),
                                    v[None].repeat(2, 0), bias=jnp.ones((3, 2, 4, 8, 12)))
  with pytest.raises(ValueError, match=r"query must be \[batch..., q_len, heads, head_dim\]"):
    nmattn.nm_dot_product_attention(q[0, 0], k[0, 0], v[0, 0])
