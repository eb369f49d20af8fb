"""The "cudnn" attention kind: jax.nn.dot_product_attention behind the
experiments' layers (wiring checked on the CPU through XLA; cuDNN on a GPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from experiments.models import attention
from experiments.models.attention import AttentionSpec
from experiments.models.transformer import Decoder, TransformerConfig


def _inputs(rng, dtype=jnp.float32):
  x = jnp.asarray(rng.standard_normal((2, 16, 32)), dtype)
  valid = jnp.arange(16) < 13
  return x, nn.make_attention_mask(valid, valid)[None]


def test_cudnn_kind_is_flax_dense_attention_through_jax_nn(rng):
  x, mask = _inputs(rng)
  flax_layer = nn.MultiHeadDotProductAttention(num_heads=4)
  params = flax_layer.init(jax.random.key(0), x)
  # The kind's attention_fn with XLA in place of cuDNN, same parameter tree.
  layer = nn.MultiHeadDotProductAttention(
      num_heads=4, attention_fn=functools.partial(attention.cudnn_attention,
                                                  implementation="xla"))
  kind_layer = attention.multi_head_attention(AttentionSpec("cudnn"),
                                              num_heads=4)
  assert isinstance(kind_layer, nn.MultiHeadDotProductAttention)
  assert kind_layer.attention_fn is attention.cudnn_attention
  for m in (mask, None):
    np.testing.assert_allclose(layer.apply(params, x, mask=m)[:, :13],
                               flax_layer.apply(params, x, mask=m)[:, :13],
                               rtol=1e-5, atol=1e-5)
  # The causal decoder mask gives jax.nn's is_causal result.
  q, k, v = (jnp.asarray(rng.standard_normal((2, 12, 4, 8)), jnp.float32)
             for _ in range(3))
  causal = nn.make_causal_mask(jnp.zeros((2, 12)))
  np.testing.assert_allclose(
      attention.cudnn_attention(q, k, v, mask=causal, implementation="xla"),
      jax.nn.dot_product_attention(q, k, v, is_causal=True), rtol=1e-5,
      atol=1e-6)


def test_cudnn_kind_spec():
  spec = AttentionSpec("cudnn")
  assert (spec.label, spec.density) == ("cudnn", 1.0)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU error")
def test_cudnn_kind_refuses_to_run_without_a_gpu(rng):
  x, mask = _inputs(rng, jnp.bfloat16)
  layer = attention.multi_head_attention(AttentionSpec("cudnn"), num_heads=4)
  with pytest.raises(ValueError, match="kind 'cudnn'.*needs a CUDA GPU.*'cpu'"):
    layer.init(jax.random.key(0), x, mask=mask)


@pytest.mark.parametrize("kind", ["cudnn", "topk", "local"])
def test_kinds_without_dropout_refuse_attention_dropout(rng, kind):
  x, _ = _inputs(rng, jnp.bfloat16)
  layer = attention.multi_head_attention(AttentionSpec(kind), num_heads=4,
                                         dropout_rate=0.1)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  with pytest.raises(ValueError, match=f"'{kind}' has no attention dropout; "
                     "got dropout_rate=0.1"):
    layer.init(rngs, x, deterministic=False)
  if kind != "cudnn":  # deterministic calls run (cuDNN needs a GPU to)
    params = layer.init(rngs, x, deterministic=True)
    out = layer.apply(params, x, deterministic=True)
    assert np.isfinite(out.astype(jnp.float32)).all()


@pytest.mark.gpu
def test_cudnn_kind_matches_dense_in_the_decoder_on_a_gpu(rng):
  config = TransformerConfig(vocab_size=64, max_len=128, hidden_size=128,
                             num_heads=2, mlp_size=256, num_layers=2)
  tokens = jnp.asarray(rng.integers(0, 64, (2, 128)))
  params = Decoder(config, AttentionSpec("dense")).init(jax.random.key(0),
                                                         tokens)
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  dense, cudnn = (jax.jit(Decoder(config, AttentionSpec(kind)).apply)(
      params, tokens).astype(jnp.float32) for kind in ("dense", "cudnn"))
  assert np.linalg.norm(cudnn - dense) / np.linalg.norm(dense) < 2e-2
  with pytest.raises(ValueError, match="query.dtype=float32"):
    Decoder(config, AttentionSpec("cudnn")).init(jax.random.key(0), tokens)
