"""experiments.models: attention kinds, encoder and decoder."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import nmattn
import nmattn.importance
import nmattn.patterns
import nmattn.pruning
from experiments.models import attention
from experiments.models.attention import AttentionSpec
from experiments.models.transformer import (Decoder, DecoderLayer, Encoder,
                                            EncoderLayer, SentenceEncoder,
                                            SequenceClassifier,
                                            TransformerConfig, decode_logits,
                                            mean_pool)

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


def _block_pattern():
  return functools.partial(nmattn.patterns.topk_blocks, block_q=8, block_k=8,
                           k=2, local_blocks=1, sink_blocks=0, is_causal=True,
                           mode=nmattn.patterns.NM)


CAUSAL_KINDS = KINDS + [AttentionSpec("pattern", 2, 4,
                                      block_pattern=_block_pattern())]


def _materialised_mask_logits(model, params, tokens):
  """The decoder as it was: every layer given `nn.make_causal_mask`, no is_causal."""
  cfg = model.config
  embed = nn.Embed(cfg.vocab_size, cfg.hidden_size)
  x = embed.apply({"params": params["word_embeddings"]}, tokens)
  x = x + nn.Embed(cfg.max_len, cfg.hidden_size).apply(
      {"params": params["position_embeddings"]},
      jnp.arange(tokens.shape[-1])[None])
  for i in range(cfg.num_layers):
    x = DecoderLayer(cfg, model.attention, is_causal=False).apply(
        {"params": params[f"layer_{i}"]}, x, nn.make_causal_mask(tokens), True)
  x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon).apply(
      {"params": params["final_ln"]}, x)
  return embed.apply({"params": params["word_embeddings"]}, x,
                     method=nn.Embed.attend)


@pytest.mark.parametrize("spec", CAUSAL_KINDS, ids=lambda s: s.label)
def test_decoder_is_causal_equals_the_materialised_mask(spec, rng):
  """is_causal inside the attention gives the old [S, S] mask's logits."""
  config = dataclasses.replace(TINY, num_layers=2)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 24)))
  model = Decoder(config, spec)
  params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
  logits = jax.jit(model.apply)({"params": params}, tokens)
  expected = jax.jit(functools.partial(_materialised_mask_logits, model))(
      params, tokens)
  assert logits.dtype == expected.dtype == jnp.float32
  np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", CAUSAL_KINDS[:2], ids=lambda s: s.label)
def test_causal_decoder_layer_takes_a_padding_mask_too(spec, rng):
  """A mask beside is_causal (padded keys) is the two masks combined."""
  x = jnp.asarray(rng.standard_normal((2, 24, TINY.hidden_size)), jnp.float32)
  lengths = jnp.asarray([17, 24])
  padding = (jnp.arange(24)[None] < lengths[:, None])[:, None, None, :]
  causal = DecoderLayer(TINY, spec)
  params = causal.init(jax.random.key(0), x, padding, True)
  got = jax.jit(causal.apply)(params, x, padding, True)
  combined = nn.make_causal_mask(x[..., 0]).astype(bool) & padding
  expected = jax.jit(DecoderLayer(TINY, spec, is_causal=False).apply)(
      params, x, combined, True)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  unpadded = jax.jit(causal.apply)(params, x, None, True)
  assert not np.allclose(got[0, 17:], unpadded[0, 17:], atol=1e-3)
  np.testing.assert_allclose(got[:, :17], unpadded[:, :17], rtol=1e-6,
                             atol=1e-6)


def test_causal_cudnn_kind_passes_is_causal_to_jax_nn(rng):
  """The cudnn kind of a causal layer: jax.nn's is_causal (XLA on the CPU)."""
  layer = attention.multi_head_attention(AttentionSpec("cudnn"), num_heads=4,
                                         is_causal=True)
  assert layer.attention_fn.func is attention.cudnn_attention
  assert layer.attention_fn.keywords == {"is_causal": True}
  x = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
  through_xla = nn.MultiHeadDotProductAttention(
      num_heads=4, attention_fn=functools.partial(layer.attention_fn,
                                                  implementation="xla"))
  params = through_xla.init(jax.random.key(0), x)
  masked = nn.MultiHeadDotProductAttention(num_heads=4).apply(
      params, x, mask=nn.make_causal_mask(x[..., 0]))
  np.testing.assert_allclose(jax.jit(through_xla.apply)(params, x), masked,
                             rtol=1e-5, atol=1e-6)


def _nmattn_input_dtypes(fn, *args):
  """dtypes of the float `[batch, len, heads, head_dim]` operands (q, k, v)
  of every custom VJP call in `fn`'s jaxpr: the nmattn backends' entry
  points (no other part of the decoder has a custom VJP)."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if "custom_vjp" in eqn.primitive.name:
        found.extend(str(v.aval.dtype) for v in eqn.invars
                     if getattr(v.aval, "ndim", 0) == 4
                     and jnp.issubdtype(v.aval.dtype, jnp.floating))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


BF16 = dataclasses.replace(TINY, dtype="bfloat16")


@pytest.mark.parametrize("spec", [CAUSAL_KINDS[0], CAUSAL_KINDS[1],
                                  CAUSAL_KINDS[-1]], ids=lambda s: s.label)
def test_bfloat16_decoder_gives_nmattn_bfloat16_inputs(spec, rng):
  tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 24)))
  params = Decoder(TINY, spec).init(jax.random.key(0), tokens)
  for config, dtype in ((TINY, "float32"), (BF16, "bfloat16")):
    model = Decoder(config, spec)
    # Parameters stay float32 (one checkpoint for both), logits float32.
    assert (jax.tree.structure(model.init(jax.random.key(0), tokens))
            == jax.tree.structure(params))
    dtypes = _nmattn_input_dtypes(model.apply, params, tokens)
    # q, k and v of each of the layer's attention calls.
    assert len(dtypes) >= 3 and set(dtypes) == {dtype}, dtypes
    assert model.apply(params, tokens).dtype == jnp.float32


@pytest.mark.parametrize("spec", KINDS[:2], ids=lambda s: s.label)
def test_bfloat16_decoder_trains(spec, rng):
  """A few AdamW steps on one batch: finite, decreasing float32 loss, near
  the float32 model's."""
  windows = jnp.asarray(rng.integers(0, TINY.vocab_size, (4, 25)))
  params = Decoder(TINY, spec).init(jax.random.key(0), windows[:, :-1])
  tx = optax.adamw(3e-3)

  def train(config):
    model = Decoder(config, spec)

    def loss_fn(params):
      logits = model.apply(params, windows[:, :-1])
      assert logits.dtype == jnp.float32
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, windows[:, 1:]).mean()

    @jax.jit
    def step(state, _):
      params, opt_state = state
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (trained, _), losses = jax.lax.scan(step, (params, tx.init(params)),
                                        length=8)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trained))
    return np.asarray(losses)

  losses, reference = train(BF16), train(TINY)
  assert np.isfinite(losses).all()
  assert (np.diff(losses) < 0).all(), losses
  np.testing.assert_allclose(losses, reference, rtol=2e-2)


def test_compute_dtype_is_checked(rng):
  assert dataclasses.replace(TINY, dtype=jnp.bfloat16).dtype == "bfloat16"
  assert TINY.dtype is None
  for bad in ("float16", "int8", "bf16"):
    with pytest.raises(ValueError, match=f"dtype='?{bad}'?"):
      dataclasses.replace(TINY, dtype=bad)
  tokens, mask = _tokens_and_mask(rng)
  with pytest.raises(ValueError, match="encoder runs in float32 only.*"
                     "dtype='bfloat16'"):
    Encoder(BF16, AttentionSpec("dense")).init(jax.random.key(0), tokens, mask)
  params = Decoder(TINY, AttentionSpec("dense")).init(
      jax.random.key(0), tokens)["params"]
  with pytest.raises(ValueError, match="cached decoding runs in float32 only"):
    decode_logits(params, tokens, config=BF16, attention=AttentionSpec("dense"),
                  budget=8)


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


PRUNED = dataclasses.replace(TINY, num_layers=2, token_keep=(8, 8))


def _tokens_and_mask(rng, lengths=(14, 20)):
  tokens = jnp.asarray(rng.integers(1, TINY.vocab_size, (len(lengths), 20)))
  mask = jnp.arange(20)[None, :] < jnp.asarray(lengths)[:, None]
  return tokens, mask


def test_encoder_without_pruning_is_the_plain_layer_stack(rng):
  """token_keep=() runs exactly the layers one after another, as before."""
  tokens, mask = _tokens_and_mask(rng)
  spec = AttentionSpec("nm", 2, 4)
  config = dataclasses.replace(PRUNED, token_keep=())
  encoder = Encoder(config, spec)
  params = encoder.init(jax.random.key(0), tokens, mask)["params"]
  hidden, kept = jax.jit(functools.partial(encoder.apply, return_kept=True))(
      {"params": params}, tokens, mask)

  @jax.jit
  def plain_stack(params, tokens, mask):
    x = sum(nn.Embed(n, config.hidden_size).apply({"params": params[name]}, ids)
            for name, n, ids in (
                ("word_embeddings", config.vocab_size, tokens),
                ("position_embeddings", config.max_len, jnp.arange(20)[None]),
                ("token_type_embeddings", 2, jnp.zeros_like(tokens))))
    x = nn.LayerNorm(epsilon=config.layer_norm_epsilon).apply(
        {"params": params["embeddings_ln"]}, x)
    attention_mask = nn.make_attention_mask(mask, mask)
    for i in range(2):
      x = EncoderLayer(config, spec).apply({"params": params[f"layer_{i}"]}, x,
                                           attention_mask, True)
    return x

  x = plain_stack(params, tokens, mask)
  np.testing.assert_array_equal(hidden, x)
  np.testing.assert_array_equal(kept, mask)


def test_token_type_gradient_is_a_sum_not_a_per_token_scatter(rng):
  """The token-type row is looked up once and broadcast: its gradient is the
  per-token lookup's (the sum over tokens) without a scatter-add of every
  token into row 0."""
  tokens, mask = _tokens_and_mask(rng)
  config = dataclasses.replace(PRUNED, token_keep=())
  encoder = Encoder(config, AttentionSpec("dense"))
  params = encoder.init(jax.random.key(0), tokens, mask)["params"]
  weights = jnp.asarray(rng.standard_normal((*tokens.shape,
                                             config.hidden_size)), jnp.float32)
  loss = lambda p: (encoder.apply({"params": p}, tokens, mask) * weights).sum()

  def per_token_loss(p):
    # The same encoder with the type embedding added token by token.
    def per_token_embed(next_fun, args, kwargs, context):
      if (context.module.name == "token_type_embeddings"
          and context.method_name == "__call__"):
        return next_fun(jnp.zeros_like(tokens))
      return next_fun(*args, **kwargs)
    with nn.intercept_methods(per_token_embed):
      return loss(p)

  grads = jax.grad(loss)(params)
  expected = jax.grad(per_token_loss)(params)
  assert per_token_loss(params) == pytest.approx(float(loss(params)), rel=1e-6)
  np.testing.assert_allclose(
      grads["token_type_embeddings"]["embedding"],
      expected["token_type_embeddings"]["embedding"], rtol=2e-5, atol=1e-5)
  assert np.abs(grads["token_type_embeddings"]["embedding"][0]).max() > 0

  def scatter_rows(fn):
    """Rows of updates of each scatter-add into the [2, hidden] table,
    nested jaxprs (`jnp.take`'s own jit) included."""
    def walk(jaxpr):
      for e in jaxpr.eqns:
        if (e.primitive.name == "scatter-add"
            and e.invars[0].aval.shape == (2, config.hidden_size)):
          yield int(np.prod(e.invars[2].aval.shape[:-1]))
        for value in e.params.values():
          inner = getattr(value, "jaxpr", value)
          if hasattr(inner, "eqns"):
            yield from walk(inner)
    return list(walk(jax.make_jaxpr(jax.grad(fn))(params).jaxpr))
  assert scatter_rows(loss) == [1]
  assert scatter_rows(per_token_loss) == [tokens.size]


def test_keeping_every_token_matches_the_unpruned_encoder(rng):
  tokens, mask = _tokens_and_mask(rng)
  spec = AttentionSpec("dense")
  pruned = SentenceEncoder(dataclasses.replace(PRUNED, token_keep=(1.0, 20)),
                           spec)
  plain = SentenceEncoder(dataclasses.replace(PRUNED, token_keep=()), spec)
  params = plain.init(jax.random.key(0), tokens, mask)
  assert (jax.tree.structure(pruned.init(jax.random.key(0), tokens, mask))
          == jax.tree.structure(params))
  np.testing.assert_allclose(jax.jit(pruned.apply)(params, tokens, mask),
                             jax.jit(plain.apply)(params, tokens, mask),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", [AttentionSpec("dense"),
                                  AttentionSpec("nm", 1, 2)],
                         ids=lambda s: s.label)
def test_encoder_prunes_to_the_most_important_tokens(spec, rng):
  """Keep 8 of 20 after layer 0: layer 1 runs on those 8 only."""
  tokens, mask = _tokens_and_mask(rng, lengths=(6, 20))
  encoder = Encoder(PRUNED, spec)
  params = encoder.init(jax.random.key(0), tokens, mask)["params"]
  (hidden, kept), state = jax.jit(functools.partial(
      encoder.apply, return_kept=True, capture_intermediates=True,
      mutable=["intermediates"]))({"params": params}, tokens, mask)
  captured = state["intermediates"]
  attention = captured["layer_0"]["attention"]
  n = spec.m if spec.kind == "dense" else spec.n
  importance = nmattn.importance.key_importance(
      attention["query"]["__call__"][0], attention["key"]["__call__"][0],
      mask=nn.make_attention_mask(mask, mask).astype(bool), n=n, m=spec.m)
  expected = nmattn.pruning.top_indices(
      importance.sum(1), 8, valid=mask, pinned=jnp.arange(20)[None] == 0)
  kept_indices = [np.flatnonzero(row) for row in np.asarray(kept)]
  # Row 0 has 6 real tokens: all of them, then the best 2 padding tokens
  # (which the kept mask does not count).
  np.testing.assert_array_equal(kept_indices[0], np.arange(6))
  np.testing.assert_array_equal(kept_indices[1], expected[1])
  assert kept[:, 0].all()
  layer_0, _ = captured["layer_0"]["__call__"][0]  # (states, importance)
  dropped = ~np.isin(np.arange(20), np.asarray(expected[1]))
  np.testing.assert_array_equal(hidden[1, dropped], layer_0[1, dropped])
  gathered, valid = nmattn.pruning.gather_tokens((layer_0, mask), expected)
  layer_1 = EncoderLayer(PRUNED, spec).apply(
      {"params": params["layer_1"]}, gathered,
      nn.make_attention_mask(valid, valid), True)
  np.testing.assert_allclose(hidden[1, expected[1]], layer_1[1], rtol=1e-5,
                             atol=1e-5)


def test_sentence_encoder_pools_kept_or_scattered_tokens(rng):
  tokens, mask = _tokens_and_mask(rng)
  spec = AttentionSpec("nm", 2, 4)
  encoder = Encoder(PRUNED, spec)
  params = encoder.init(jax.random.key(0), tokens, mask)["params"]
  hidden, kept = encoder.apply({"params": params}, tokens, mask,
                               return_kept=True)
  for pooling, over in (("kept", kept), ("scattered", mask)):
    model = SentenceEncoder(dataclasses.replace(PRUNED, token_pooling=pooling),
                            spec)
    got = jax.jit(model.apply)({"params": {"encoder": params}}, tokens, mask)
    pooled = np.asarray(mean_pool(hidden, over))
    np.testing.assert_allclose(
        got, pooled / np.linalg.norm(pooled, axis=-1, keepdims=True),
        rtol=1e-5, atol=1e-6)


def test_token_pruning_rejects_bad_config(rng):
  with pytest.raises(ValueError, match="one entry per layer"):
    dataclasses.replace(PRUNED, token_keep=(8,))
  with pytest.raises(ValueError, match="must not increase"):
    dataclasses.replace(PRUNED, token_keep=(4, 8))
  with pytest.raises(ValueError, match="token_pooling='max'"):
    dataclasses.replace(PRUNED, token_pooling="max")
  tokens, mask = _tokens_and_mask(rng)
  with pytest.raises(ValueError, match="kind='topk'"):
    Encoder(PRUNED, AttentionSpec("topk", 2, 4)).init(jax.random.key(0),
                                                      tokens, mask)


@pytest.mark.parametrize("spec,budget", [(AttentionSpec("dense"), 20),
                                         (AttentionSpec("nm", 2, 4), 24)],
                         ids=["dense", "2:4"])
def test_cached_decoding_matches_the_forward_pass(spec, budget, rng):
  config = dataclasses.replace(TINY, num_layers=2)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 20)))
  params = Decoder(config, spec).init(jax.random.key(0), tokens)["params"]
  full = jax.jit(Decoder(config, spec).apply)({"params": params}, tokens)
  decode = functools.partial(decode_logits, params, tokens, config=config,
                             attention=spec)
  np.testing.assert_allclose(decode(budget=budget), full, rtol=1e-5, atol=1e-5)
  if spec.kind == "dense":
    return
  # Over budget the first 8 positions are unaffected, later ones see less.
  for policy in ("importance", "recent"):
    small = decode(budget=8, policy=policy)
    np.testing.assert_allclose(small[:, :8], full[:, :8], rtol=1e-5, atol=1e-5)
    assert np.isfinite(small).all()
    assert not np.allclose(small[:, 8:], full[:, 8:], atol=1e-3)


def test_cached_decoding_rejects(rng):
  tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (1, 8)))
  params = Decoder(TINY, AttentionSpec("dense")).init(jax.random.key(0),
                                                      tokens)["params"]
  with pytest.raises(ValueError, match="kind='local'"):
    decode_logits(params, tokens, config=TINY,
                  attention=AttentionSpec("local", 2, 4), budget=8)
  with pytest.raises(ValueError, match="max_len=24"):
    decode_logits(params, jnp.zeros((1, 30), jnp.int32), config=TINY,
                  attention=AttentionSpec("dense"), budget=8)
  with pytest.raises(ValueError, match="policy='lru'"):
    decode_logits(params, tokens, config=TINY,
                  attention=AttentionSpec("dense"), budget=8, policy="lru")
