"""BERT-style encoder and GPT-style causal decoder whose attention is nmattn's.

Both take an `AttentionSpec` (dense, n:m, top-k, local window) and build every
attention layer with `experiments.models.attention.multi_head_attention`, so the
parameter tree does not depend on the kind: a dense checkpoint runs unchanged
with N:M attention. The encoder's layout and names mirror BERT (post-LayerNorm,
erf GELU, token-type embeddings) so that pretrained MiniLM weights load into it
(`experiments.models.minilm`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import linen as nn

from experiments.models.attention import AttentionSpec, multi_head_attention


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

  def __post_init__(self):
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


def _attention(config: TransformerConfig, spec: AttentionSpec, name: str):
  return multi_head_attention(
      spec, num_heads=config.num_heads,
      dropout_rate=config.attention_dropout_rate, name=name)


class EncoderLayer(nn.Module):
  """Post-LayerNorm BERT layer: `[batch, len, hidden]` -> same."""
  config: TransformerConfig
  attention: AttentionSpec

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    cfg = self.config
    y = _attention(cfg, self.attention, "attention")(
        x, mask=mask, deterministic=deterministic)
    y = nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, name="attention_ln")(x + y)
    y = nn.Dense(cfg.mlp_size, name="mlp_in")(x)
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(cfg.hidden_size, name="mlp_out")(y)
    y = nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    return nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, name="mlp_ln")(x + y)


class Encoder(nn.Module):
  """BERT-style bidirectional encoder.

  `__call__(tokens [batch, len] int, padding_mask [batch, len] bool)` returns
  the last hidden states `[batch, len, hidden_size]`; padded keys are masked
  before the attention pruning chooses its survivors.
  """
  config: TransformerConfig
  attention: AttentionSpec

  @nn.compact
  def __call__(self, tokens, padding_mask, deterministic: bool = True):
    cfg = self.config
    if tokens.shape[-1] > cfg.max_len:
      raise ValueError(f"sequence length must be <= max_len={cfg.max_len}; "
                       f"got tokens.shape={tokens.shape}")
    positions = jnp.arange(tokens.shape[-1])[None, :]
    x = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings")(tokens)
    x = x + nn.Embed(cfg.max_len, cfg.hidden_size,
                     name="position_embeddings")(positions)
    x = x + nn.Embed(cfg.type_vocab_size, cfg.hidden_size,
                     name="token_type_embeddings")(jnp.zeros_like(tokens))
    x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, name="embeddings_ln")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    mask = nn.make_attention_mask(padding_mask, padding_mask)
    for i in range(cfg.num_layers):
      x = EncoderLayer(cfg, self.attention, name=f"layer_{i}")(
          x, mask, deterministic)
    return x


def mean_pool(hidden, padding_mask):
  """Mean over valid positions: `[batch, len, d]`, `[batch, len]` -> `[batch, d]`."""
  weights = padding_mask.astype(hidden.dtype)[..., None]
  return jnp.sum(hidden * weights, axis=-2) / jnp.maximum(
      jnp.sum(weights, axis=-2), 1e-9)


class SentenceEncoder(nn.Module):
  """Sentence-transformers embedding: encoder, mean pooling, L2 normalisation.

  `(tokens [batch, len], padding_mask [batch, len])` -> `[batch, hidden]`
  unit vectors.
  """
  config: TransformerConfig
  attention: AttentionSpec

  @nn.compact
  def __call__(self, tokens, padding_mask, deterministic: bool = True):
    hidden = Encoder(self.config, self.attention, name="encoder")(
        tokens, padding_mask, deterministic)
    pooled = mean_pool(hidden, padding_mask)
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
  """Pre-LayerNorm GPT layer: `[batch, len, hidden]` -> same."""
  config: TransformerConfig
  attention: AttentionSpec

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    cfg = self.config
    y = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, name="attention_ln")(x)
    y = _attention(cfg, self.attention, "attention")(
        y, mask=mask, deterministic=deterministic)
    x = x + nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    y = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, name="mlp_ln")(x)
    y = nn.gelu(nn.Dense(cfg.mlp_size, name="mlp_in")(y))
    y = nn.Dense(cfg.hidden_size, name="mlp_out")(y)
    return x + nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)


class Decoder(nn.Module):
  """GPT-style causal language model with tied input/output embeddings.

  `tokens [batch, len] int` -> next-token logits `[batch, len, vocab_size]`.
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
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    mask = nn.make_causal_mask(tokens)
    for i in range(cfg.num_layers):
      x = DecoderLayer(cfg, self.attention, name=f"layer_{i}")(
          x, mask, deterministic)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, name="final_ln")(x)
    return embed.attend(x)
