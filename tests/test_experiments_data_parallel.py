"""experiments.data_parallel: 1 device against 2 fake CPU devices."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import data_parallel

TINY = ("data.seq_len=32", "batch_size=8", "model.hidden_size=32",
        "model.num_heads=2", "model.mlp_size=64", "model.num_layers=1",
        "data.eval_windows=16", "eval_batch_size=16",
        "optimizer.warmup_steps=2")


def test_two_fake_devices_follow_the_one_device_loss_curve(tmp_path):
  out = tmp_path / "report.json"
  report = data_parallel.main(
      ["--devices=2", "--steps=6", "--skip_steps=2", "--platform=cpu",
       f"--workdir={tmp_path / 'runs'}", f"--json={out}"]
      + [f"--override={o}" for o in TINY])
  assert json.loads(out.read_text()) == report
  assert (report["steps"], report["devices"], report["attention"]) == (6, 2,
                                                                       "2:4")
  assert report["last_loss"] < report["first_loss"]
  # Only the order of the float32 gradient sums differs (per device, then
  # across devices): a few ulps (1.2e-7) a step, which Adam's normalised
  # updates carry into the later losses; 1e-5 is ~80 ulps after 6 steps.
  assert report["max_rel_loss_difference"] < 1e-5, report
  one = report["final_metrics_1_device"]["test"]["bits_per_byte"]
  two = report["final_metrics_2_devices"]["test"]["bits_per_byte"]
  np.testing.assert_allclose(two, one, rtol=1e-5)
  assert report["tokens_per_second_1_device"] > 0
  assert report["speedup"] == pytest.approx(
      report["tokens_per_second_2_devices"]
      / report["tokens_per_second_1_device"])


def test_device_env_selects_the_devices():
  cpu = data_parallel.device_env("cpu", 3)
  assert cpu["JAX_PLATFORMS"] == "cpu"
  assert "--xla_force_host_platform_device_count=3" in cpu["XLA_FLAGS"].split()
  assert data_parallel.device_env("gpu", 2)["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_compare_and_main_reject_bad_input():
  ones = np.ones(4)
  with pytest.raises(ValueError, match="different numbers of steps: 4 and 3"):
    data_parallel.compare(ones, ones[:3], ones, ones, 0, 32, 2)
  with pytest.raises(ValueError, match="not finite"):
    data_parallel.compare(ones, np.array([1, np.nan, 1, 1]), ones, ones, 0,
                          32, 2)
  with pytest.raises(ValueError, match="skip_steps=4"):
    data_parallel.compare(ones, ones, ones, ones, 4, 32, 2)
  with pytest.raises(ValueError, match="--devices=1"):
    data_parallel.main(["--devices=1"])
  with pytest.raises(ValueError, match="'seq_len'"):
    data_parallel.main(["--override=seq_len"])
