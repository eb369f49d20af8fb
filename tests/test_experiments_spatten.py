"""experiments.spatten at tiny sizes: schedules, FLOPs, fidelity and KV-budget bits per byte."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import spatten, tasks
from experiments.models.attention import AttentionSpec
from experiments.models.transformer import (Decoder, SentenceEncoder,
                                            TransformerConfig)
from nmattn import pruning

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
  # Inits and applies under jit here: eagerly each op compiles on its own.
  params = jax.jit(encoder.init)(jax.random.key(1), code_tokens[:1],
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
  params = jax.jit(model.init)(jax.random.key(3), windows[:, :-1])["params"]
  policies = ("importance", pruning.Eviction("importance", 1), "recent")
  result = spatten.kv_budget_bits_per_byte(params, config, spatten.DENSE,
                                           windows, budgets=(4,),
                                           policies=policies)
  losses = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
      jax.jit(model.apply)({"params": params}, windows[:, :-1]),
      windows[:, 1:]))
  full = np.mean(losses) / math.log(2)
  assert result["full_bits_per_byte"] == pytest.approx(full, rel=1e-6)
  assert result["cached_full_budget_bits_per_byte"] == pytest.approx(
      full, abs=1e-4)
  assert [(r["budget"], r["policy"], r["score"], r["recent_entries"])
          for r in result["rows"]] == [
              (4, "importance", "mean_importance", 2),
              (4, "importance, recent 1", "importance", 1),
              (4, "recent", "oldest", 0)]
  for row in result["rows"]:
    # Every window has 6 positions past the budget: the mean of the
    # per-window figures is the overall one.
    assert np.mean(row["window_bits_past_budget"]) == pytest.approx(
        row["bits_per_byte_past_budget"], abs=1e-5)
    # Positions before the budget see their whole prefix under any policy.
    prefix = (row["bits_per_byte"] * 10
              - row["bits_per_byte_past_budget"] * 6) / 4
    assert prefix == pytest.approx(np.mean(losses[:, :4]) / math.log(2),
                                   abs=1e-4)
    assert row["full_bits_per_byte_past_budget"] == pytest.approx(
        np.mean(losses[:, 4:]) / math.log(2), rel=1e-6)
    assert row["bits_per_byte_past_budget"] != pytest.approx(
        np.mean(losses[:, 4:]) / math.log(2), abs=1e-4)
  importance, _, recent = result["rows"]
  diff, error = spatten.paired_difference(importance, recent)
  per_window = (np.asarray(importance["window_bits_past_budget"])
                - recent["window_bits_past_budget"])
  assert diff == pytest.approx(np.mean(per_window), abs=1e-6)
  assert error == pytest.approx(np.std(per_window, ddof=1) / np.sqrt(3),
                                abs=1e-6)
  table = spatten.bytelm_table(result, baseline="recent").splitlines()
  assert len(table) == 2 + 3 + 1
  assert table[2].startswith(
      f"| importance | {importance['bits_per_byte_past_budget']:.3f} "
      f"({diff:+.3f} +- {error:.3f}) |")
  assert table[4] == f"| recent | {recent['bits_per_byte_past_budget']:.3f} |"
  with pytest.raises(ValueError, match="budget=10"):
    spatten.kv_budget_bits_per_byte(params, config, spatten.DENSE, windows,
                                    budgets=(10,))
  with pytest.raises(ValueError, match="policy='lru'"):
    spatten.kv_budget_bits_per_byte(params, config, spatten.DENSE, windows,
                                    budgets=(4,), policies=("lru",))


def _tiny_encoder(rng, batch=3):
  tokens, mask = _inputs(rng, batch, TINY.max_len)
  params = jax.jit(SentenceEncoder(TINY, spatten.DENSE).init)(
      jax.random.key(4), tokens[:1], mask[:1])["params"]
  return params, tokens, mask


def test_latency_inputs_round_trip(tmp_path, rng):
  params, tokens, mask = _tiny_encoder(rng)
  path = tmp_path / "inputs.npz"
  spatten.save_latency_inputs(path, TINY, params, tokens, mask)
  config, loaded, got_tokens, got_mask = spatten.load_latency_inputs(path)
  assert config == TINY
  np.testing.assert_array_equal(got_tokens, tokens)
  np.testing.assert_array_equal(got_mask, mask)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for want, got in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.asarray(want, np.float16))


def test_latency_main_from_saved_inputs(tmp_path, rng, capsys):
  params, tokens, mask = _tiny_encoder(rng)
  path = tmp_path / "inputs.npz"
  spatten.save_latency_inputs(path, TINY, params, tokens, mask)
  spatten.main(["--only=latency", f"--weights={path}", "--seq=12",
                "--latency_batch=2", "--repeats=2", f"--out={tmp_path}",
                "--plot="])
  result = json.loads((tmp_path / "latency.json").read_text())
  assert result["seq"] == 12
  runs = {r["name"]: r for r in result["runs"]}
  names = [f"{kind} {schedule}" for kind in ("dense", "2:4")
           for schedule in ("unpruned", "linear 50%", "linear 30%",
                            "early 50%")]
  assert list(runs) == names  # no cuDNN row off the GPU
  for run in runs.values():
    assert (run["batch"], run["length"], run["dtype"]) == (2, 12, "float32")
    assert run["seconds"] > 0 and run["compile_seconds"] > 0
  assert runs["dense linear 50%"]["layer_lengths"] == [12, 9, 6]
  assert runs["dense early 50%"]["layer_lengths"] == [12, 6, 6]
  # The same inputs for every run: the float32 dense unpruned run is the
  # reference itself (up to the fp16 rounding both share).
  assert runs["dense unpruned"]["min_cosine_to_reference"] == pytest.approx(
      1.0, abs=1e-5)
  assert runs["2:4 linear 30%"]["cosine_to_reference"] < 0.9999
  table = capsys.readouterr().out.splitlines()
  assert sum(line.startswith("| dense ") for line in table) == 4
  assert any(line.startswith("| dense unpruned | float32 | 2 | 12 x 3 |")
             and "| 1.00x | 1.00x | 0% |" in line for line in table)
  with pytest.raises(ValueError, match="'speed'"):
    spatten.main(["--only=latency,speed"])
  with pytest.raises(ValueError, match="--seq=16"):
    spatten.main(["--only=latency", f"--weights={path}", "--seq=16"])
  with pytest.raises(ValueError, match=r"\[1, 3\].*batch=4"):
    spatten.main(["--only=latency", f"--weights={path}", "--seq=12",
                  "--latency_batch=2,4", f"--out={tmp_path}"])


def test_encoder_latency_in_bfloat16(rng):
  params, tokens, mask = _tiny_encoder(rng)
  reference = np.asarray(jax.jit(SentenceEncoder(TINY, spatten.DENSE).apply)(
      {"params": params}, tokens, mask))
  cast = spatten.cast_params(params, jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(cast)} == {jnp.dtype(jnp.bfloat16)}
  assert jax.eval_shape(SentenceEncoder(TINY, spatten.NM24).apply,
                        {"params": cast}, tokens, mask).dtype == jnp.bfloat16
  calls = []
  # The cuDNN kind needs a GPU: off one, its run fails and the others go on.
  runs = [("cudnn unpruned", AttentionSpec("cudnn"), ()),
          ("dense unpruned", spatten.DENSE, ())]
  failed, run = spatten.encoder_latency(
      TINY, params, tokens, mask, runs, 2, warmup=1, dtype=jnp.bfloat16,
      reference=reference, keep_going=True,
      on_result=lambda results: calls.append(len(results)))
  assert calls == [1, 2]
  assert failed["error"].startswith("ValueError: attention kind 'cudnn'")
  assert "seconds" not in failed
  assert run["dtype"] == "bfloat16" and "error" not in run
  # bfloat16 changes the embedding, but little.
  assert 0.99 < run["min_cosine_to_reference"] <= run[
      "cosine_to_reference"] < 1.0
  table = spatten.latency_table([failed, run]).splitlines()
  assert table[2].startswith("| cudnn unpruned | bfloat16 | 3 | failed: "
                             "ValueError: attention kind 'cudnn'")
  assert table[3].startswith("| dense unpruned | bfloat16 | 3 | 12 x 3 | ")
  assert table[3].split(" | ")[5:8] == ["1.00x", "1.00x", "0%"]
  # No dense run to compare with: that column stays empty.
  alone = dict(run, name="2:4 unpruned", attention="2:4")
  assert spatten.latency_table([alone]).splitlines()[2].split(" | ")[5:8] == [
      "1.00x", "", "0%"]
  with pytest.raises(ValueError, match="kind 'cudnn'"):
    spatten.encoder_latency(TINY, params, tokens, mask, runs[:1], 1)
