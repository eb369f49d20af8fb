"""experiments.models: attention kinds, encoder and decoder."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import nmattn
from experiments.models import attention
from experiments.models.attention import AttentionSpec
from experiments.models.transformer import (Decoder, SentenceEncoder,
                                            SequenceClassifier,
                                            TransformerConfig)

KINDS = [AttentionSpec("dense"), AttentionSpec("nm", 2, 4),
         AttentionSpec("nm", 1, 2), AttentionSpec("topk", 2, 4),
         AttentionSpec("local", 2, 4)]
TINY = TransformerConfig(vocab_size=50, max_len=24, hidden_size=32,
                         num_heads=2, mlp_size=64, num_layers=1)


def test_spec_rejects_bad_values():
  with pytest.raises(ValueError, match="kind='sparse'"):
    AttentionSpec("sparse")
  with pytest.raises(ValueError, match="m=3"):
    AttentionSpec("nm", 1, 3)
  with pytest.raises(ValueError, match="n=5"):
    AttentionSpec("nm", 5, 4)
  with pytest.raises(ValueError, match="num_heads=3"):
    TransformerConfig(vocab_size=8, max_len=8, hidden_size=32, num_heads=3)


def test_density_keep_mask_keeps_ceil_density_of_valid(rng):
  priority = jnp.asarray(rng.standard_normal((3, 7, 19)), jnp.float32)
  valid = jnp.asarray(rng.random((3, 7, 19)) < 0.7)
  for density in (0.25, 0.5, 1.0):
    keep = np.asarray(attention.density_keep_mask(priority, valid, density))
    num_valid = np.asarray(valid).sum(-1)
    np.testing.assert_array_equal(keep.sum(-1), np.ceil(density * num_valid))
    assert not (keep & ~np.asarray(valid)).any()
    # Kept scores are the largest valid ones.
    masked = np.where(np.asarray(valid), np.asarray(priority), -np.inf)
    lowest_kept = np.where(keep, masked, np.inf).min(-1)
    highest_dropped = np.where(~keep & np.asarray(valid), masked, -np.inf).max(-1)
    assert (lowest_kept > highest_dropped).all()


def _numpy_attention(q, k, v, keep):
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  s = np.where(keep, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def test_topk_attention_matches_numpy(rng):
  q, k, v = (rng.standard_normal((2, 12, 3, 8)).astype(np.float32)
             for _ in range(3))
  out = attention.density_attention(q, k, v, kind="topk", density=0.5,
                                    is_causal=True)
  s = np.einsum("bqhd,bkhd->bhqk", q, k)
  causal = np.tril(np.ones((12, 12), bool))
  keep = np.zeros_like(causal, shape=s.shape)
  for idx in np.ndindex(s.shape[:3]):
    row = np.where(causal[idx[2]], s[idx], -np.inf)
    count = math.ceil(0.5 * causal[idx[2]].sum())
    keep[idx][np.argsort(-row)[:count]] = True
  np.testing.assert_allclose(out, _numpy_attention(q, k, v, keep), rtol=1e-5,
                             atol=1e-5)


def test_local_attention_keeps_the_nearest_keys(rng):
  q, k, v = (rng.standard_normal((1, 10, 1, 4)).astype(np.float32)
             for _ in range(3))
  out = attention.density_attention(q, k, v, kind="local", density=0.3)
  # ceil(0.3 * 10) = 3 keys: the query and its two neighbours; at the edges
  # the window shifts inward (ties go left).
  keep = np.zeros((1, 1, 10, 10), bool)
  for i in range(10):
    window = sorted(range(10), key=lambda j: (abs(i - j), j > i))[:3]
    keep[0, 0, i, window] = True
  np.testing.assert_allclose(out, _numpy_attention(q, k, v, keep), rtol=1e-5,
                             atol=1e-5)


def test_every_kind_shares_flax_params_and_dense_is_flax(rng):
  x = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
  mask = nn.make_attention_mask(jnp.arange(16) < 13, jnp.arange(16) < 13)[None]
  flax_layer = nn.MultiHeadDotProductAttention(num_heads=4)
  params = flax_layer.init(jax.random.key(0), x)
  # Query rows 13.. see no key: Flax averages them, nmattn gives zeros.
  expected = flax_layer.apply(params, x, mask=mask)[:, :13]
  for spec in KINDS:
    layer = attention.multi_head_attention(spec, num_heads=4)
    assert (jax.tree.structure(layer.init(jax.random.key(1), x))
            == jax.tree.structure(params))
    out = jax.jit(layer.apply)(params, x, mask=mask)[:, :13]
    assert out.shape == expected.shape and np.isfinite(out).all()
    if spec.kind == "dense":
      np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    else:
      assert not np.allclose(out, expected, atol=1e-3), spec.label


def test_nm_kind_is_nmattn_inside_the_layer(rng):
  x = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
  layer = attention.multi_head_attention(AttentionSpec("nm", 1, 2),
                                         num_heads=4)
  params = layer.init(jax.random.key(0), x)["params"]
  project = lambda name: jnp.einsum("btf,fhd->bthd", x,
                                    params[name]["kernel"]) + params[name]["bias"]
  heads = nmattn.nm_attention(project("query"), project("key"),
                              project("value"), n=1, m=2)
  expected = jnp.einsum("bthd,hdf->btf", heads,
                        params["out"]["kernel"]) + params["out"]["bias"]
  np.testing.assert_allclose(jax.jit(layer.apply)({"params": params}, x),
                             expected,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", KINDS[::2], ids=lambda s: s.label)
def test_decoder_is_causal(spec, rng):
  tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 24)))
  model = Decoder(TINY, spec)
  params = jax.jit(model.init)(jax.random.key(0), tokens)
  apply = jax.jit(model.apply)
  logits = apply(params, tokens)
  changed = tokens.at[:, 15:].set((tokens[:, 15:] + 1) % TINY.vocab_size)
  np.testing.assert_allclose(apply(params, changed)[:, :15],
                             logits[:, :15], rtol=1e-5, atol=1e-5)
  assert logits.shape == (2, 24, TINY.vocab_size)


@pytest.mark.parametrize("model", [
    SentenceEncoder(TINY, AttentionSpec("nm", 2, 4)),
    SequenceClassifier(TINY, AttentionSpec("dense"), num_classes=10)],
                         ids=["sentence-2:4", "classifier-dense"])
def test_encoders_ignore_padding(model, rng):
  tokens = jnp.asarray(rng.integers(1, TINY.vocab_size, (2, 20)))
  mask = jnp.arange(20)[None, :] < jnp.asarray([[14], [20]])
  noisy = jnp.where(mask, tokens, (tokens * 7) % TINY.vocab_size)
  params = jax.jit(model.init)(jax.random.key(0), tokens, mask)
  apply = jax.jit(model.apply)
  out = apply(params, tokens, mask)
  np.testing.assert_allclose(apply(params, noisy, mask), out, rtol=1e-5,
                             atol=1e-5)
  if isinstance(model, SentenceEncoder):
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)
