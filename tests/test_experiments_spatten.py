"""experiments.spatten at tiny sizes: schedules, FLOPs, fidelity and KV-budget bits per byte."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import optax
import pytest

from experiments import spatten, tasks
from experiments.models.transformer import (Decoder, SentenceEncoder,
                                            TransformerConfig)

TINY = TransformerConfig(vocab_size=40, max_len=12, hidden_size=16,
                         num_heads=2, mlp_size=24, num_layers=3)


def test_keep_schedule_and_lengths():
  assert spatten.keep_schedule(3, 0.5) == (0.75, 0.5, 0.5)
  assert spatten.keep_schedule(3, 0.5, "early") == (0.5, 0.5, 0.5)
  assert spatten.layer_lengths(3, 12, (0.75, 0.5, 0.5)) == (12, 9, 6)
  assert spatten.layer_lengths(3, 12) == (12, 12, 12)
  for kwargs, match in (({"num_layers": 1}, "num_layers=1"),
                        ({"final_keep": 0.0}, "final_keep=0.0"),
                        ({"final_keep": 1.5}, "final_keep=1.5"),
                        ({"shape": "cubic"}, "shape='cubic'")):
    args = {"num_layers": 3, "final_keep": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
      spatten.keep_schedule(**args)


def test_encoder_flops_counts_each_layer_at_its_length():
  d, f = TINY.hidden_size, TINY.mlp_size
  layer = lambda s: 8 * s * d * d + 4 * s * s * d + 4 * s * d * f
  unpruned = spatten.encoder_flops(TINY, 12)
  assert unpruned == {"forward": 3 * layer(12), "importance": 0.0}
  pruned = spatten.encoder_flops(TINY, 12, (0.75, 0.5, 0.5))
  assert pruned["forward"] == layer(12) + layer(9) + layer(6)
  # Importance is computed in the two layers that prune, not in the last.
  assert pruned["importance"] == sum(4 * s * d * d + 2 * s * s * d
                                     for s in (12, 9))


def _inputs(rng, num, length):
  tokens = rng.integers(1, TINY.vocab_size, (num, length)).astype(np.int32)
  valid = rng.integers(3, length + 1, num)
  mask = np.arange(length)[None, :] < valid[:, None]
  return tokens, mask


def test_encoder_fidelity_against_the_unpruned_dense_model():
  rng = np.random.default_rng(0)
  # Both sides of one length, so each run compiles one encoder.
  query_tokens, query_mask = _inputs(rng, 6, 8)
  code_tokens, code_mask = _inputs(rng, 6, 8)
  inputs = {"query_tokens": query_tokens, "query_mask": query_mask,
            "code_tokens": code_tokens, "code_mask": code_mask}
  config = dataclasses.replace(TINY, num_layers=2)
  encoder = SentenceEncoder(config, spatten.DENSE)
  params = encoder.init(jax.random.key(1), code_tokens[:1],
                        code_mask[:1])["params"]
  runs = [("dense unpruned", spatten.DENSE, ()),
          ("2:4 pruned", spatten.NM24, spatten.keep_schedule(2, 0.5))]
  # batch_size 4 does not divide 6: the last batch is filled up.
  dense, pruned = spatten.encoder_fidelity(config, params, inputs, runs,
                                           batch_size=4)
  apply = jax.jit(encoder.apply)
  reference = {side: apply({"params": params}, inputs[f"{side}_tokens"],
                           inputs[f"{side}_mask"])
               for side in ("query", "code")}
  expected = tasks.retrieval_metrics(reference["query"] @ reference["code"].T)
  assert dense["recall_at_1"] == expected["recall_at_1"]
  assert dense["mrr"] == pytest.approx(expected["mrr"])
  assert dense["cosine_to_dense"] == pytest.approx(1.0, abs=1e-5)
  assert (dense["gained"], dense["lost"]) == (0, 0)
  assert pruned["cosine_to_dense"] < 0.9999
  assert pruned["queries"] == 6
  assert pruned["code"]["layer_lengths"] == [8, 4]
  kept = np.minimum(code_mask.sum(-1), 4) / code_mask.sum(-1)
  assert pruned["code"]["real_tokens_kept_by_last_layer"] == pytest.approx(
      np.mean(kept))


def test_kv_budget_bits_per_byte():
  rng = np.random.default_rng(2)
  config = TransformerConfig(vocab_size=256, max_len=10, hidden_size=16,
                             num_heads=2, mlp_size=24, num_layers=1)
  windows = rng.integers(0, 256, (3, 11)).astype(np.int32)
  model = Decoder(config, spatten.DENSE)
  params = model.init(jax.random.key(3), windows[:, :-1])["params"]
  result = spatten.kv_budget_bits_per_byte(params, config, spatten.DENSE,
                                           windows, budgets=(4,))
  losses = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": params}, windows[:, :-1]), windows[:, 1:]))
  full = np.mean(losses) / math.log(2)
  assert result["full_bits_per_byte"] == pytest.approx(full, rel=1e-6)
  assert result["cached_full_budget_bits_per_byte"] == pytest.approx(
      full, abs=1e-4)
  assert [(r["budget"], r["policy"]) for r in result["rows"]] == [
      (4, "importance"), (4, "recent")]
  for row in result["rows"]:
    # Positions before the budget see their whole prefix under any policy.
    prefix = (row["bits_per_byte"] * 10
              - row["bits_per_byte_past_budget"] * 6) / 4
    assert prefix == pytest.approx(np.mean(losses[:, :4]) / math.log(2),
                                   abs=1e-4)
    assert row["full_bits_per_byte_past_budget"] == pytest.approx(
        np.mean(losses[:, 4:]) / math.log(2), rel=1e-6)
    assert row["bits_per_byte_past_budget"] != pytest.approx(
        np.mean(losses[:, 4:]) / math.log(2), abs=1e-4)
  with pytest.raises(ValueError, match="budget=10"):
    spatten.kv_budget_bits_per_byte(params, config, spatten.DENSE, windows,
                                    budgets=(10,))
