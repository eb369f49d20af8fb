"""BERT-style encoder and GPT-style causal decoder whose attention is nmattn's.

Both take an `AttentionSpec` (dense, n:m, top-k, local window) and build every
attention layer with `experiments.models.attention.multi_head_attention`, so the
parameter tree does not depend on the kind: a dense checkpoint runs unchanged
with N:M attention. The encoder's layout and names mirror BERT (post-LayerNorm,
erf GELU, token-type embeddings) so that pretrained MiniLM weights load into it
(`experiments.models.minilm`).

Token pruning (SpAtten, `nmattn.pruning`): with `TransformerConfig.token_keep`
set, the encoder keeps, after each layer, the tokens of highest cumulative
key importance and runs later layers on those only. The decoder's cached
generation (`decode_logits`, `decoder_step`) keeps a fixed KV cache budget by
evicting entries by importance (`nmattn.pruning.Eviction`). Both are off by
default, so every existing model is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from experiments.models.attention import AttentionSpec, multi_head_attention
from nmattn import pruning
from nmattn.attention import nm_attention
from nmattn.importance import key_importance

TOKEN_POOLINGS = ("kept", "scattered")
# Compute dtypes `TransformerConfig.dtype` may name (or None).
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Sizes of an encoder or decoder."""
  vocab_size: int
  max_len: int
  hidden_size: int = 128
  num_heads: int = 4
  mlp_size: int = 512
  num_layers: int = 2
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-12
  type_vocab_size: int = 2
  # Encoder token pruning: per layer, the tokens kept after it (int counts or
  # float ratios of the input length, `nmattn.pruning.keep_counts`); empty is
  # off. `pin_first_token` always keeps position 0 ([CLS]); `token_pooling`
  # is what SentenceEncoder averages: "kept" (the tokens kept by the last
  # layer) or "scattered" (every valid token, in the state it had when it
  # was removed).
  token_keep: tuple[int | float, ...] = ()
  pin_first_token: bool = True
  token_pooling: str = "kept"
  # The decoder's compute dtype (Flax's `dtype`; parameters keep Flax's
  # `param_dtype`, float32): None infers it from the inputs and parameters
  # as Flax does (float32 for the float32 parameters a model is initialised
  # with); "float32" or "bfloat16" (the GPU kernels' 16-bit tensor-core
  # path) sets the layers' activations and attention inputs, and then the
  # final LayerNorm and the logits are float32. A jnp dtype is kept as its
  # name. The encoder and cached decoding run with None or "float32" only.
  dtype: str | None = None

  def __post_init__(self):
    if self.dtype is not None:
      try:
        name = jnp.dtype(self.dtype).name
      except TypeError:
        name = None
      if name not in DTYPES:
        raise ValueError(f"dtype must be None or one of {DTYPES}; got "
                         f"dtype={self.dtype!r}")
      object.__setattr__(self, "dtype", name)  # frozen: hashable, comparable
    for name in ("vocab_size", "max_len", "hidden_size", "num_heads",
                 "mlp_size", "num_layers"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1; got "
                         f"{name}={getattr(self, name)}")
    if self.hidden_size % self.num_heads:
      raise ValueError("hidden_size must be divisible by num_heads; got "
                       f"hidden_size={self.hidden_size}, "
                       f"num_heads={self.num_heads}")
    for name in ("dropout_rate", "attention_dropout_rate"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"{name} must be in [0, 1); got "
                         f"{name}={getattr(self, name)}")
    if self.token_keep:
      if len(self.token_keep) != self.num_layers:
        raise ValueError(
            f"token_keep must have one entry per layer ({self.num_layers}); "
            f"got token_keep={self.token_keep!r}")
      pruning.keep_counts(self.token_keep, self.max_len)
    if self.token_pooling not in TOKEN_POOLINGS:
      raise ValueError(f"token_pooling must be one of {TOKEN_POOLINGS}; got "
                       f"token_pooling={self.token_pooling!r}")


def _attention(config: TransformerConfig, spec: AttentionSpec, name: str,
               **kwargs):
  return multi_head_attention(
      spec, num_heads=config.num_heads,
      dropout_rate=config.attention_dropout_rate, name=name, **kwargs)


def _require_float32(config: TransformerConfig, what: str) -> None:
  if config.dtype not in (None, "float32"):
    raise ValueError(f"{what} runs in float32 only (a 16-bit dtype is for "
                     f"the Decoder's forward pass); got dtype={config.dtype!r}")


def _importance_nm(spec: AttentionSpec, what: str) -> tuple[int, int]:
  """The `(n, m)` whose probabilities an attention kind computes."""
  if spec.kind not in ("dense", "nm"):
    raise ValueError(f"{what} supports attention kinds 'dense' and 'nm'; got "
                     f"kind={spec.kind!r}")
  return (spec.m if spec.kind == "dense" else spec.n), spec.m


def _project(params, x):
  """A Flax attention projection (`query`, `key`, `value`): `[..., f]` -> `[..., heads, d]`."""
  return jnp.einsum("...f,fhd->...hd", x, params["kernel"]) + params["bias"]


class EncoderLayer(nn.Module):
  """Post-LayerNorm BERT layer: `[batch, len, hidden]` -> same."""
  config: TransformerConfig
  attention: AttentionSpec

  @nn.compact
  def __call__(self, x, mask, deterministic: bool,
               with_importance: bool = False):
    """With `with_importance`, also returns the key importance `[batch, heads, len]`."""
    cfg = self.config
    attention = _attention(cfg, self.attention, "attention")
    y = attention(x, mask=mask, deterministic=deterministic)
    importance = None
    if with_importance:
      n, m = _importance_nm(self.attention, "token pruning")
      params = attention.variables["params"]
      importance = key_importance(
          _project(params["query"], x), _project(params["key"], x),
          mask=mask.astype(bool), n=n, m=m)
    y = nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, name="attention_ln")(x + y)
    y = nn.Dense(cfg.mlp_size, name="mlp_in")(x)
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(cfg.hidden_size, name="mlp_out")(y)
    y = nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, name="mlp_ln")(x + y)
    return (x, importance) if with_importance else x


class Encoder(nn.Module):
  """BERT-style bidirectional encoder.

  `__call__(tokens [batch, len] int, padding_mask [batch, len] bool)` returns
  the last hidden states `[batch, len, hidden_size]`; padded keys are masked
  before the attention pruning chooses its survivors.

  With `config.token_keep`, after layer `l` only the `keep_counts[l]` tokens
  of highest cumulative importance (the key importance of every layer so
  far, summed over heads; padding never kept over real tokens, position 0
  pinned if `pin_first_token`) go on, in their original order. The output
  stays `[batch, len, hidden_size]`: each token holds its state from the last
  layer it ran through. `return_kept=True` also returns the bool
  `[batch, len]` mask of the valid tokens kept by the last layer.
  """
  config: TransformerConfig
  attention: AttentionSpec

  @nn.compact
  def __call__(self, tokens, padding_mask, deterministic: bool = True,
               return_kept: bool = False):
    cfg = self.config
    _require_float32(cfg, "the encoder")
    if tokens.shape[-1] > cfg.max_len:
      raise ValueError(f"sequence length must be <= max_len={cfg.max_len}; "
                       f"got tokens.shape={tokens.shape}")
    positions = jnp.arange(tokens.shape[-1])[None, :]
    x = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings")(tokens)
    x = x + nn.Embed(cfg.max_len, cfg.hidden_size,
                     name="position_embeddings")(positions)
    # Every token is of type 0: look that row up once and broadcast it, so
    # its gradient is a sum over the tokens, not a scatter-add of every
    # token into one row (on XLA:GPU an atomic-contention worst case).
    x = x + nn.Embed(cfg.type_vocab_size, cfg.hidden_size,
                     name="token_type_embeddings")(jnp.zeros((1, 1), jnp.int32))
    x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, name="embeddings_ln")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    if cfg.token_keep:
      x, kept = self._pruned_layers(x, padding_mask, deterministic)
      return (x, kept) if return_kept else x
    mask = nn.make_attention_mask(padding_mask, padding_mask)
    for i in range(cfg.num_layers):
      x = EncoderLayer(cfg, self.attention, name=f"layer_{i}")(
          x, mask, deterministic)
    return (x, padding_mask) if return_kept else x

  def _pruned_layers(self, x, padding_mask, deterministic):
    """The layers with cascade token pruning; returns full-length states and kept mask."""
    cfg = self.config
    batch, length = padding_mask.shape
    counts = pruning.keep_counts(cfg.token_keep, length)
    sizes = (length,) + counts
    prunes = [counts[i] < sizes[i] for i in range(cfg.num_layers)]
    last_prune = max((i for i, p in enumerate(prunes) if p), default=-1)
    full = x
    valid = padding_mask
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32),
                                 (batch, length))
    cumulative = jnp.zeros((batch, length), jnp.float32)
    for i in range(cfg.num_layers):
      mask = nn.make_attention_mask(valid, valid)
      layer = EncoderLayer(cfg, self.attention, name=f"layer_{i}")
      if i > last_prune:
        x = layer(x, mask, deterministic)
        continue
      x, importance = layer(x, mask, deterministic, with_importance=True)
      cumulative = pruning.accumulate_tokens(cumulative, importance)
      if prunes[i]:
        full = pruning.scatter_tokens(full, x, positions)
        pinned = (positions == 0) if cfg.pin_first_token else None
        keep = pruning.top_indices(cumulative, counts[i], valid=valid,
                                   pinned=pinned)
        x, valid, cumulative, positions = pruning.gather_tokens(
            (x, valid, cumulative, positions), keep)
    full = pruning.scatter_tokens(full, x, positions)
    kept = pruning.scatter_tokens(jnp.zeros_like(padding_mask), valid, positions)
    return full, kept


def mean_pool(hidden, padding_mask):
  """Mean over valid positions: `[batch, len, d]`, `[batch, len]` -> `[batch, d]`."""
  weights = padding_mask.astype(hidden.dtype)[..., None]
  return jnp.sum(hidden * weights, axis=-2) / jnp.maximum(
      jnp.sum(weights, axis=-2), 1e-9)


class SentenceEncoder(nn.Module):
  """Sentence-transformers embedding: encoder, mean pooling, L2 normalisation.

  With token pruning, the mean runs over `config.token_pooling`'s tokens.

  `(tokens [batch, len], padding_mask [batch, len])` -> `[batch, hidden]`
  unit vectors.
  """
  config: TransformerConfig
  attention: AttentionSpec

  @nn.compact
  def __call__(self, tokens, padding_mask, deterministic: bool = True):
    encoder = Encoder(self.config, self.attention, name="encoder")
    if self.config.token_keep and self.config.token_pooling == "kept":
      hidden, kept = encoder(tokens, padding_mask, deterministic,
                             return_kept=True)
      pooled = mean_pool(hidden, kept)
    else:
      pooled = mean_pool(encoder(tokens, padding_mask, deterministic),
                         padding_mask)
    return pooled / jnp.maximum(
        jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


class SequenceClassifier(nn.Module):
  """Encoder + classification from the first ([CLS]) position.

  `(tokens [batch, len], padding_mask [batch, len])` -> logits
  `[batch, num_classes]`.
  """
  config: TransformerConfig
  attention: AttentionSpec
  num_classes: int

  @nn.compact
  def __call__(self, tokens, padding_mask, deterministic: bool = True):
    hidden = Encoder(self.config, self.attention, name="encoder")(
        tokens, padding_mask, deterministic)
    pooled = nn.tanh(nn.Dense(self.config.hidden_size, name="pooler")(
        hidden[:, 0]))
    return nn.Dense(self.num_classes, name="classifier")(pooled)


class DecoderLayer(nn.Module):
  """Pre-LayerNorm GPT layer: `[batch, len, hidden]` -> same (in `config.dtype`).

  With `is_causal` (the default) the attention masks later keys itself; a
  `mask` (bool, broadcastable to `[batch, heads, len, len]`, e.g. padding)
  applies on top of that, or alone with `is_causal=False`.
  """
  config: TransformerConfig
  attention: AttentionSpec
  is_causal: bool = True

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    cfg = self.config
    dtype = None if cfg.dtype is None else jnp.dtype(cfg.dtype)
    layer_norm = functools.partial(nn.LayerNorm, epsilon=cfg.layer_norm_epsilon,
                                   dtype=dtype)
    y = layer_norm(name="attention_ln")(x)
    y = _attention(cfg, self.attention, "attention", is_causal=self.is_causal,
                   dtype=dtype)(y, mask=mask, deterministic=deterministic)
    x = x + nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    y = layer_norm(name="mlp_ln")(x)
    y = nn.gelu(nn.Dense(cfg.mlp_size, dtype=dtype, name="mlp_in")(y))
    y = nn.Dense(cfg.hidden_size, dtype=dtype, name="mlp_out")(y)
    return x + nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)


class Decoder(nn.Module):
  """GPT-style causal language model with tied input/output embeddings.

  `tokens [batch, len] int` -> next-token logits `[batch, len, vocab_size]`.
  Every window is full (no padding), so causality is the only mask: the
  layers' `is_causal`. With `config.dtype` set, the layers run in it (from
  the embeddings' float32 sum) and the final LayerNorm's output and the
  logits are float32.
  """
  config: TransformerConfig
  attention: AttentionSpec

  @nn.compact
  def __call__(self, tokens, deterministic: bool = True):
    cfg = self.config
    if tokens.shape[-1] > cfg.max_len:
      raise ValueError(f"sequence length must be <= max_len={cfg.max_len}; "
                       f"got tokens.shape={tokens.shape}")
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings")
    positions = jnp.arange(tokens.shape[-1])[None, :]
    x = embed(tokens) + nn.Embed(cfg.max_len, cfg.hidden_size,
                                 name="position_embeddings")(positions)
    if cfg.dtype is not None:
      x = x.astype(cfg.dtype)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    for i in range(cfg.num_layers):
      x = DecoderLayer(cfg, self.attention, name=f"layer_{i}")(
          x, None, deterministic)
    # With a compute dtype, the logits (and so the loss) are float32.
    x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon,
                     dtype=None if cfg.dtype is None else jnp.float32,
                     name="final_ln")(x)
    return embed.attend(x)


def init_decoder_cache(config: TransformerConfig, batch: int, budget: int,
                       dtype=jnp.float32) -> pruning.KVCache:
  """An empty KV cache of `budget` entries for every layer of a `Decoder`."""
  head_dim = config.hidden_size // config.num_heads
  return pruning.init_kv_cache(config.num_layers, batch, budget,
                               config.num_heads, head_dim, dtype)


def decoder_step(params, config: TransformerConfig, attention: AttentionSpec,
                 cache: pruning.KVCache, tokens, position,
                 policy: str | pruning.Eviction = "importance"):
  """One cached decoding step of a `Decoder` (deterministic).

  Args:
    params: the `Decoder`'s parameters (`variables["params"]`).
    config, attention: the `Decoder`'s fields (kinds "dense" and "nm").
    cache: from `init_decoder_cache` or the previous step.
    tokens: int `[batch]`, the tokens at `position`.
    position: int scalar, the step's position (< `config.max_len`).
    policy: which entry a full cache evicts (`nmattn.pruning.evict`): a
      name of `nmattn.pruning.EVICTION_POLICIES` ("importance": the lowest
      mean attention received per step in the cache, summed over heads and
      layers, the newest half of the budget protected; "recent": the oldest)
      or a `nmattn.pruning.Eviction`.

  Returns:
    next-token logits `[batch, vocab_size]` and the updated cache. While the
    cache has room, this is the `Decoder`'s forward pass at `position`.
  """
  n, m = _importance_nm(attention, "cached decoding")
  _require_float32(config, "cached decoding")
  cfg = config
  apply = lambda module, name, x, p=params: module.apply({"params": p[name]}, x)
  layer_norm = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon)
  embed = nn.Embed(cfg.vocab_size, cfg.hidden_size)
  x = apply(embed, "word_embeddings", tokens) + apply(
      nn.Embed(cfg.max_len, cfg.hidden_size), "position_embeddings",
      jnp.broadcast_to(position, tokens.shape))
  cache, slot = pruning.append(cache, position, policy)
  for i in range(cfg.num_layers):
    layer = params[f"layer_{i}"]
    y = apply(layer_norm, "attention_ln", x, layer)
    heads = {name: _project(layer["attention"][name], y)[:, None]
             for name in ("query", "key", "value")}  # [batch, 1, heads, d]
    cache = pruning.store(cache, i, slot, heads["key"][:, 0],
                          heads["value"][:, 0])
    kwargs = dict(key_value_seq_lengths=cache.length, n=n, m=m)
    out = nm_attention(heads["query"], cache.key[i], cache.value[i], **kwargs)
    cache = pruning.add_importance(
        cache, key_importance(heads["query"], cache.key[i], **kwargs))
    x = x + apply(nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1)), "out",
                  out[:, 0], layer["attention"])
    y = apply(layer_norm, "mlp_ln", x, layer)
    y = nn.gelu(apply(nn.Dense(cfg.mlp_size), "mlp_in", y, layer))
    x = x + apply(nn.Dense(cfg.hidden_size), "mlp_out", y, layer)
  x = apply(layer_norm, "final_ln", x)
  logits = embed.apply({"params": params["word_embeddings"]}, x,
                       method=nn.Embed.attend)
  return logits, cache


@functools.partial(jax.jit, static_argnames=("config", "attention", "budget",
                                             "policy"))
def decode_logits(params, tokens, *, config: TransformerConfig,
                  attention: AttentionSpec, budget: int,
                  policy: str = "importance"):
  """Teacher-forced cached decoding: `tokens [batch, len]` -> logits `[batch, len, vocab]`.

  Each position runs `decoder_step` over a KV cache of `budget` entries, so
  with `budget >= len` this is the `Decoder`'s forward pass, and with a
  smaller one the model sees only the entries `policy` kept.
  """
  if tokens.shape[-1] > config.max_len:
    raise ValueError(f"sequence length must be <= max_len={config.max_len}; "
                     f"got tokens.shape={tokens.shape}")
  cache = init_decoder_cache(config, tokens.shape[0], budget,
                             params["word_embeddings"]["embedding"].dtype)

  def step(cache, position):
    logits, cache = decoder_step(params, config, attention, cache,
                                 tokens[:, position], position, policy)
    return cache, logits

  _, logits = jax.lax.scan(step, cache, jnp.arange(tokens.shape[-1]))
  return jnp.moveaxis(logits, 0, 1)
