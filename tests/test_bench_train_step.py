"""experiments.bench.train_step at a tiny size on the CPU."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from experiments.bench import train_step

TINY = train_step.Sizes(hidden_size=32, num_heads=2, mlp_size=64, num_layers=1,
                        dtype="float32", warmup=1, iters=2)


def test_quick_run_reports_every_kind(tmp_path, capsys):
  out = tmp_path / "train_step.json"
  report = train_step.main(
      ["--quick", "--sizes=32", "--tokens=64", "--models=decoder",
       "--kinds=cudnn,nm,none", "--hidden_size=32", "--dtype=float32",
       "--iters=2", f"--json={out}"])
  assert json.loads(out.read_text()) == report
  rows = {row["kind"]: row for row in report["rows"]}
  assert set(rows) == {"cudnn", "nm", "none"}
  if jax.default_backend() != "gpu":
    assert "needs a CUDA GPU" in rows["cudnn"]["skipped"]
  nm, none = rows["nm"], rows["none"]
  assert (nm["batch"], nm["seq_len"]) == (2, 32)
  for row in (nm, none):
    assert 0 < np.log(256) - 1 < row["loss"] < np.log(256) + 1
    for key in ("step_ms", "gradient_ms", "forward_ms"):
      assert row[key] > 0
    assert row["train_tokens_per_s"] == pytest.approx(64e3 / row["step_ms"])
  assert nm["attention_ms"] == pytest.approx(nm["step_ms"] - none["step_ms"])
  assert nm["rest_ms"] == pytest.approx(
      nm["step_ms"] - nm["attention_ms"] - nm["optimizer_ms"])
  printed = capsys.readouterr().out
  assert "train tok/s" in printed and "decoder  nm " in printed


def test_a_run_cut_short_keeps_the_rows_it_measured(tmp_path, monkeypatch,
                                                    capsys):
  """The JSON is written after every row: a run that dies (a time limit,
  here the second row's measurement failing) still leaves the first."""
  out = tmp_path / "train_step.json"
  real, calls = train_step.measure, []

  def measure_once(*args, **kwargs):
    calls.append(args)
    if len(calls) > 1:
      raise RuntimeError("killed")
    return real(*args, **kwargs)

  monkeypatch.setattr(train_step, "measure", measure_once)
  with pytest.raises(RuntimeError, match="killed"):
    train_step.main(["--quick", "--sizes=32", "--tokens=64", "--models=decoder",
                     "--kinds=none,nm", "--hidden_size=32", "--dtype=float32",
                     "--iters=2", f"--json={out}"])
  (row,) = json.loads(out.read_text())["rows"]
  assert row["kind"] == "none" and row["step_ms"] > 0
  assert "decoder  none" in capsys.readouterr().out


@pytest.mark.parametrize("model_name", train_step.MODELS)
def test_kind_none_removes_every_attention_layer(model_name):
  params = {kind: train_step.Bench(model_name, kind, 16, 2, TINY).params
            for kind in ("nm", "none")}
  layers = lambda p: p["layer_0"] if model_name == "decoder" else p["encoder"][
      "layer_0"]
  assert "attention" in layers(params["nm"])
  assert "attention" not in layers(params["none"])
  assert set(layers(params["none"])) == set(layers(params["nm"])) - {
      "attention"}


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="tokens=100, S=32"):
    train_step.run((32,), 100, ("nm",), ("decoder",), TINY)
  with pytest.raises(SystemExit):
    train_step.main(["--kinds=sparse"])


@pytest.mark.parametrize("model_name", train_step.MODELS)
def test_topk_blocks_kind_trains_through_a_block_pattern(model_name, monkeypatch):
  calls = []
  topk = train_step.patterns.topk_blocks

  def recorded(query, key, **kwargs):
    calls.append(kwargs)
    return topk(query, key, **kwargs)

  monkeypatch.setattr(train_step.patterns, "topk_blocks", recorded)
  sizes = dataclasses.replace(TINY, pattern_block=8)
  row = train_step.measure(model_name, "topk_blocks", 32, 2, sizes)
  causal = model_name == "decoder"
  chance = np.log(256 if causal else train_step.NUM_CLASSES)
  assert 0 < chance - 1 < row["loss"] < chance + 1
  assert calls, "the kind built no block pattern"
  assert all(c["block_q"] == c["block_k"] == 8 and c["density"] ==
             train_step.PATTERN_DENSITY and c["is_causal"] == causal
             and c["autoregressive"] == causal for c in calls)
  # The pattern changes the model: its loss differs from plain 2:4's.
  assert row["loss"] != train_step.measure(model_name, "nm", 32, 2, sizes)["loss"]


def test_profile_breaks_the_step_down_by_part(capsys):
  row = train_step.measure("decoder", "nm", 32, 2, TINY, profile=True)
  parts = row["profile"]["parts_ms"]
  for part in ("attention core", "attention projections", "mlp", "optimizer"):
    assert sum(parts[part].values()) > 0, part
  assert parts["attention core"]["forward"] > 0
  assert parts["attention core"]["backward"] > 0
  assert row["profile"]["step_ms"] > 0
  printed = train_step.profile_table([row])
  assert "attn core" in printed and "decoder  nm" in printed
  # the largest instruction of the biggest part is named under the table
  top = row["profile"]["top_ops_ms"]
  biggest = max(top, key=lambda part: sum(parts[part].values()))
  assert f"decoder nm 32 {biggest} (" in printed
  assert next(iter(top[biggest])) in printed
