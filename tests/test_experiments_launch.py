"""experiments.launch: sweeps of real training runs, a failing trial, resume."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import textwrap

import pytest

from experiments import launch

REPO = pathlib.Path(__file__).resolve().parent.parent

TINY = {"data.num_train": 64, "data.num_valid": 16, "data.num_test": 16,
        "data.min_length": 8, "data.max_length": 23, "data.max_depth": 3,
        "model.hidden_size": 16, "model.num_heads": 2, "model.mlp_size": 32,
        "model.num_layers": 1, "batch_size": 8, "eval_batch_size": 16,
        "num_steps": 4, "log_every": 2, "eval_every": 4,
        "checkpoint_every": 4, "optimizer.warmup_steps": 1}


def test_product_axis_and_names():
  trials = launch.product(launch.ATTENTION_KINDS, launch.axis("seed", [0, 1]))
  assert len(trials) == 6
  assert trials[3] == {"attention.kind": "nm", "attention.n": 2,
                       "attention.m": 4, "seed": 1}
  assert launch.trial_name(3, trials[3]) == "003_kind=nm_n=2_m=4_seed=1"
  assert launch.trial_name(0, {"eval_splits": ("valid", "test")}) == (
      "000_eval_splits=--valid----test--")
  with pytest.raises(ValueError, match="at least one trial"):
    launch.Sweep(config="c.py", trials=())


def test_sweep_survives_a_failing_trial_and_resumes(tmp_path, capsys):
  sweep_file = tmp_path / "tiny_sweep.py"
  sweep_file.write_text(textwrap.dedent(f"""
      from experiments.launch import Sweep, product

      TINY = {TINY!r}
      KINDS = ({{"attention.kind": "dense"}},
               {{"attention.kind": "nm", "attention.n": 3, "attention.m": 2}},
               {{"attention.kind": "nm", "attention.n": 2, "attention.m": 4}})

      def get_sweep():
        return Sweep(config={str(REPO / "experiments/configs/listops.py")!r},
                     trials=product([TINY], KINDS))
      """))
  sweep_dir = tmp_path / "sweep"
  argv = [f"--sweep={sweep_file}", f"--workdir={sweep_dir}", "--parallel=2"]
  assert launch.main(argv) == 1

  trials = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
  statuses = [json.loads((t / "status.json").read_text()) for t in trials]
  assert [s["status"] for s in statuses] == ["done", "failed", "done"]
  assert statuses[1]["returncode"] != 0
  assert "attention n must be in [1, m=2]; got n=3" in (
      trials[1] / "log.txt").read_text()
  for trial in (trials[0], trials[2]):
    final = json.loads((trial / "final_metrics.json").read_text())
    assert 0.0 <= final["metrics"]["test"]["accuracy"] <= 1.0
  table = (sweep_dir / "results.md").read_text()
  assert table.count("| done |") == 2 and table.count("| failed |") == 1
  out = capsys.readouterr().out
  assert "1 of 3 trials failed: 001_" in out

  # Resuming keeps the finished trials and re-runs only the failed one.
  assert launch.main(argv) == 1
  out = capsys.readouterr().out
  assert out.count("done earlier, kept") == 2
  assert (trials[0] / "log.txt").read_text().count("=== ") == 1
  assert (trials[1] / "log.txt").read_text().count("=== ") == 2


def test_xm_without_xmanager_says_so(tmp_path):
  if importlib.util.find_spec("xmanager") is not None:
    pytest.skip("xmanager is installed")
  sweep_file = tmp_path / "s.py"
  sweep_file.write_text(
      "from experiments.launch import Sweep\n"
      "def get_sweep():\n"
      "  return Sweep(config='experiments/configs/listops.py', "
      "trials=({'seed': 0},))\n")
  with pytest.raises(SystemExit, match="--xm needs xmanager"):
    launch.main([f"--sweep={sweep_file}", f"--workdir={tmp_path / 'w'}",
                 "--xm"])
