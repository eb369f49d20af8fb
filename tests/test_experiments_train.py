"""experiments.train: loss goes down, kill-and-resume, sharding over 2
processes of 2 fake devices (jax.distributed), config validation."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import train

REPO = pathlib.Path(__file__).resolve().parent.parent
LISTOPS = REPO / "experiments" / "configs" / "listops.py"
BYTELM = REPO / "experiments" / "configs" / "bytelm.py"

TINY_MODEL = {"model.hidden_size": 32, "model.num_heads": 2,
              "model.mlp_size": 64, "model.num_layers": 1,
              "optimizer.warmup_steps": 2}
TINY_LISTOPS = {**TINY_MODEL, "data.num_train": 256, "data.num_valid": 32,
                "data.num_test": 32, "data.min_length": 8,
                "data.max_length": 31, "data.max_depth": 4,
                "batch_size": 8, "eval_batch_size": 16,
                "attention.kind": "nm"}


def load_config(path, overrides):
  """`get_config()` of a config file with `{"a.b": value}` overrides."""
  spec = importlib.util.spec_from_file_location("experiment_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def train_command(config_path, overrides, workdir):
  return ([sys.executable, "-m", "experiments.train", f"--config={config_path}"]
          + [f"--config.{k}={v}" for k, v in overrides.items()]
          + [f"--workdir={workdir}"])


def subprocess_env(devices=1):
  """This process's environment (its XLA_FLAGS too) with `devices` CPU devices."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(
      [f for f in env.get("XLA_FLAGS", "").split()
       if not f.startswith("--xla_force_host_platform_device_count")]
      + [f"--xla_force_host_platform_device_count={devices}"])
  return env


def deterministic_rows(workdir):
  """metrics.csv rows without the wall-clock throughput."""
  return [row for row in train.read_metrics(workdir)
          if row[2] != "examples_per_second"]


def test_a_few_steps_reduce_the_loss(tmp_path, seed):
  config = load_config(BYTELM, {
      **TINY_MODEL, "data.seq_len": 32, "data.eval_windows": 16,
      "batch_size": 8, "eval_batch_size": 16, "num_steps": 30,
      "log_every": 5, "eval_every": 15, "checkpoint_every": 15,
      "optimizer.learning_rate": 3e-3, "attention.kind": "nm", "seed": seed})
  summary = train.train_and_evaluate(config, tmp_path)
  losses = [v for step, split, name, v in train.read_metrics(tmp_path)
            if split == "train" and name == "loss"]
  assert len(losses) == 6
  assert losses[-1] < losses[0] - 1.0, losses  # from ~ln(256) = 5.5
  valid = [v for step, split, name, v in train.read_metrics(tmp_path)
           if split == "valid" and name == "bits_per_byte"]
  assert valid[-1] < valid[0]
  assert summary["metrics"]["test"]["bits_per_byte"] < 8.0
  assert summary["attention"] == "2:4"
  assert list(tmp_path.glob("events.out.tfevents*"))
  assert (tmp_path / "config.json").exists()

  # init_from: a new run starting from these parameters begins where this
  # one ended, not at ln(256).
  config.num_steps, config.init_from = 5, str(tmp_path)
  train.train_and_evaluate(config, tmp_path / "continued")
  first = [v for step, split, name, v in train.read_metrics(
      tmp_path / "continued") if split == "train" and name == "loss"][0]
  assert first < losses[0] - 1.0, (first, losses)


def test_init_from_needs_a_checkpoint(tmp_path):
  config = load_config(LISTOPS, {**TINY_LISTOPS, "num_steps": 2,
                                 "init_from": str(tmp_path / "nothing")})
  with pytest.raises(ValueError, match="config.init_from="):
    train.train_and_evaluate(config, tmp_path / "run")


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
  overrides = {**TINY_LISTOPS, "num_steps": 32, "log_every": 4,
               "eval_every": 16, "checkpoint_every": 8}
  workdir = tmp_path / "killed"
  process = subprocess.Popen(train_command(LISTOPS, overrides, workdir),
                             env=subprocess_env(), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 300
  while not (workdir / "checkpoints" / "8").is_dir():
    assert process.poll() is None, process.stderr.read()[-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  # The command line again resumes it, while the uninterrupted run goes on
  # here (one process start fewer; the same train_and_evaluate behind both).
  rerun = subprocess.Popen(train_command(LISTOPS, overrides, workdir),
                           env=subprocess_env(), cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
  uninterrupted = train.train_and_evaluate(load_config(LISTOPS, overrides),
                                           tmp_path / "straight")
  _, stderr = rerun.communicate(timeout=600)
  assert rerun.returncode == 0, stderr[-3000:]
  resumed = json.loads((workdir / "final_metrics.json").read_text())

  assert 8 <= resumed["resumed_from_step"] < 32
  assert resumed["metrics"] == uninterrupted["metrics"]
  assert deterministic_rows(workdir) == deterministic_rows(
      tmp_path / "straight")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_hosts_of_two_fake_devices_equal_one_device(tmp_path):
  # One process of several devices against one device is
  # test_experiments_data_parallel's; here the batch is sharded over 4
  # devices in two processes, joined by jax.distributed.
  overrides = {**TINY_LISTOPS, "num_steps": 8, "log_every": 2,
               "eval_every": 4, "checkpoint_every": 8}
  port = _free_port()
  hosts = [subprocess.Popen(
      train_command(LISTOPS, overrides, tmp_path / "hosts") + [
          "--jax_distributed", f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2", f"--process_id={i}"],
      env=subprocess_env(devices=2), cwd=REPO, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  # The one-device run goes on here meanwhile (the hosts wait on each other
  # at every collective).
  single = train.train_and_evaluate(load_config(LISTOPS, overrides),
                                    tmp_path / "one")
  for host in hosts:
    _, stderr = host.communicate(timeout=600)
    assert host.returncode == 0, stderr[-3000:]
  two_hosts = json.loads((tmp_path / "hosts" / "final_metrics.json").read_text())
  assert single["num_devices"] == 1
  assert (two_hosts["num_devices"], two_hosts["num_processes"]) == (4, 2)
  rows1 = deterministic_rows(tmp_path / "one")
  rows = deterministic_rows(tmp_path / "hosts")
  assert [r[:3] for r in rows] == [r[:3] for r in rows1]
  np.testing.assert_allclose([r[3] for r in rows], [r[3] for r in rows1],
                             rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("task", "imagenet", "config.task='imagenet'"),
    ("attention.kind", "sparse", "kind='sparse'"),
    ("batch_size", 0, "config.batch_size=0"),
    ("num_steps", -1, "config.num_steps=-1"),
    ("checkpoint_every", -1, "config.checkpoint_every=-1"),
    ("eval_every", -1, "config.eval_every=-1"),
    ("max_checkpoints_to_keep", 0, "config.max_checkpoints_to_keep=0"),
    ("optimizer.learning_rate", 0.0, "learning_rate=0.0"),
    ("final_eval_splits", ("dev",), "config.final_eval_splits=('dev',)"),
])
def test_bad_configs_raise_naming_the_field(field, value, message):
  config = load_config(LISTOPS, {field: value})
  with pytest.raises(ValueError, match=re.escape(message)):
    train.validate(config)


def test_batch_must_divide_over_devices(tmp_path):
  result = subprocess.run(
      train_command(LISTOPS, {**TINY_LISTOPS, "batch_size": 6}, tmp_path),
      env=subprocess_env(devices=4), cwd=REPO, capture_output=True, text=True,
      timeout=300)
  assert result.returncode != 0
  assert "config.batch_size=6" in result.stderr
