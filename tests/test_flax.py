"""The Flax drop-in: attention_fn for linen and NNX, and the NM layers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import nmattn
from attention_test_base import random_inputs, rel_err


def _inputs(rng, shape=(2, 24, 32)):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _nm_fn(n, m, **kwargs):
  return functools.partial(nmattn.nm_dot_product_attention, n=n, m=m, **kwargs)


def test_attention_fn_at_n_equal_m_is_flax_attention(rng):
  q, k, v = random_inputs(rng, q_len=12, kv_len=20)
  mask = jnp.asarray(rng.random((2, 4, 12, 20)) < 0.8).at[..., 0].set(True)
  bias = jnp.asarray(rng.standard_normal((2, 1, 12, 20)), jnp.float32)
  want = nn.dot_product_attention(q, k, v, bias, mask)
  got = nmattn.nm_dot_product_attention(q, k, v, bias, mask, n=4, m=4)
  assert rel_err(got, want) < 1e-5


def test_attention_fn_many_batch_dims_and_float_mask(rng):
  shape = (2, 3, 10, 2, 8)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
  mask = nn.make_causal_mask(jnp.ones((2, 3, 10)))  # float32 [2, 3, 1, 10, 10]
  got = nmattn.nm_dot_product_attention(q, k, v, mask=mask, n=2, m=4)
  want = nmattn.nm_attention(q.reshape(6, 10, 2, 8), k.reshape(6, 10, 2, 8),
                             v.reshape(6, 10, 2, 8), is_causal=True)
  assert got.shape == shape
  assert rel_err(got.reshape(6, 10, 2, 8), want) < 1e-6


def test_dropout_matches_flax_at_n_equal_m(rng, seed):
  q, k, v = random_inputs(rng, q_len=12, kv_len=12)
  key = jax.random.key(seed)
  for broadcast in (True, False):
    kwargs = dict(dropout_rng=key, dropout_rate=0.3, deterministic=False,
                  broadcast_dropout=broadcast)
    want = nn.dot_product_attention(q, k, v, **kwargs)
    got = nmattn.nm_dot_product_attention(q, k, v, n=4, m=4, **kwargs)
    assert rel_err(got, want) < 1e-5
  sparse = nmattn.nm_dot_product_attention(q, k, v, **kwargs)
  assert rel_err(sparse, nmattn.nm_attention(q, k, v)) > 0.05


def test_dropout_needs_rng_and_the_materialised_path(rng):
  q, k, v = random_inputs(rng)
  with pytest.raises(ValueError, match="dropout_rng"):
    nmattn.nm_dot_product_attention(q, k, v, dropout_rate=0.1)
  with pytest.raises(nmattn.UnsupportedCallError, match="dropout"):
    nmattn.nm_dot_product_attention(q, k, v, dropout_rate=0.1,
                                    dropout_rng=jax.random.key(0),
                                    implementation="pallas_triton")


def _copy_params_check(rng, dense, sparse, x, **call_kwargs):
  params = dense.init(jax.random.key(0), x, **call_kwargs)
  assert (jax.tree.map(jnp.shape, params)
          == jax.tree.map(jnp.shape, sparse.init(jax.random.key(1), x, **call_kwargs)))
  return params, dense.apply(params, x, **call_kwargs), sparse.apply(params, x, **call_kwargs)


@pytest.mark.parametrize("layer", ["mha", "self"])
def test_linen_layers_load_dense_params(rng, layer):
  x = _inputs(rng)
  dense_cls, nm_cls = {
      "mha": (nn.MultiHeadDotProductAttention,
              nmattn.layers.NMMultiHeadDotProductAttention),
      "self": (nn.SelfAttention, nmattn.layers.NMSelfAttention),
  }[layer]
  dense = dense_cls(num_heads=4, qkv_features=32)
  _, want, got = _copy_params_check(rng, dense, nm_cls(num_heads=4, qkv_features=32,
                                                       n=4, m=4), x)
  assert rel_err(got, want) < 1e-5
  params = dense.init(jax.random.key(0), x)
  sparse = nm_cls(num_heads=4, qkv_features=32, n=2, m=4).apply(params, x)
  plugged = nn.MultiHeadDotProductAttention(
      num_heads=4, qkv_features=32, attention_fn=_nm_fn(2, 4)).apply(params, x)
  assert rel_err(sparse, plugged) < 1e-6
  assert rel_err(sparse, want) > 0.05


def test_linen_layer_sows_pruned_weights(rng):
  x = _inputs(rng)
  layer = nmattn.layers.NMMultiHeadDotProductAttention(num_heads=4, n=1, m=4)
  params = layer.init(jax.random.key(0), x)
  _, state = layer.apply(params, x, sow_weights=True, mutable=["intermediates"])
  (weights,) = state["intermediates"]["attention_weights"]
  w = np.asarray(weights)
  assert w.shape == (2, 4, 24, 24)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
  assert np.all((w.reshape(2, 4, 24, 6, 4) > 0).sum(-1) <= 1)


def test_linen_layer_trains_under_jit_with_dropout(rng, seed):
  x = _inputs(rng)
  layer = nmattn.layers.NMMultiHeadDotProductAttention(num_heads=4, dropout_rate=0.2)
  params = layer.init(jax.random.key(0), x, deterministic=True)

  @jax.jit
  def loss(params, key):
    y = layer.apply(params, x, deterministic=False, rngs={"dropout": key})
    return jnp.mean(y ** 2)

  l1, g = jax.value_and_grad(loss)(params, jax.random.key(seed))
  l2 = loss(params, jax.random.key(seed + 1))
  assert np.isfinite(float(l1)) and float(l1) != float(l2)
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(g))


def test_linen_layer_rejects_attention_fn():
  with pytest.raises(ValueError, match="attention_fn"):
    nmattn.layers.NMMultiHeadDotProductAttention(
        num_heads=2, attention_fn=nn.dot_product_attention_weights)


def test_linen_layer_clone_rebuilds_attention_fn():
  layer = nmattn.layers.NMMultiHeadDotProductAttention(num_heads=2, n=2, m=4)
  clone = layer.clone(n=1, m=2)
  assert clone.attention_fn.keywords["n"] == 1 and clone.attention_fn.keywords["m"] == 2


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_nnx_layer_loads_dense_params(rng, kv_heads):
  x = _inputs(rng)
  kwargs = dict(num_heads=4, in_features=32, qkv_features=32, decode=False)
  if kv_heads:
    kwargs["num_kv_heads"] = kv_heads
  dense = nnx.MultiHeadAttention(**kwargs, rngs=nnx.Rngs(0))
  sparse = nmattn.nnx.NMMultiHeadAttention(**kwargs, n=4, m=4, rngs=nnx.Rngs(1))
  nnx.update(sparse, nnx.state(dense, nnx.Param))
  for causal in (False, True):
    assert rel_err(sparse(x, is_causal=causal), dense(x, is_causal=causal)) < 1e-5
  two_four = nmattn.nnx.NMMultiHeadAttention(**kwargs, n=2, m=4, rngs=nnx.Rngs(1))
  nnx.update(two_four, nnx.state(dense, nnx.Param))
  plugged = nnx.MultiHeadAttention(**kwargs, attention_fn=_nm_fn(2, 4),
                                   rngs=nnx.Rngs(2))
  nnx.update(plugged, nnx.state(dense, nnx.Param))
  assert rel_err(two_four(x, is_causal=True), plugged(x, is_causal=True)) < 1e-6
  assert rel_err(two_four(x), dense(x)) > 0.05


def test_nnx_layer_sows_and_rejects_attention_fn(rng):
  x = _inputs(rng)
  layer = nmattn.nnx.NMMultiHeadAttention(num_heads=4, in_features=32, n=2, m=4,
                                          decode=False, rngs=nnx.Rngs(0))
  layer(x, sow_weights=True)
  (weights,) = nnx.state(layer, nnx.Intermediate)["attention_weights"].get_value()
  assert weights.shape == (2, 4, 24, 24)
  assert layer.n == 2 and layer.m == 4
  with pytest.raises(ValueError, match="attention_fn"):
    nmattn.nnx.NMMultiHeadAttention(num_heads=4, in_features=32, rngs=nnx.Rngs(0),
                                    attention_fn=nnx.dot_product_attention)


def test_force_fp32_for_softmax_through_linen_layer_matches_flax(rng):
  # Flax's layer passes force_fp32_for_softmax to attention_fn: the sown
  # probabilities are float32 with it and the computation dtype without.
  x = _inputs(rng)
  for force in (False, True):
    kwargs = dict(num_heads=4, qkv_features=32, dtype=jnp.bfloat16,
                  force_fp32_for_softmax=force)
    dense = nn.MultiHeadDotProductAttention(**kwargs)
    sparse = nmattn.layers.NMMultiHeadDotProductAttention(**kwargs, n=4, m=4)
    params = dense.init(jax.random.key(0), x)
    outs, sown = [], []
    for layer in (dense, sparse):
      out, state = layer.apply(params, x, sow_weights=True,
                               mutable=["intermediates"])
      outs.append(out)
      sown.append(state["intermediates"]["attention_weights"][0])
    assert sown[1].dtype == sown[0].dtype
    assert sown[1].dtype == (jnp.float32 if force else jnp.bfloat16)
    assert rel_err(sown[1], sown[0]) < 1e-2
    assert outs[1].dtype == outs[0].dtype == jnp.bfloat16
    assert rel_err(outs[1], outs[0]) < 2e-2
    assert rel_err(sparse.apply(params, x), outs[0]) < 2e-2


def test_force_fp32_for_softmax_keeps_dropout_probabilities_float32(rng, seed):
  q, k, v = (x.astype(jnp.bfloat16) for x in random_inputs(rng, q_len=12, kv_len=12))
  kwargs = dict(dropout_rng=jax.random.key(seed), dropout_rate=0.3,
                deterministic=False, force_fp32_for_softmax=True)
  want = nn.dot_product_attention(q, k, v, **kwargs)  # float32 in Flax
  got = nmattn.nm_dot_product_attention(q, k, v, n=4, m=4, **kwargs)
  assert got.dtype == jnp.bfloat16
  assert rel_err(got, want) < 1e-2
  with pytest.raises(ValueError, match="force_fp32_for_softmax must be a bool; "
                     "got force_fp32_for_softmax='yes'"):
    nmattn.nm_dot_product_attention(q, k, v, force_fp32_for_softmax="yes")


def test_force_fp32_for_softmax_through_nnx_layer(rng):
  # nnx.MultiHeadAttention passes no such argument; it reaches the function
  # through the partial.
  x = _inputs(rng)
  kwargs = dict(num_heads=4, in_features=32, qkv_features=32, decode=False,
                dtype=jnp.bfloat16)
  dense = nnx.MultiHeadAttention(**kwargs, rngs=nnx.Rngs(0))
  plugged = nnx.MultiHeadAttention(
      **kwargs, attention_fn=_nm_fn(4, 4, force_fp32_for_softmax=True),
      rngs=nnx.Rngs(1))
  nnx.update(plugged, nnx.state(dense, nnx.Param))
  out = plugged(x, sow_weights=True)
  (weights,) = nnx.state(plugged, nnx.Intermediate)["attention_weights"].get_value()
  assert weights.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)
  assert out.dtype == jnp.bfloat16 and rel_err(out, dense(x)) < 2e-2


def test_default_products_given_explicitly_are_flax_attention(rng):
  q, k, v = random_inputs(rng, q_len=12, kv_len=20)
  want = nn.dot_product_attention(q, k, v)
  got = nmattn.nm_dot_product_attention(
      q, k, v, einsum_dot_general=jax.lax.dot_general,
      qk_attn_weights_einsum=jnp.einsum, attn_weights_value_einsum=jnp.einsum,
      n=4, m=4)
  assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("name", ["einsum_dot_general", "qk_attn_weights_einsum",
                                  "attn_weights_value_einsum"])
def test_custom_products_raise(rng, name):
  q, k, v = random_inputs(rng, q_len=8, kv_len=8)
  custom = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
  with pytest.raises(ValueError, match=f"{name} cannot apply.*got {name}="):
    nmattn.nm_dot_product_attention(q, k, v, **{name: custom})


def test_linen_layer_with_custom_einsums_raises(rng):
  custom = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
  layer = nmattn.layers.NMMultiHeadDotProductAttention(
      num_heads=4, qk_attn_weights_einsum_cls=lambda: custom,
      attn_weights_value_einsum_cls=lambda: custom)
  with pytest.raises(ValueError, match="qk_attn_weights_einsum cannot apply"):
    layer.init(jax.random.key(0), _inputs(rng))


def test_promote_dtype_is_nnx_style(rng):
  q, k, v = random_inputs(rng, q_len=12, kv_len=20)
  to_half = lambda arrays, dtype: tuple(x.astype(jnp.float16) for x in arrays)
  got = nmattn.nm_dot_product_attention(q, k, v, promote_dtype=to_half, n=4, m=4)
  want = nnx.dot_product_attention(q, k, v, dtype=jnp.float16)
  assert got.dtype == want.dtype == jnp.float16
  assert rel_err(got, want) < 5e-3


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=0), "n must be >= 1; got n=0"),
    (dict(n=5, m=4), "n must be <= m; got n=5, m=4"),
    (dict(m=3), r"m must be one of .*; got m=3"),
    (dict(n=2.0), "n must be a Python int; got n=2.0"),
    (dict(implementation="cuda"), "got implementation='cuda'"),
])
def test_layers_validate_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    nmattn.nnx.NMMultiHeadAttention(num_heads=2, in_features=16, decode=False,
                                    rngs=nnx.Rngs(0), **kwargs)
  with pytest.raises(ValueError, match=match):
    nmattn.layers.NMMultiHeadDotProductAttention(num_heads=2, **kwargs)


@pytest.mark.parametrize("attention_fn", [nn.dot_product_attention,
                                          _nm_fn(1, 2)])
def test_linen_layer_rejects_any_given_attention_fn(attention_fn):
  # Also Flax's default and nmattn's own function: either would be replaced.
  with pytest.raises(ValueError, match="sets attention_fn"):
    nmattn.layers.NMMultiHeadDotProductAttention(num_heads=2, n=2, m=4,
                                                 attention_fn=attention_fn)


def test_attention_fn_without_rank_promotion(rng, seed):
  # Several batch dims, a float mask and a broadcast bias on the fused path,
  # dropout on the materialised one, with implicit rank promotion an error.
  shape = (2, 3, 10, 2, 8)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
  mask = nn.make_causal_mask(jnp.ones((2, 3, 10)))  # float32 [2, 3, 1, 10, 10]
  bias = jnp.asarray(rng.standard_normal((1, 3, 2, 1, 10)), jnp.float32)
  dropout = dict(dropout_rng=jax.random.key(seed), dropout_rate=0.3,
                 deterministic=False)
  for kwargs in (dict(), dropout):
    attention = functools.partial(nmattn.nm_dot_product_attention, q, k, v,
                                  bias, mask, n=2, m=4, **kwargs)
    with jax.numpy_rank_promotion("raise"):
      got = attention()
    # The setting only adds checks: the result is the default setting's.
    np.testing.assert_array_equal(got, attention())
    dense = nmattn.nm_dot_product_attention(q, k, v, bias, mask, n=4, m=4,
                                            **kwargs)
    assert rel_err(got, dense) > 0.05


# --- block patterns on the layers ---------------------------------------------


def _topk_pattern(query, key):
  """An adaptive pattern of 2 of the 3 key blocks of 8 (dense diagonal included)."""
  return nmattn.patterns.topk_blocks(query, key, block_q=8, block_k=8, k=2,
                                     sink_blocks=0)


def _static_pattern(rng, batch=2, heads=4):
  modes = rng.integers(0, 3, (batch, heads, 3, 3)).astype(np.int8)
  modes[..., 0] = nmattn.NM  # every row keeps a block
  return nmattn.BlockPattern(modes, 8, 8)


def _projected_attention(params, x, attention):
  """Flax's multi-head attention written out: projections, `attention(q, k, v)`, output."""
  p = params["params"]
  project = lambda name: (jnp.einsum("bld,dhk->blhk", x, p[name]["kernel"])
                          + p[name]["bias"])
  out = attention(project("query"), project("key"), project("value"))
  return jnp.einsum("blhk,hkd->bld", out, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize("layer,kind", [("mha", "function"), ("self", "static")])
def test_linen_layers_with_block_pattern_are_nm_attention(rng, layer, kind):
  x = _inputs(rng)  # [2, 24, 32]: 3 blocks of 8 positions
  block_pattern = _topk_pattern if kind == "function" else _static_pattern(rng)
  cls = dict(mha=nmattn.layers.NMMultiHeadDotProductAttention,
             self=nmattn.layers.NMSelfAttention)[layer]
  model = cls(num_heads=4, qkv_features=32, n=2, m=4, block_pattern=block_pattern)
  params = model.init(jax.random.key(0), x)
  params = jax.tree.map(  # fresh weights, not the initialiser's
      lambda w: jnp.asarray(rng.standard_normal(w.shape) / 4, w.dtype), params)

  def reference_attention(q, k, v):
    pattern = block_pattern(q, k) if callable(block_pattern) else block_pattern
    return nmattn.nm_attention(q, k, v, n=2, m=4, block_pattern=pattern)

  # One compile each (eager op-by-op dispatch of the blocked backend is slow).
  @jax.jit
  def outputs_and_grads(params):
    apply = lambda p: (model.apply(p, x),
                       _projected_attention(p, x, reference_attention))
    loss = lambda p, i: jnp.sum(jnp.sin(apply(p)[i]))
    return (apply(params), jax.grad(loss)(params, 0), jax.grad(loss)(params, 1),
            cls(num_heads=4, qkv_features=32, n=2, m=4).apply(params, x))

  (got, want), grads, want_grads, plain = outputs_and_grads(params)
  assert rel_err(got, want) < 1e-5
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    assert np.any(np.asarray(g) != 0) and rel_err(g, w) < 1e-4
  # The pattern matters: without it the layer is plain 2:4.
  assert rel_err(got, plain) > 0.02
  # clone keeps it.
  assert model.clone(n=1, m=2).attention_fn.keywords["block_pattern"] is block_pattern


def test_linen_layer_sows_zero_weights_in_skipped_blocks(rng):
  x = _inputs(rng)
  pattern = _static_pattern(rng)
  layer = nmattn.layers.NMMultiHeadDotProductAttention(num_heads=4, n=4, m=4,
                                                       block_pattern=pattern)
  params = layer.init(jax.random.key(0), x)
  _, state = layer.apply(params, x, sow_weights=True, mutable=["intermediates"])
  (weights,) = state["intermediates"]["attention_weights"]
  blocks = np.asarray(weights).reshape(2, 4, 3, 8, 3, 8)
  skipped = np.asarray(pattern.modes) == nmattn.SKIP  # [2, 4, 3, 3]
  assert np.all(blocks.transpose(0, 1, 2, 4, 3, 5)[skipped] == 0)
  assert np.all(blocks.transpose(0, 1, 2, 4, 3, 5)[~skipped].sum(axis=(-1, -2)) > 0)


@pytest.mark.parametrize("kind", ["function", "static"])
def test_nnx_layer_with_block_pattern_is_nm_attention(rng, kind):
  x = _inputs(rng)
  block_pattern = _topk_pattern if kind == "function" else _static_pattern(rng)
  kwargs = dict(num_heads=4, in_features=32, qkv_features=32, decode=False)
  layer = nmattn.nnx.NMMultiHeadAttention(**kwargs, n=2, m=4,
                                          block_pattern=block_pattern,
                                          rngs=nnx.Rngs(0))
  assert layer.block_pattern is block_pattern
  p = {name: {"kernel": getattr(layer, name).kernel.get_value(),
              "bias": getattr(layer, name).bias.get_value()}
       for name in ("query", "key", "value", "out")}

  def reference_attention(q, k, v, is_causal):
    pattern = block_pattern(q, k) if callable(block_pattern) else block_pattern
    return nmattn.nm_attention(q, k, v, n=2, m=4, is_causal=is_causal,
                               block_pattern=pattern)

  plain = nmattn.nnx.NMMultiHeadAttention(**kwargs, n=2, m=4, rngs=nnx.Rngs(0))

  @nnx.jit
  def run(layer, plain):
    outs = [(layer(x, is_causal=causal), _projected_attention(
        {"params": p}, x, functools.partial(reference_attention, is_causal=causal)))
            for causal in (False, True)]
    grads = nnx.grad(lambda layer: jnp.sum(layer(x) ** 2))(layer)
    return outs, nnx.state(grads, nnx.Param), plain(x)

  outs, grads, plain_out = run(layer, plain)
  for got, want in outs:
    assert rel_err(got, want) < 1e-5
  leaves = jax.tree.leaves(grads)
  assert leaves and all(np.isfinite(np.asarray(g)).all() and np.any(np.asarray(g))
                        for g in leaves)
  assert rel_err(outs[0][0], plain_out) > 0.02


def test_attention_fn_calls_the_pattern_on_flattened_batch(rng):
  shape = (2, 3, 16, 2, 8)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
  seen = []

  def pattern(query, key):
    seen.append((query.shape, key.shape))
    return nmattn.patterns.topk_blocks(query, key, block_q=8, block_k=8, k=1)

  got = nmattn.nm_dot_product_attention(q, k, v, n=2, m=4, block_pattern=pattern)
  flat = lambda x: x.reshape(6, 16, 2, 8)
  want = nmattn.nm_attention(flat(q), flat(k), flat(v), n=2, m=4,
                             block_pattern=pattern(flat(q), flat(k)))
  assert seen[0] == ((6, 16, 2, 8), (6, 16, 2, 8))
  assert rel_err(got.reshape(6, 16, 2, 8), want) < 1e-6
  with pytest.raises(ValueError, match=r"block_pattern\(query, key\) must return "
                     "an nmattn.BlockPattern; got ndarray"):
    nmattn.nm_dot_product_attention(
        q, k, v, block_pattern=lambda q, k: np.ones((1, 1, 2, 2), np.int8))


@pytest.mark.parametrize("block_pattern,match", [
    ("topk", "block_pattern must be an nmattn.BlockPattern, a function"),
    (np.ones((2, 2), np.int8), "block_pattern must be an nmattn.BlockPattern, a function"),
    (nmattn.BlockPattern(np.ones((2, 2), np.int8), 8, 6),
     "block_pattern.block_k must be a multiple of m=4"),
    (nmattn.BlockPattern(np.ones((2, 2), np.int32), 8, 8),
     "block_pattern.modes.dtype=int32"),
    (nmattn.BlockPattern(np.full((2, 2), 3, np.int8), 8, 8), r"got values \[3\]"),
    (nmattn.BlockPattern(np.ones((1, 1, 1, 2, 2), np.int8), 8, 8),
     r"block_pattern.modes must have rank <= 4.*\(1, 1, 1, 2, 2\)"),
], ids=["string", "array", "block_k", "int32", "value3", "rank5"])
def test_layers_validate_block_pattern_at_construction(block_pattern, match):
  with pytest.raises(ValueError, match=match):
    nmattn.nnx.NMMultiHeadAttention(num_heads=2, in_features=16, decode=False,
                                    rngs=nnx.Rngs(0), block_pattern=block_pattern)
  with pytest.raises(ValueError, match=match):
    nmattn.layers.NMMultiHeadDotProductAttention(num_heads=2,
                                                 block_pattern=block_pattern)
  with pytest.raises(ValueError, match=match):
    nmattn.layers.NMSelfAttention(num_heads=2, block_pattern=block_pattern)
