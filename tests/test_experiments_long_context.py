"""experiments.long_context ("bytelm_pattern") and its sweep, at tiny sizes on the CPU."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import launch, long_context, sweep_summary, tasks, train
from experiments.configs import bytelm, bytelm_long
from experiments.sweeps import bytelm_long_context
from nmattn import patterns

REPO_SWEEP = "experiments/sweeps/bytelm_long_context.py"
TINY = {"data.seq_len": 256, "data.eval_windows": 4, "model.hidden_size": 32,
        "model.num_heads": 2, "model.mlp_size": 64, "model.num_layers": 1,
        "batch_size": 2, "eval_batch_size": 4, "num_steps": 2, "log_every": 1,
        "optimizer.warmup_steps": 1, "attention.pattern.block": 32,
        "attention.pattern.k": 3}


def long_config(overrides):
  """bytelm_long's config with `overrides` (flattened field names)."""
  config = bytelm_long.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def tiny_config(overrides):
  return long_config({**TINY, **overrides})


def _pattern_config(**fields):
  return ml_collections.ConfigDict({"name": "topk", "block": 64, "k": 3,
                                    "local_blocks": 2, "sink_blocks": 1, **fields})


def test_topk_pattern_keeps_its_count_of_causal_blocks(rng):
  config = _pattern_config()
  q, k = (jnp.asarray(rng.standard_normal((2, 512, 2, 16)), jnp.float32)
          for _ in range(2))
  modes = np.asarray(long_context.pattern_function(config)(q, k).modes)
  causal = np.tril(np.ones((8, 8), bool))
  assert modes.shape == (2, 2, 8, 8)
  assert np.all(modes[..., ~causal] == patterns.SKIP)
  # The band (diagonal and the block before it) and the first block are DENSE.
  band = np.eye(8, dtype=bool) | np.eye(8, k=-1, dtype=bool)
  band[:, 0] = True
  np.testing.assert_array_equal(modes == patterns.DENSE,
                                np.broadcast_to(band, modes.shape))
  kept = (modes != patterns.SKIP).sum(-1)
  np.testing.assert_array_equal(kept, np.broadcast_to(np.minimum(3, np.arange(1, 9)),
                                                      kept.shape))
  assert long_context.causal_block_fraction(512, config) == pytest.approx(
      kept[0, 0].sum() / causal.sum())
  # The config's own numbers: 177 of the 528 causal blocks at 4096.
  full = bytelm_long.get_config().attention.pattern
  assert long_context.causal_block_fraction(4096, full) == pytest.approx(177 / 528)


def test_pattern_model_is_wired_in():
  windows = {"bytes": np.asarray(
      np.random.default_rng(0).integers(0, 256, (2, 257)), np.int32)}
  nm = tasks.build(tiny_config({"attention.kind": "nm"}))
  params = jax.jit(nm.init_params)(jax.random.key(0))
  loss = lambda task: np.asarray(jax.jit(task.predict)(params, windows)["loss"])
  # Every causal block NM is no pattern at all: the same model as plain 2:4.
  everything = tasks.build(tiny_config({
      "attention.kind": "nm", "attention.pattern.name": "topk",
      "attention.pattern.k": 8, "attention.pattern.local_blocks": 0,
      "attention.pattern.sink_blocks": 0}))
  np.testing.assert_allclose(loss(everything), loss(nm), rtol=1e-5)
  # 3 of 8 blocks changes it.
  hierarchical = tasks.build(tiny_config({"attention.kind": "nm",
                                          "attention.pattern.name": "topk"}))
  assert hierarchical.model.attention.kind == "pattern"
  assert np.max(np.abs(loss(hierarchical) - loss(nm))) > 1e-3


# (config, later-byte starts, tolerance on the earlier logits). On the CPU,
# the tiny model through xla; on a GPU, the long-context trial's own model
# (head_dim 64, blocks of 128, bf16) at S 1024, whose patterned calls
# `implementation=None` gives the GPU kernels: their patterned causal path at
# head_dim 64 is covered by no other GPU test.
CAUSALITY_CASES = {
    "cpu tiny xla": (lambda: tiny_config({"attention.kind": "nm",
                                          "attention.pattern.name": "topk",
                                          "attention.pattern.local_blocks": 1}),
                     (40, 100, 170), 0.0),
    "gpu trial model": pytest.param(
        lambda: long_config({"attention.kind": "nm",
                               "attention.pattern.name": "topk",
                               "data.seq_len": 1024}),
        (300, 640, 900), 1e-2, marks=pytest.mark.gpu),
}


@pytest.mark.parametrize("make_config,starts,atol", list(CAUSALITY_CASES.values()),
                         ids=list(CAUSALITY_CASES))
def test_pattern_model_is_causal(make_config, starts, atol):
  """No logit may depend on a later byte: the topk choice reads earlier
  positions only (block means of the query block would leak later bytes,
  and a model trained on them learns to read them), and the kernels mask
  the later keys inside the kept blocks."""
  config = make_config()
  task = tasks.build(config)
  windows = np.random.default_rng(1).integers(
      0, 256, (1, config.data.seq_len)).astype(np.int32)
  params = jax.jit(task.init_params)(jax.random.key(0))
  logits = jax.jit(lambda p, x: task.model.apply({"params": p}, x))
  base = np.asarray(logits(params, windows))
  for start in starts:
    changed = windows.copy()
    changed[:, start:] = (changed[:, start:] * 31 + 7) % 256
    after = np.asarray(logits(params, changed))
    np.testing.assert_allclose(after[:, :start], base[:, :start], rtol=0, atol=atol)
    assert np.any(np.abs(after[:, start:] - base[:, start:]) > 10 * atol)


@pytest.mark.parametrize("overrides,match", [
    ({"attention.pattern.name": "band"}, "pattern.name must be one of"),
    ({"attention.pattern.name": "topk", "attention.kind": "dense"},
     "attention.kind must be 'nm' with a pattern"),
    ({"attention.pattern.name": "topk", "attention.pattern.k": 0},
     "pattern.k must be an int >= 1"),
    ({"attention.pattern.name": "topk", "attention.pattern.sink_blocks": -1},
     "pattern.sink_blocks must be an int >= 0"),
])
def test_bad_pattern_configs_raise(overrides, match):
  config = tiny_config({"attention.kind": "nm", **overrides})
  with pytest.raises(ValueError, match=match):
    tasks.build(config)


def test_sweep_trials_validate_and_the_pattern_trial_trains(tmp_path):
  sweep = launch.load_sweep(REPO_SWEEP)
  assert [t.get("attention.kind") for t in sweep.trials] == ["dense", "nm", "nm"]
  assert sweep.trials[2]["attention.pattern.name"] == "topk"
  for trial in sweep.trials:
    config = bytelm_long.get_config()
    config.update_from_flattened_dict(trial)
    train.validate(config)
    assert config.data.seq_len >= 2048
  summary = train.train_and_evaluate(tiny_config(sweep.trials[2]), tmp_path)
  for split in ("valid", "test"):
    bits = summary["metrics"][split]["bits_per_byte"]
    assert np.isfinite(bits) and 0 < bits < 9
  final = json.loads((tmp_path / "final_metrics.json").read_text())
  assert summary["attention"] == final["attention"] == "pattern+2:4"


def test_compute_dtype_reaches_the_model_and_is_refused_where_unread():
  config = tiny_config({"attention.kind": "nm"})
  assert config.model.dtype == "bfloat16"
  task = tasks.build(config)
  assert task.model.config.dtype == "bfloat16"
  windows = {"bytes": np.zeros((2, 257), np.int32)}
  params = jax.jit(task.init_params)(jax.random.key(0))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  loss, aux = jax.jit(task.loss)(params, windows, jax.random.key(1))
  assert loss.dtype == aux["bits_per_byte"].dtype == jnp.float32
  # No dtype field: float32, as the experiment models always ran.
  del config.model["dtype"]
  assert tasks.build(config).model.config.dtype == "float32"
  # The plain bytelm task reads no dtype: bfloat16 is refused, not ignored.
  plain = bytelm.get_config()
  plain.model.dtype = "bfloat16"
  with pytest.raises(ValueError, match="config.model.dtype must be one of "
                     r"\('float32',\) for task 'bytelm'; got "
                     "config.model.dtype='bfloat16'"):
    train.validate(plain)
  config.model.dtype = "float16"
  with pytest.raises(ValueError, match="config.model.dtype='float16'"):
    train.validate(config)


def test_sweep_adds_overrides_to_every_trial():
  plain = bytelm_long_context.get_sweep()
  assert plain == launch.load_sweep(REPO_SWEEP)
  extra = sweep_summary.parse_overrides(["num_steps=40", "optimizer.b2=0.95"])
  assert extra == {"num_steps": "40", "optimizer.b2": "0.95"}
  sweep = sweep_summary.prepare(plain, extra)
  assert [dict(t, **extra) for t in plain.trials] == list(sweep.trials)
  with pytest.raises(ValueError, match="--set='num_steps'"):
    sweep_summary.parse_overrides(["num_steps"])


def test_trial_summary_reads_bits_per_byte_and_seconds_per_step(tmp_path):
  trial = launch.Trial(tmp_path, 0, {"attention.kind": "dense"})
  trial.workdir.mkdir()
  (trial.workdir / "config.json").write_text(json.dumps(
      {"batch_size": 8, "attention": {"kind": "nm", "n": 2, "m": 4,
                                      "pattern": {"name": "topk"}}}))
  # Windows of 25 steps: the first with the compilation, one resumed.
  rows = [(25, 8 / 40.0), (50, 8 / 0.4), (75, 8 / 0.5), (100, 8 / 0.45)]
  writer = train.MetricWriter(trial.workdir, enabled=True)
  for step, rate in rows:
    writer.write(step, "train", {"examples_per_second": rate, "loss": 1.0})
  writer.write(100, "valid", {"bits_per_byte": 2.5})
  writer.write(100, "test", {"bits_per_byte": 2.6})
  writer.close()
  (trial.workdir / "final_metrics.json").write_text(json.dumps(
      {"metrics": {"valid": {"bits_per_byte": 2.5},
                   "test": {"bits_per_byte": 2.6}}}))
  trial.set_status(status="done", started="2026-01-01T10:00:00",
                   finished="2026-01-01T10:01:30")
  assert sweep_summary.window_seconds_per_step(trial.workdir) == [
      (25, pytest.approx(40.0)), (50, pytest.approx(0.4)),
      (75, pytest.approx(0.5)), (100, pytest.approx(0.45))]
  summary = sweep_summary.trial_summary(trial)
  assert summary == {
      "trial": "000_kind=dense", "status": "done",
      "attention": "2:4 in topk blocks", "seed": None,
      "overrides": {"attention.kind": "dense"},
      "valid_bits_per_byte": 2.5, "test_bits_per_byte": 2.6, "steps": 100,
      "seconds_per_step": pytest.approx(0.45),
      "first_window_seconds_per_step": pytest.approx(40.0),
      "wall_seconds": 90.0}
  table = sweep_summary.format_table([summary])
  assert ("| 000 | 2:4 in topk blocks |  | done | 100 | 2.5000 | 2.6000 | "
          "0.4500 | 40.000 | 90 |") in table
  assert sweep_summary.attention_label(
      {"attention": {"kind": "dense", "n": 2, "m": 4}}) == "dense"
  assert sweep_summary.attention_label(
      {"attention": {"kind": "nm", "n": 1, "m": 2,
                     "pattern": {"name": ""}}}) == "1:2"
  # A trial that never logged: no speed, no result.
  pending = sweep_summary.trial_summary(launch.Trial(tmp_path, 1, {}))
  assert (pending["status"], pending["steps"], pending["seconds_per_step"],
          pending["valid_bits_per_byte"]) == ("pending", 0, None, None)
