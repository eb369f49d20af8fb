"""experiments.hierarchical at a tiny size: a random-weight encoder, every
kept-score fraction checked against a hand count, and fidelity against the
2:4 and dense runs."""

import functools

import jax
import numpy as np
import pytest

from experiments import hierarchical
from experiments.hierarchical import Variant
from experiments.models.attention import AttentionSpec
from experiments.models.transformer import SentenceEncoder, TransformerConfig
from nmattn import patterns

LENGTH, BLOCK = 32, 8  # 4 x 4 blocks


def _all_dense(query, key):
  pattern = hierarchical.all_nm(query.shape[-3], key.shape[-3], block_q=BLOCK,
                                block_k=BLOCK)
  return patterns.with_mode(pattern, patterns.DENSE)


def _all_nm(query, key):
  return hierarchical.all_nm(query.shape[-3], key.shape[-3], block_q=BLOCK,
                             block_k=BLOCK)


@pytest.fixture(scope="module")
def rows():
  config = TransformerConfig(vocab_size=50, max_len=LENGTH, hidden_size=32,
                             num_heads=2, mlp_size=64, num_layers=2)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 50, (6, LENGTH)).astype(np.int32)
  query_mask = np.arange(LENGTH)[None, :] < rng.integers(9, LENGTH, (6, 1))
  # Under jit: eagerly each op of the init compiles on its own.
  params = jax.jit(SentenceEncoder(config, AttentionSpec("dense")).init)(
      jax.random.key(1), tokens, query_mask)["params"]
  inputs = {"query_tokens": tokens[::-1].copy(), "query_mask": query_mask,
            "code_tokens": tokens, "code_mask": np.ones_like(query_mask)}
  band = functools.partial(hierarchical.band_and_sinks, block=BLOCK, width=1,
                           sink_blocks=1)
  variant_list = [
      Variant("dense", "dense", AttentionSpec("dense")),
      Variant("2:4", "2:4 alone", AttentionSpec("nm", 2, 4)),
      Variant("all NM", "pattern", AttentionSpec("pattern", 2, 4,
                                                 block_pattern=_all_nm)),
      Variant("all dense", "pattern", AttentionSpec("pattern", 2, 4,
                                                    block_pattern=_all_dense)),
      Variant("band", "pattern", AttentionSpec("pattern", 2, 4,
                                               block_pattern=band))]
  return {r["label"]: r for r in hierarchical.evaluate(
      params, config, inputs, variant_list, batch_size=6)}


def test_fractions_and_fidelity(rows):
  assert rows["dense"]["code_cosine"] == pytest.approx(1.0, abs=1e-6)
  # Full-length codes: 2:4 keeps exactly half; an all-NM pattern is 2:4.
  for label in ("2:4", "all NM"):
    assert rows[label]["score_fraction"] == 0.5
    assert rows[label]["block_fraction"] == 1.0
  assert rows["all NM"]["code_cosine"] == pytest.approx(
      rows["2:4"]["code_cosine"], abs=1e-5)
  assert rows["2:4"]["code_cosine"] < 0.9999
  assert rows["all dense"]["score_fraction"] == 1.0
  assert rows["all dense"]["code_cosine"] == pytest.approx(1.0, abs=1e-5)
  # Diagonal and first key block dense: 7 dense and 9 NM blocks of 16.
  assert rows["band"]["score_fraction"] == (7 + 9 / 2) / 16
  assert rows["2:4"]["code_cosine"] < rows["band"]["code_cosine"] < 1.0
  for r in rows.values():
    assert 0.0 <= r["recall_at_1"] <= 1.0 and np.isfinite(r["mrr"])


def test_cheapest_and_report(rows, tmp_path):
  ordered = list(rows.values())
  best = hierarchical.cheapest_reaching(ordered, target=0.0)
  assert best["score_fraction"] == 0.5 and best["label"] in ("2:4", "all NM")
  assert hierarchical.cheapest_reaching(ordered, target=1.1) is None
  doc, plot = tmp_path / "h.md", tmp_path / "h.png"
  setup = {"num_pairs": 6, "code_len": LENGTH, "query_len": LENGTH,
           "block": BLOCK}
  hierarchical.write_report({"setup": setup, "rows": ordered}, doc, plot)
  text = doc.read_text()
  assert all(f"| {label} |" in text for label in rows)
  # "all dense" reaches the target, so the cheapest one is named.
  expected = hierarchical.cheapest_reaching(ordered)
  assert f"reaching it: **{expected['label']}**" in text
  assert plot.stat().st_size > 1000


def test_bad_inputs():
  with pytest.raises(ValueError, match="variant_list"):
    hierarchical.evaluate({}, None, {}, [Variant("2:4", "2:4", AttentionSpec("nm"))],
                          batch_size=1)
  with pytest.raises(ValueError, match="block_pattern"):
    AttentionSpec("pattern")
  with pytest.raises(ValueError, match="block_pattern"):
    AttentionSpec("nm", block_pattern=_all_nm)
  assert AttentionSpec("pattern", block_pattern=_all_nm).density is None
