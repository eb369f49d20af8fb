"""The GPU byte-LM sweeps (bytelm_gpu seeds and recipe), their runner
experiments/sweep_gpu.sh with experiments.sweep_summary, and their section
of docs/RESULTS.md, at tiny sizes on the CPU."""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys

import pytest

from experiments import launch, report, sweep_summary, train
from experiments.configs import bytelm_gpu

REPO = pathlib.Path(__file__).resolve().parent.parent
SEEDS = "experiments/sweeps/bytelm_gpu_seeds.py"
RECIPE = "experiments/sweeps/bytelm_gpu_recipe.py"
TINY = {"data.seq_len": 64, "data.eval_windows": 4, "model.hidden_size": 32,
        "model.num_heads": 2, "model.mlp_size": 64, "model.num_layers": 1,
        "batch_size": 2, "eval_batch_size": 4, "optimizer.warmup_steps": 1}


def test_the_sweeps_expand_to_the_right_trials():
  seeds = launch.load_sweep(SEEDS)
  assert seeds.config == "experiments/configs/bytelm_gpu.py"
  # Seed by seed, each seed the three kinds.
  assert list(seeds.trials) == [{"seed": s, **kind} for s in (0, 1, 2)
                                for kind in launch.ATTENTION_KINDS]
  for trial in seeds.trials:
    config = bytelm_gpu.get_config()
    config.update_from_flattened_dict(trial)
    train.validate(config)
    assert config.data.seq_len >= 1024
    assert config.model.dtype == "bfloat16"
    assert config.attention.pattern.name == ""
  # The first two seeds are the first six trials, under the same names.
  two = sweep_summary.prepare(seeds, only={"seed": ("0", "1")})
  names = [launch.trial_name(i, t) for i, t in enumerate(seeds.trials)]
  assert [launch.trial_name(i, t) for i, t in enumerate(two.trials)] == names[:6]

  recipe = launch.load_sweep(RECIPE)
  assert [{k: v for k, v in t.items() if k.startswith("attention.")}
          for t in recipe.trials] == list(launch.ATTENTION_KINDS)
  # Every continuation starts from the seeds sweep's dense seed-0 trial, at
  # the place sweep_gpu.sh's default work dir puts it.
  assert {t["init_from"] for t in recipe.trials} == {
      f"runs/sweeps/bytelm_gpu_seeds/{names[0]}"}
  assert seeds.trials[0] == {"seed": 0, "attention.kind": "dense"}
  assert {(t["num_steps"], t["optimizer.warmup_steps"])
          for t in recipe.trials} == {(500, 50)}


def test_prepare_and_the_flags_refuse_what_they_cannot_do():
  seeds = launch.load_sweep(SEEDS)
  kept = sweep_summary.prepare(
      seeds, {"num_steps": "3"},
      sweep_summary.parse_only(["seed=2", "attention.n=1"]))
  assert kept.trials == ({"seed": 2, "attention.kind": "nm", "attention.n": 1,
                          "attention.m": 2, "num_steps": "3"},)
  with pytest.raises(ValueError, match="--only field 'sede' is set by no "
                     "trial of the sweep; got --only=sede=0"):
    sweep_summary.prepare(seeds, only={"sede": ("0",)})
  with pytest.raises(ValueError, match="--only keeps no trial"):
    sweep_summary.prepare(seeds, only={"seed": ("7",)})
  with pytest.raises(ValueError, match="--only must be FIELD=VALUE"):
    sweep_summary.parse_only(["seed="])
  with pytest.raises(ValueError, match="--set must be FIELD=VALUE"):
    sweep_summary.parse_overrides(["seed"])


def _row(index, seed, kind, test, valid, status="done", extra=None):
  overrides = {"seed": seed, **kind, **(extra or {})}
  label = ("dense" if kind["attention.kind"] == "dense" else
           f"{kind['attention.n']}:{kind['attention.m']}")
  return {"trial": launch.trial_name(index, overrides), "status": status,
          "attention": label, "seed": seed, "overrides": overrides,
          "valid_bits_per_byte": valid, "test_bits_per_byte": test,
          "steps": 2000, "seconds_per_step": 0.006 + 0.001 * index,
          "first_window_seconds_per_step": 0.1, "wall_seconds": 40.0}


DENSE, NM24, NM12 = launch.ATTENTION_KINDS
# test, valid bits per byte of seeds 0, 1, 2; 1:2's seed 2 failed.
HAND_MADE = [
    _row(0, 0, DENSE, 2.90, 2.96), _row(1, 0, NM24, 2.93, 2.99),
    _row(2, 0, NM12, 3.00, 3.06), _row(3, 1, DENSE, 2.92, 2.98),
    _row(4, 1, NM24, 2.95, 3.01), _row(5, 1, NM12, 3.02, 3.08),
    _row(6, 2, DENSE, 2.94, 3.00), _row(7, 2, NM24, 2.97, 3.03),
    _row(8, 2, NM12, None, None, status="failed")]


def test_group_summaries_give_mean_spread_and_the_difference_to_dense():
  dense, nm24, nm12 = sweep_summary.group_summaries(HAND_MADE)
  assert [g["attention"] for g in (dense, nm24, nm12)] == ["dense", "2:4", "1:2"]
  assert nm24["overrides"] == NM24
  assert nm24["trials"] == [HAND_MADE[i]["trial"] for i in (1, 4, 7)]
  assert (nm24["seeds"], nm12["seeds"]) == ([0, 1, 2], [0, 1])
  assert nm24["test"] == {"n": 3, "mean": pytest.approx(2.95),
                          "std": pytest.approx(0.02), "min": 2.93, "max": 2.97}
  assert nm12["valid"] == {"n": 2, "mean": pytest.approx(3.07),
                           "std": pytest.approx(0.02 / 2 ** 0.5),
                           "min": 3.06, "max": 3.08}
  assert nm24["relative_to_dense"] == {
      "valid": pytest.approx(0.03 / 2.98), "test": pytest.approx(0.03 / 2.92)}
  assert dense["relative_to_dense"] == {"valid": 0.0, "test": 0.0}
  assert nm12["test_relative_by_seed"] == {
      "0": pytest.approx(0.10 / 2.90), "1": pytest.approx(0.10 / 2.92)}
  assert nm24["seconds_per_step"] == pytest.approx(0.010)  # median of 7, 10, 13 ms
  # One seed: no std; no dense run of the same other overrides: no difference.
  alone = sweep_summary.group_summaries(
      [_row(0, 0, NM24, 2.9, 3.0, extra={"num_steps": 500})] + HAND_MADE[:1])
  assert alone[0]["test"]["std"] is None
  assert alone[0]["relative_to_dense"] == {"valid": None, "test": None}
  assert alone[0]["test_relative_by_seed"] == {}


def _run(command, env):
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


def test_the_runner_end_to_end_writes_mean_and_spread(tmp_path):
  """Two seeds of the dense trial, then the recipe's 2:4 continuation of
  seed 0's, through sweep_gpu.sh at 3 steps of 2 x 64 (one at a time: the
  second seed finds the first's compilations in the cache)."""
  env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
  tiny = [arg for field, value in TINY.items()
          for arg in ("--set", f"{field}={value}")]
  result = _run(["experiments/sweep_gpu.sh", f"--sweep={SEEDS}",
                 f"--workdir={tmp_path / 'seeds'}",
                 "--steps=3", "--log_every=1", "--only", "seed=0,1",
                 "--only=attention.kind=dense", *tiny], env)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  summary = json.loads(
      (tmp_path / "seeds" / "bytelm_gpu_seeds.json").read_text())
  assert summary["parallel"] == 1
  assert summary["only"] == {"seed": ["0", "1"], "attention.kind": ["dense"]}
  assert summary["trial_config"]["data"]["seq_len"] == 64
  assert [(t["seed"], t["status"], t["steps"]) for t in summary["trials"]] == [
      (0, "done", 3), (1, "done", 3)]
  [group] = summary["groups"]
  for split in ("valid", "test"):
    # The trials' own final metrics, read back.
    values = [json.loads((tmp_path / "seeds" / t["trial"] /
                          "final_metrics.json").read_text())
              ["metrics"][split]["bits_per_byte"] for t in summary["trials"]]
    assert values[0] != values[1]  # the seeds differ
    assert group[split] == {"n": 2, "mean": pytest.approx(statistics.fmean(values)),
                            "std": pytest.approx(statistics.stdev(values)),
                            "min": min(values), "max": max(values)}
  assert group["relative_to_dense"] == {"valid": 0.0, "test": 0.0}
  assert "| dense | 0,1 |" in result.stdout
  out = tmp_path / "out" / "bytelm_gpu_seeds"
  assert json.loads((out / "bytelm_gpu_seeds.json").read_text()) == summary
  assert (out / "001" / "final_metrics.json").exists()

  dense_run = tmp_path / "seeds" / summary["trials"][0]["trial"]
  result = _run(["experiments/sweep_gpu.sh", f"--sweep={RECIPE}",
                 f"--workdir={tmp_path / 'recipe'}", "--steps=3",
                 "--log_every=1", "--only=attention.n=2",
                 "--set", f"init_from={dense_run}", *tiny], env)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  recipe = json.loads(
      (tmp_path / "recipe" / "bytelm_gpu_recipe.json").read_text())
  [trial] = recipe["trials"]
  assert (trial["attention"], trial["status"]) == ("2:4", "done")
  assert recipe["trial_config"]["init_from"] == str(dense_run)
  assert 0 < trial["test_bits_per_byte"] < 9

  # experiments.report --runs=$OUT takes both summaries from there.
  results = tmp_path / "results"
  report.collect(tmp_path / "out", results)
  lines = report.gpu_byte_lm_section(results, tmp_path / "plots")
  group = summary["groups"][0]["test"]
  assert (f"| dense | 2 | {group['mean']:.4f} ± {group['std']:.4f} | "
          f"{group['min']:.4f}-{group['max']:.4f} |") in "\n".join(lines)
  assert f"| 2:4 | {trial['test_bits_per_byte']:.4f} |" in "\n".join(lines)


def _summary(sweep, rows, trial_config, parallel=3):
  return {"sweep": sweep, "config": "experiments/configs/bytelm_gpu.py",
          "overrides": {}, "only": {}, "parallel": parallel,
          "device": "NVIDIA H200", "written": "2026-12-05T10:00:00",
          "stopped_by": None, "trial_config": trial_config, "trials": rows,
          "groups": sweep_summary.group_summaries(rows)}


def test_report_renders_the_gpu_section_from_a_hand_made_summary(tmp_path):
  results, plots = tmp_path / "results", tmp_path / "plots"
  assert report.gpu_byte_lm_section(results, plots) == []  # no JSON, no section
  config = bytelm_gpu.get_config().to_dict()
  (results / "bytelm_gpu").mkdir(parents=True)
  (results / "bytelm_gpu" / "bytelm_gpu_seeds.json").write_text(
      json.dumps(_summary(SEEDS, HAND_MADE, config)))
  lines = report.gpu_byte_lm_section(results, plots)
  text = "\n".join(lines)
  assert "NVIDIA H200 (2026-12-05, 3 trials at a time on the one device)" in text
  assert ("4 layers, hidden 256, 4 heads, bfloat16 activations (float32 "
          "parameters and loss), 2000 steps of 32 x 1024 bytes; seeds 0, 1, 2"
          in text)
  assert ("Command: `experiments/sweep_gpu.sh --sweep="
          "experiments/sweeps/bytelm_gpu_seeds.py --parallel=3`") in text
  for row in (
      "| dense | 3 | 2.9200 ± 0.0200 | 2.9000-2.9400 | 2.9800 ± 0.0200 | "
      "2.9600-3.0000 | +0.00% | 0: +0.00%, 1: +0.00%, 2: +0.00% |",
      "| 2:4 | 3 | 2.9500 ± 0.0200 | 2.9300-2.9700 | 3.0100 ± 0.0200 | "
      "2.9900-3.0300 | +1.03% | 0: +1.03%, 1: +1.03%, 2: +1.02% |",
      "| 1:2 | 2 | 3.0100 ± 0.0141 | 3.0000-3.0200 | 3.0700 ± 0.0141 | "
      "3.0600-3.0800 | +3.08% | 0: +3.45%, 1: +3.42% |"):
    assert row in lines
  assert f"Trials that did not finish: {HAND_MADE[8]['trial']}." in text
  assert ("Target: 2:4 within 1% of dense (test bits per byte, mean over 3 "
          "seeds): 2:4 is 1.03% worse than dense, **missed**. Dense's own "
          "spread over its seeds: std 0.0200 (0.68% of its mean), range "
          "0.0400.") in lines
  assert "Dense first, then N:M" not in text  # no recipe JSON yet
  assert (plots / "bytelm_gpu.png").stat().st_size > 0

  recipe_config = dict(config, num_steps=500, init_from=(
      "runs/sweeps/bytelm_gpu_seeds/000_seed=0_kind=dense"))
  recipe_config["optimizer"] = dict(config["optimizer"], warmup_steps=50)
  extra = {"num_steps": 500, "optimizer.warmup_steps": 50,
           "init_from": recipe_config["init_from"]}
  rows = [_row(i, 0, kind, test, test + 0.05, extra=extra) for i, (kind, test)
          in enumerate(((DENSE, 2.88), (NM24, 2.89), (NM12, 2.98)))]
  for row in rows:
    row["overrides"].pop("seed")  # the recipe sets no seed: the config's 0
  (results / "bytelm_gpu" / "bytelm_gpu_recipe.json").write_text(
      json.dumps(_summary(RECIPE, rows, recipe_config)))
  lines = report.gpu_byte_lm_section(results, plots)
  text = "\n".join(lines)
  assert ("The seeds sweep's dense run `000_seed=0_kind=dense` continued for "
          "500 more steps with each attention (its parameters, a fresh AdamW "
          "with 50 warm-up steps).") in text
  assert ("The seeds table above was written 2026-12-05T10:00:00, the recipe "
          "2026-12-05T10:00:00 (NVIDIA H200)") in text
  for row in ("| dense | 2.8800 | 2.9300 | +0.00% | 2.9000 |",
              "| 2:4 | 2.8900 | 2.9400 | +0.35% | 2.9300 |",
              "| 1:2 | 2.9800 | 3.0300 | +3.47% | 3.0000 |"):
    assert row in lines
