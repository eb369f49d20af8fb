"""Per-query retrieval ranks and the noise of a finetuned recall@1: the ranks
from a run's checkpoint (experiments.report.write_test_ranks), the spread
over seeds, the paired difference with its bootstrap and variance
components, and section 2b of docs/RESULTS.md from hand-made trials."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import statistics

import numpy as np
import pytest

from experiments import launch, report, tasks, train
from experiments.data import stdlib

REPO = pathlib.Path(__file__).resolve().parent.parent
SWEEP = "experiments/sweeps/retrieval_finetune_seeds.py"


def test_ranks_count_the_documents_above_the_answer():
  rng = np.random.default_rng(0)
  similarity = rng.integers(0, 4, size=(9, 9)).astype(np.float32)  # ties
  ranks = tasks.retrieval_ranks(similarity)
  expected = [sum(similarity[i, j] > similarity[i, i] for j in range(9))
              for i in range(9)]
  np.testing.assert_array_equal(ranks, expected)
  metrics = tasks.retrieval_metrics(similarity, ks=(1, 3))
  assert metrics["recall_at_1"] == np.mean(np.asarray(expected) == 0)
  assert metrics["recall_at_3"] == np.mean(np.asarray(expected) < 3)
  with pytest.raises(ValueError, match=r"similarity.shape=\(2, 3\)"):
    tasks.retrieval_ranks(np.ones((2, 3)))


def test_spread_is_the_sample_statistics():
  values = list(np.random.default_rng(1).normal(60, 2, size=5))
  got = report.spread(values)
  assert got["n"] == 5 and got["min"] == min(values)
  assert got["max"] == max(values)
  assert got["mean"] == pytest.approx(statistics.mean(values))
  assert got["std"] == pytest.approx(statistics.stdev(values))
  assert report.spread([3.0])["std"] is None
  with pytest.raises(ValueError, match=r"values=\[\]"):
    report.spread([])


def test_paired_noise_per_seed_counts_and_bootstrap():
  rng = np.random.default_rng(2)
  a = rng.random((3, 800)) < 0.6
  # b agrees with a on most queries, so the pairing narrows the interval.
  b = np.where(rng.random((3, 800)) < 0.8, a, rng.random((3, 800)) < 0.55)
  noise = report.paired_noise(a, b, num_resamples=4000, seed=0)
  assert noise["num_seeds"] == 3 and noise["num_queries"] == 800
  d = a.astype(float) - b
  for s, row in enumerate(noise["per_seed"]):
    assert row["difference"] == pytest.approx(d[s].mean())
    assert row["a_only"] == sum(x and not y for x, y in zip(a[s], b[s]))
    assert row["b_only"] == sum(y and not x for x, y in zip(a[s], b[s]))
    assert row["low"] < row["difference"] < row["high"]
    # The percentile interval against the normal one of the paired mean.
    normal = 2 * 1.96 * d[s].std(ddof=1) / np.sqrt(800)
    assert row["high"] - row["low"] == pytest.approx(normal, rel=0.12)
    unpaired = 2 * 1.96 * np.sqrt((a[s].var() + b[s].var()) / 800)
    assert row["high"] - row["low"] < 0.8 * unpaired
  assert noise["mean"] == pytest.approx(d.mean())
  assert noise["query_low"] < noise["mean"] < noise["query_high"]
  # The bootstrap over queries against the components' query terms, and
  # the seed term only widening the interval.
  queries_only = report.half_width({**noise["components"], "seeds": 0.0}, 800, 3)
  assert (noise["query_high"] - noise["query_low"]
          == pytest.approx(2 * queries_only, rel=0.12))
  assert noise["high"] - noise["mean"] >= queries_only
  one = report.paired_noise(a[:1], b[:1], num_resamples=500)
  assert one["components"] is None and one["low"] is None
  with pytest.raises(ValueError, match=r"hits_b.shape=\(3, 799\)"):
    report.paired_noise(a, b[:, 1:])
  with pytest.raises(ValueError, match="level=1.5"):
    report.paired_noise(a, b, level=1.5)


def test_variance_components_recover_a_known_model():
  # d[s, q] = mu + query + seed + interaction, Gaussian with known spreads.
  rng = np.random.default_rng(3)
  seeds, queries = 120, 1500
  sd = {"queries": 0.3, "seeds": 0.02, "interaction": 0.2}
  d = (0.01 + sd["queries"] * rng.normal(size=(1, queries))
       + sd["seeds"] * rng.normal(size=(seeds, 1))
       + sd["interaction"] * rng.normal(size=(seeds, queries)))
  noise = report.paired_noise(d, np.zeros_like(d), num_resamples=100)
  for name, value in sd.items():
    assert np.sqrt(noise["components"][name]) == pytest.approx(value, rel=0.2), name
  width = report.half_width(noise["components"], queries, seeds)
  assert noise["high"] - noise["mean"] == pytest.approx(width)
  expected = 1.96 * np.sqrt(sd["queries"] ** 2 / queries + sd["seeds"] ** 2 /
                            seeds + sd["interaction"] ** 2 / (queries * seeds))
  assert width == pytest.approx(expected, rel=0.2)


def test_needed_to_resolve_is_the_fewest_below_the_target():
  rng = np.random.default_rng(4)
  found = []
  for _ in range(40):
    # Per-query spreads of a recall difference, and a small seed spread.
    components = {"queries": rng.uniform(0.1, 0.5) ** 2,
                  "interaction": rng.uniform(0.1, 0.5) ** 2,
                  "seeds": rng.uniform(0.0, 0.02) ** 2}
    queries, seeds = int(rng.integers(100, 3000)), int(rng.integers(1, 8))
    target = float(rng.uniform(0.003, 0.03))
    need = report.needed_to_resolve(components, target, queries, seeds)
    found.append((need["queries"] is None, need["seeds"] is None))
    if need["queries"] is None:  # the seed term alone is too wide
      assert report.half_width({**components, "queries": 0.0,
                                "interaction": 0.0}, 1, seeds) >= target
    else:
      assert report.half_width(components, need["queries"], seeds) < target
      assert (need["queries"] == 1 or report.half_width(
          components, need["queries"] - 1, seeds) >= target)
    if need["seeds"] is None:
      assert report.half_width({**components, "seeds": 0.0,
                                "interaction": 0.0}, queries, 1) >= target
    else:
      assert report.half_width(components, queries, need["seeds"]) < target
      assert (need["seeds"] == 1 or report.half_width(
          components, queries, need["seeds"] - 1) >= target)
  # Both answers, and both kinds of None, came up.
  assert {q for q, _ in found} == {s for _, s in found} == {False, True}
  with pytest.raises(ValueError, match="target=0"):
    report.needed_to_resolve(components, 0, 10, 1)
  with pytest.raises(ValueError, match="num_seeds=0"):
    report.half_width(components, 10, 0)


def test_the_sweep_pairs_seeds_on_the_whole_test_split():
  sweep = launch.load_sweep(SWEEP)
  assert sweep.config == "experiments/configs/retrieval.py"
  kinds = [tuple(k.items()) for k in launch.ATTENTION_KINDS]
  pairs = [(t["seed"], tuple((k, v) for k, v in t.items()
                              if k.startswith("attention."))) for t in sweep.trials]
  assert pairs == ([(s, k) for s in (0, 1, 2) for k in kinds[:2]]
                   + [(s, kinds[2]) for s in (0, 1, 2)]
                   + [(s, k) for s in (3, 4) for k in kinds[:2]])
  assert {t["data.max_eval_pairs"] for t in sweep.trials} == {0}


def _load_retrieval_config(overrides):
  spec = importlib.util.spec_from_file_location(
      "retrieval", REPO / "experiments" / "configs" / "retrieval.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def test_write_test_ranks_reproduces_the_runs_own_metrics(tmp_path):
  pairs = [p for split in stdlib.SPLITS
           for p in stdlib.docstring_pairs(packages=("json",))[split]][:12]
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(
      {"query": p.docstring, "document": p.code, "split": split}) + "\n"
      for p, split in zip(pairs, ["test"] * 6 + ["train"] * 6)))
  # 6 test pairs in batches of 4: the last batch is padded.
  config = _load_retrieval_config({
      "data.pairs_jsonl": str(path), "data.query_len": 16, "data.code_len": 24,
      "batch_size": 6, "eval_batch_size": 4, "num_steps": 1, "log_every": 1,
      "eval_every": 1, "checkpoint_every": 1, "optimizer.warmup_steps": 0,
      "optimizer.learning_rate": 1e-3})
  run = tmp_path / "run"
  summary = train.train_and_evaluate(config, run)
  with pytest.raises(ValueError, match="not finished"):
    report.write_test_ranks(tmp_path)
  (run / "status.json").write_text(json.dumps({"status": "done"}))
  lines = []
  report.write_sweep_test_ranks(tmp_path, echo=lines.append)
  written = json.loads((run / "test_ranks.json").read_text())
  assert lines == [f"run: 6 test ranks, recall@1 "
                   f"{summary['metrics']['test']['recall_at_1']:.4f}"]
  assert len(written["ranks"]) == 6 and written["step"] == 1
  assert all(0 <= r < 6 for r in written["ranks"])
  test = summary["metrics"]["test"]
  assert written["recall_at_1"] == pytest.approx(test["recall_at_1"])
  assert written["mrr"] == pytest.approx(test["mrr"])
  # Ranks that do not give the recorded metrics are refused.
  final = json.loads((run / "final_metrics.json").read_text())
  final["metrics"]["test"]["mrr"] += 0.01
  (run / "final_metrics.json").write_text(json.dumps(final))
  with pytest.raises(ValueError, match="the ranks give mrr="):
    report.write_test_ranks(run)


def _hand_made_trial(root, index, seed, kind, hits):
  name = f"{index:03d}_seed={seed}_kind={kind}"
  trial = root / name
  trial.mkdir(parents=True)
  ranks = [0 if h else 3 for h in hits]
  (trial / "status.json").write_text(json.dumps({"status": "done"}))
  (trial / "config.json").write_text(json.dumps(
      {"seed": seed, "num_steps": 128, "batch_size": 16}))
  (trial / "final_metrics.json").write_text(json.dumps(
      {"attention": kind, "metrics": {"test": {
          "recall_at_1": float(np.mean(hits)),
          "mrr": float(np.mean([1 / (r + 1) for r in ranks]))}}}))
  (trial / "test_ranks.json").write_text(json.dumps({"ranks": ranks}))


def test_section_2b_from_hand_made_trials(tmp_path):
  rng = np.random.default_rng(5)
  sweep = tmp_path / "retrieval_finetune_seeds"
  dense = rng.random((3, 400)) < 0.6
  index = 0
  for seed in range(3):
    for kind, hits in (("dense", dense[seed]),
                       # 2:4 loses a tenth of dense's hits: clearly missed.
                       ("2:4", dense[seed] & (rng.random(400) > 0.1)),
                       ("1:2", dense[seed])):  # identical: met, no noise
      _hand_made_trial(sweep, index, seed, kind, hits)
      index += 1
  (sweep / "009_seed=3_kind=dense").mkdir()
  (sweep / "009_seed=3_kind=dense" / "status.json").write_text(
      json.dumps({"status": "failed"}))
  lines = report.retrieval_noise_section(tmp_path, tmp_path / "plots")
  text = "\n".join(lines)
  assert (tmp_path / "plots" / "finetune_seeds.png").exists()
  assert "seeds 0, 1, 2" in text and "400 pairs" in text
  recall = [100 * dense[s].mean() for s in range(3)]
  assert (f"| dense | 3 | {statistics.mean(recall):.2f} ± "
          f"{statistics.stdev(recall):.2f} | {min(recall):.2f}-"
          f"{max(recall):.2f} |") in text
  assert "Trials that did not finish: 009_seed=3_kind=dense." in text
  noise = report.paired_noise(
      dense, [np.asarray(json.loads((p / "test_ranks.json").read_text())
                         ["ranks"]) == 0 for p in sorted(sweep.glob("*kind=2:4"))])
  assert noise["low"] > 0.005
  assert "Target: finetuned 2:4 within 0.5 recall points of dense" in text
  assert f"dense - 2:4 = {100 * noise['mean']:+.2f} points" in text
  assert text.count("**missed**") == 1
  assert "| dense - 1:2 | mean of 3 | **+0.00** |" in text
  assert "a 0.5-point difference is outside the noise." in text  # 1:2
  # The same hits for both kinds on few queries: inside the noise.
  for trial in sorted(sweep.glob("*kind=2:4")):
    seed = int(trial.name.split("seed=")[1][0])
    flips = rng.random(400) < 0.1
    ranks = [0 if h else 3 for h in dense[seed] ^ flips]
    (trial / "test_ranks.json").write_text(json.dumps({"ranks": ranks}))
  text = "\n".join(report.retrieval_noise_section(tmp_path, tmp_path / "plots"))
  assert "**not resolvable** at this noise" in text
  assert "inside the noise: resolving it would take" in text


def test_a_second_noise_section_names_its_sweep_heading_split_and_plot(tmp_path):
  rng = np.random.default_rng(6)
  sweep, heading, plot = report.NOISE_SECTIONS[1]
  dense = rng.random((2, 300)) < 0.6
  for seed in range(2):
    _hand_made_trial(tmp_path / sweep, 2 * seed, seed, "dense", dense[seed])
    _hand_made_trial(tmp_path / sweep, 2 * seed + 1, seed, "2:4",
                     dense[seed] & (rng.random(300) > 0.05))
  for trial in (tmp_path / sweep).iterdir():
    config = json.loads((trial / "config.json").read_text())
    config["data"] = {"test_percent": 60}
    (trial / "config.json").write_text(json.dumps(config))
  text = "\n".join(report.retrieval_noise_section(
      tmp_path, tmp_path / "plots", sweep=sweep, heading=heading, plot=plot))
  assert text.startswith(f"## {heading}")
  assert "test split (60% of the stdlib files), 300 pairs" in text
  assert f"![finetuning over seeds](results/{plot})" in text
  assert (tmp_path / "plots" / plot).exists()
  assert f"--sweep=experiments/sweeps/{sweep}.py" in text
  assert report.retrieval_noise_section(tmp_path, tmp_path / "plots") == []
