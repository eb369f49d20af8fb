"""experiments.launch: sweeps of real training runs, a failing trial, resume,
a killed launcher, a trial another launcher runs, the xmanager executor."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

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
  assert "1 of 3 trials are not done: 001_" in out

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


def write_sweep(path: pathlib.Path, overrides: dict, trials: str,
                config: pathlib.Path = REPO / "experiments/configs/listops.py"):
  path.write_text(textwrap.dedent(f"""
      from experiments.launch import Sweep, product

      def get_sweep():
        return Sweep(config={str(config)!r},
                     trials=product([{overrides!r}], {trials}))
      """))
  return path


def write_listops_config(path: pathlib.Path, checkpoint_every: int):
  """A config file: listops.py's config with this checkpoint schedule."""
  path.write_text(textwrap.dedent(f"""
      from experiments.configs import listops

      def get_config():
        config = listops.get_config()
        config.checkpoint_every = {checkpoint_every}
        return config
      """))
  return path


def alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def launcher_env(tmp_path):
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
              HOME=str(tmp_path))  # xmanager's database goes to ~/.xmanager


def test_killing_the_launcher_stops_its_trials_and_a_rerun_resumes(tmp_path):
  # The checkpoint schedule is in the config file, not the trials' overrides
  # (which name the trial dirs), so that the rerun can change it.
  config_file = write_listops_config(tmp_path / "listops_long.py", 10)
  overrides = {k: v for k, v in TINY.items() if k != "checkpoint_every"}
  sweep_file = write_sweep(
      tmp_path / "long.py", {**overrides, "num_steps": 600, "log_every": 10,
                             "eval_every": 0},
      '[{"seed": 0}, {"seed": 1}]', config_file)
  sweep_dir = tmp_path / "sweep"
  argv = [f"--sweep={sweep_file}", f"--workdir={sweep_dir}", "--parallel=2"]
  launcher = subprocess.Popen(
      [sys.executable, "-m", "experiments.launch", *argv], cwd=REPO,
      env=launcher_env(tmp_path), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  trial_dirs = [launch.Trial(sweep_dir, i, overrides).workdir for i, overrides
                in enumerate(launch.load_sweep(str(sweep_file)).trials)]
  def checkpointed(trial_dir):
    checkpoints = trial_dir / "checkpoints"
    return checkpoints.is_dir() and any(
        p.name.isdigit() for p in checkpoints.iterdir())

  deadline = time.monotonic() + 300
  while not all(checkpointed(d) for d in trial_dirs):
    assert launcher.poll() is None, launcher.stdout.read()[-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.1)
  pids = [json.loads((d / "status.json").read_text())["pid"]
          for d in trial_dirs]
  launcher.send_signal(signal.SIGTERM)
  out, _ = launcher.communicate(timeout=120)
  assert launcher.returncode == 128 + signal.SIGTERM, out[-3000:]
  assert "stopped by SIGTERM" in out
  for trial_dir, pid in zip(trial_dirs, pids):
    status = json.loads((trial_dir / "status.json").read_text())
    assert (status["status"], status["signal"]) == ("interrupted", "SIGTERM")
    assert not alive(pid)
    assert not (trial_dir / "final_metrics.json").exists()

  # Saving every 10 steps keeps the trials busy until the kill; the rerun
  # saves only at the end (a field a resumed run may change), or its ~59
  # saves would be most of its time.
  write_listops_config(config_file, 0)
  assert launch.main(argv) == 0
  for trial_dir in trial_dirs:
    assert json.loads((trial_dir / "status.json").read_text())[
        "status"] == "done"
    final = json.loads((trial_dir / "final_metrics.json").read_text())
    assert 10 <= final["resumed_from_step"] < 600
    assert final["config_changes_on_resume"] == {"checkpoint_every": [10, 0]}
    assert (trial_dir / "log.txt").read_text().count("=== ") == 2


def test_a_trial_running_elsewhere_is_left_alone(tmp_path, capsys):
  sweep_file = write_sweep(tmp_path / "one.py", TINY, '[{"seed": 0}]')
  sweep_dir = tmp_path / "sweep"
  trial = launch.Trial(sweep_dir, 0, {**TINY, "seed": 0})
  # A live process of this trial's command line, as another launcher's.
  other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)",
                            f"--workdir={trial.workdir}"])
  # Until the child has exec'd, /proc shows the forked pytest's command line
  # (which the launcher rightly reads as another program): wait for its own.
  cmdline = pathlib.Path(f"/proc/{other.pid}/cmdline")
  deadline = time.monotonic() + 30
  while (f"--workdir={trial.workdir}".encode() not in cmdline.read_bytes()
         and time.monotonic() < deadline):
    time.sleep(0.01)
  try:
    trial.set_status(status="running", pid=other.pid)
    argv = [f"--sweep={sweep_file}", f"--workdir={sweep_dir}"]
    assert launch.main(argv) == 1
    assert f"running elsewhere (pid {other.pid}), left alone" in (
        capsys.readouterr().out)
    assert not (trial.workdir / "log.txt").exists()
  finally:
    other.kill()
    other.wait()
  # Its pid is dead now: the stale "running" trial starts again.
  assert launch.main(argv) == 0
  assert trial.status()["status"] == "done"


def test_xm_runs_a_two_trial_sweep_on_the_local_executor(tmp_path):
  sweep_file = write_sweep(tmp_path / "xm_sweep.py", TINY,
                           '[{"attention.kind": "dense"}, '
                           '{"attention.kind": "nm", "attention.n": 2}]')
  sweep_dir = tmp_path / "sweep"
  sweep = launch.load_sweep(str(sweep_file))
  trial = launch.Trial(sweep_dir, 1, sweep.trials[1])
  args = launch.xm_trial_args(sweep, trial)
  assert args[:2] == ["-m", "experiments.train"]
  assert "--config.attention.n=2" in args
  assert args[-1] == f"--workdir={trial.workdir}"

  result = subprocess.run(
      [sys.executable, "-m", "experiments.launch", f"--sweep={sweep_file}",
       f"--workdir={sweep_dir}", "--xm"], cwd=REPO, env=launcher_env(tmp_path),
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  labels = []
  for index, overrides in enumerate(sweep.trials):
    trial = launch.Trial(sweep_dir, index, overrides)
    status = trial.status()
    assert status["status"] == "done" and status["xm_work_unit_id"] >= 1
    labels.append(trial.final_metrics()["attention"])
  assert labels == ["dense", "2:4"]
  assert (tmp_path / ".xmanager" / "experiments.sqlite3").exists()
  assert "| done |" in (sweep_dir / "results.md").read_text()
