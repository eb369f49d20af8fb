"""xmanager-style sweeps over `experiments.train`.

A sweep file is a Python module with `get_sweep()` returning a `Sweep`: one
config file and a list of trials, each a dict of `--config.*` overrides,
usually built with `product` and `axis`:

  def get_sweep():
    return Sweep(config="experiments/configs/listops.py",
                 trials=product(ATTENTION_KINDS, axis("seed", [0, 1])))

  python -m experiments.launch --sweep=experiments/sweeps/NAME.py \
      [--workdir=runs/sweeps/NAME] [--parallel=1] [--xm]

The local executor runs the trials one by one (showing each trial's output)
or `--parallel` at a time, each as its own `python -m experiments.train`
process in `WORKDIR/TRIAL/` with
  status.json   pending | running | done | failed | interrupted, return
                code, times, command, pid
  log.txt       the trial's stdout and stderr
  final_metrics.json, metrics.csv, checkpoints/ (written by the trial)
A failing trial is recorded and the others go on. SIGTERM or SIGINT to the
launcher is forwarded to its running trials, which are reaped (killed after
`STOP_GRACE_SECONDS`) and marked `interrupted`; the launcher then exits with
128 + the signal number. Running the same command again resumes the sweep:
finished trials are kept, a trial whose status says `running` with a live
pid (another launcher's) is left alone, and the rest (re)start once each and
resume from their own checkpoints. At the end the launcher prints a results
table (also written to WORKDIR/results.csv and results.md) and exits 1 if any
trial is not done. With `--xm` the same trials run as the work units of one
xmanager experiment on its local executor (see `run_xmanager`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import importlib.util
import itertools
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

STATUSES = ("pending", "running", "done", "failed", "interrupted")
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# How long stopped trials may take to exit before they are killed.
STOP_GRACE_SECONDS = 30.0

# Dense attention against the DFSS patterns, as override sets.
ATTENTION_KINDS = (
    {"attention.kind": "dense"},
    {"attention.kind": "nm", "attention.n": 2, "attention.m": 4},
    {"attention.kind": "nm", "attention.n": 1, "attention.m": 2},
)


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A config file (relative to the repository root or absolute) and trials."""
  config: str
  trials: tuple[dict, ...]

  def __post_init__(self):
    if not self.trials:
      raise ValueError(f"a sweep needs at least one trial; got trials="
                       f"{self.trials!r}")
    for trial in self.trials:
      if not isinstance(trial, dict):
        raise ValueError(f"each trial must be a dict of overrides; got {trial!r}")


def axis(field: str, values) -> list[dict]:
  """One override per value: `axis("seed", [0, 1])` -> `[{"seed": 0}, {"seed": 1}]`."""
  return [{field: value} for value in values]


def product(*axes) -> tuple[dict, ...]:
  """All combinations of override sets, one from each axis, merged."""
  trials = []
  for combination in itertools.product(*axes):
    merged = {}
    for overrides in combination:
      merged.update(overrides)
    trials.append(merged)
  return tuple(trials)


def trial_name(index: int, overrides: dict) -> str:
  """`003_kind=nm_n=2_m=4`: the index and the overrides' last name parts
  (`init_from` paths left out)."""
  parts = [f"{field.split('.')[-1]}={value}" for field, value in
           overrides.items() if field != "init_from"]
  name = "_".join([f"{index:03d}"] + parts)
  return "".join(c if c.isalnum() or c in "=_-.:@" else "-" for c in name)


def load_sweep(path: str) -> Sweep:
  spec = importlib.util.spec_from_file_location("sweep_file", path)
  if spec is None or not os.path.isfile(path):
    raise ValueError(f"sweep file not found; got --sweep={path!r}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sweep = module.get_sweep()
  # Sweep files import this module by name, which differs from __main__.
  from experiments import launch  # pylint: disable=g-import-not-at-top
  if not isinstance(sweep, (Sweep, launch.Sweep)):
    raise ValueError(f"get_sweep() in {path} must return a Sweep; got "
                     f"{type(sweep).__name__}")
  return sweep


def train_command(sweep: Sweep, overrides: dict, workdir: pathlib.Path):
  """The `python -m experiments.train` argv of one trial."""
  config = sweep.config
  if not os.path.isabs(config):
    config = str(REPO_ROOT / config)
  return ([sys.executable, "-m", "experiments.train", f"--config={config}"] +
          [f"--config.{field}={value}"
           for field, value in overrides.items()] + [f"--workdir={workdir}"])


def _now():
  return datetime.datetime.now().isoformat(timespec="seconds")


class Trial:
  """One trial's work dir and status file."""

  def __init__(self, sweep_dir: pathlib.Path, index: int, overrides: dict):
    self.name = trial_name(index, overrides)
    self.overrides = overrides
    self.workdir = sweep_dir / self.name
    self.status_path = self.workdir / "status.json"

  def status(self) -> dict:
    if self.status_path.exists():
      return json.loads(self.status_path.read_text())
    return {"status": "pending"}

  def set_status(self, **fields):
    status = {**self.status(), **fields, "overrides": self.overrides}
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.status_path.write_text(json.dumps(status, indent=2))

  def running_elsewhere(self) -> int | None:
    """The pid of a live process running this trial according to
    status.json (a launcher other than this one), else None."""
    status = self.status()
    pid = status.get("pid")
    if status["status"] != "running" or pid is None:
      return None
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return None
    except PermissionError:
      return pid  # alive, another user's
    # A recycled pid runs some other command line.
    cmdline = pathlib.Path(f"/proc/{pid}/cmdline")
    if cmdline.exists() and (f"--workdir={self.workdir}".encode()
                             not in cmdline.read_bytes().split(b"\0")):
      return None
    return pid

  def final_metrics(self) -> dict:
    path = self.workdir / "final_metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _copy_output(source, log, echo_stream):
  """Copies a trial's output to its log (and `echo_stream`) as it comes."""
  for chunk in iter(lambda: source.read1(4096), b""):
    log.write(chunk.decode(errors="replace"))
    log.flush()
    if echo_stream is not None:
      echo_stream.write(chunk.decode(errors="replace"))
      echo_stream.flush()


def _trial_env() -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  return env


def _trials_to_run(sweep: Sweep, sweep_dir: pathlib.Path, echo):
  """(all trials, the ones to start): not done, not running elsewhere."""
  trials = [Trial(sweep_dir, i, o) for i, o in enumerate(sweep.trials)]
  queue = []
  for trial in trials:
    status = trial.status()["status"]
    pid = trial.running_elsewhere()
    if status == "done":
      echo(f"[sweep] {trial.name}: done earlier, kept")
    elif pid is not None:
      echo(f"[sweep] {trial.name}: running elsewhere (pid {pid}), left alone")
    else:
      queue.append(trial)
  return trials, queue


class _StopSignals:
  """While active, SIGTERM and SIGINT are recorded (the first in `signum`)
  instead of ending the process; the previous handlers come back on exit."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for signum in (signal.SIGTERM, signal.SIGINT):
      self._previous[signum] = signal.signal(signum, self._record)
    return self

  def _record(self, signum, frame):
    del frame
    if self.signum is None:
      self.signum = signum

  def __exit__(self, *exc_info):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


def _stop(running: dict, signum: int, echo) -> None:
  """Forwards `signum` to the running trials, reaps them (killing those
  still alive after STOP_GRACE_SECONDS) and marks them interrupted."""
  for trial, process, _, _ in running.values():
    process.send_signal(signum)
  deadline = time.monotonic() + STOP_GRACE_SECONDS
  for trial, process, log, pump in running.values():
    try:
      process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()
    pump.join()
    log.close()
    # A trial that finished as the signal came is done.
    status = "done" if process.returncode == 0 else "interrupted"
    trial.set_status(status=status, finished=_now(),
                     returncode=process.returncode,
                     signal=signal.Signals(signum).name)
    echo(f"[sweep] {trial.name}: {status} on {signal.Signals(signum).name}"
         f" (return code {process.returncode})")
  running.clear()


def run_local(sweep: Sweep, sweep_dir: pathlib.Path, parallel: int,
              echo=print) -> tuple[list[Trial], int | None]:
  """Runs the unfinished trials, `parallel` at a time.

  Returns all trials and the signal that stopped the sweep (None if it ran
  to the end).
  """
  if parallel < 1:
    raise ValueError(f"parallel must be >= 1; got parallel={parallel}")
  trials, queue = _trials_to_run(sweep, sweep_dir, echo)
  running = {}
  env = _trial_env()
  with _StopSignals() as stop:
    while (queue or running) and stop.signum is None:
      while queue and len(running) < parallel and stop.signum is None:
        trial = queue.pop(0)
        command = train_command(sweep, trial.overrides, trial.workdir)
        trial.workdir.mkdir(parents=True, exist_ok=True)
        log = (trial.workdir / "log.txt").open("a")
        log.write(f"\n=== {_now()} {' '.join(command)}\n")
        log.flush()
        # Its own session: a terminal's Ctrl-C reaches the trial once,
        # forwarded by the launcher, which then reaps it.
        process = subprocess.Popen(command, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                   env=env, start_new_session=True)
        # One trial at a time: its output (progress bar) also goes to ours.
        pump = threading.Thread(
            target=_copy_output,
            args=(process.stdout, log, sys.stdout if parallel == 1 else None),
            daemon=True)
        pump.start()
        trial.set_status(status="running", started=_now(), pid=process.pid,
                         command=command, returncode=None, signal=None)
        running[trial.name] = (trial, process, log, pump)
        echo(f"[sweep] {trial.name}: started (pid {process.pid})")
      time.sleep(0.5)
      for name, (trial, process, log, pump) in list(running.items()):
        returncode = process.poll()
        if returncode is None:
          continue
        pump.join()
        log.close()
        status = "done" if returncode == 0 else "failed"
        trial.set_status(status=status, finished=_now(), returncode=returncode)
        del running[name]
        echo(f"[sweep] {trial.name}: {status} (return code {returncode})"
             + ("" if returncode == 0 else f"; see {trial.workdir / 'log.txt'}"))
    if stop.signum is not None:
      _stop(running, stop.signum, echo)
  return trials, stop.signum


def xm_trial_args(sweep: Sweep, trial: Trial) -> list[str]:
  """The arguments of a trial's xmanager job: `train_command` after the
  interpreter, which is the job's binary."""
  return train_command(sweep, trial.overrides, trial.workdir)[1:]


def run_xmanager(sweep: Sweep, sweep_dir: pathlib.Path, title: str,
                 echo=print) -> list[Trial]:
  """Runs the unfinished trials as the work units of one xmanager experiment.

  Each trial is a job on xmanager's local executor (`xm_local.Local`) whose
  executable is `xm.binary` of this interpreter with `xm_trial_args`: the
  same process, work dir, status.json and resume as the local executor's,
  without containers (no Docker). All trials start at once; their output goes
  to ours, prefixed with the job name. xmanager records the experiment in its
  database (default `~/.xmanager/experiments.sqlite3`). Returns all trials.
  """
  try:
    from xmanager import xm, xm_local  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit("--xm needs xmanager, which is not installed: "
                     "pip install xmanager, or run without --xm") from None
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():  # xmanager reads its absl flags' defaults
    flags.FLAGS.mark_as_parsed()
  trials, queue = _trials_to_run(sweep, sweep_dir, echo)

  async def run_all():
    async with xm_local.create_experiment(experiment_title=title) as experiment:
      [executable] = experiment.package([xm.binary(
          executor_spec=xm_local.Local.Spec(), path=sys.executable,
          env_vars={"PYTHONPATH": _trial_env()["PYTHONPATH"]})])

      async def run(trial):
        args = xm_trial_args(sweep, trial)
        trial.workdir.mkdir(parents=True, exist_ok=True)
        work_unit = await experiment.add(xm.Job(
            executable=executable, executor=xm_local.Local(), args=args))
        trial.set_status(status="running", started=_now(), pid=None,
                         command=[sys.executable] + args, returncode=None,
                         xm_experiment_id=experiment.experiment_id,
                         xm_work_unit_id=work_unit.work_unit_id)
        echo(f"[sweep] {trial.name}: started (xmanager work unit "
             f"{work_unit.work_unit_id})")
        try:
          await work_unit.wait_until_complete()
          trial.set_status(status="done", finished=_now(), returncode=0)
        except xm.ExperimentUnitError as error:
          trial.set_status(status="failed", finished=_now(),
                           error=str(error))
        echo(f"[sweep] {trial.name}: {trial.status()['status']}")

      await asyncio.gather(*(run(trial) for trial in queue))

  try:
    asyncio.run(run_all())
  except RuntimeError as error:
    # Leaving the experiment re-raises a failed job's error, which its
    # trial's status already records.
    if not any(t.status()["status"] == "failed" for t in queue):
      raise
    echo(f"[sweep] xmanager: {error}")
  return trials


def _flatten(metrics: dict, prefix="") -> dict:
  flat = {}
  for key, value in metrics.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}/"))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def results_table(trials: list[Trial]) -> list[dict]:
  """One row per trial: name, status, overrides, final metrics (flattened)."""
  fields = []
  for trial in trials:
    fields.extend(k for k in trial.overrides if k not in fields)
  rows = []
  for trial in trials:
    row = {"trial": trial.name, "status": trial.status()["status"]}
    row.update({k: trial.overrides.get(k) for k in fields})
    final = trial.final_metrics() if row["status"] == "done" else {}
    row.update(_flatten(final.get("metrics", {})))
    rows.append(row)
  return rows


def _format_cell(value) -> str:
  if isinstance(value, float):
    return f"{value:.4f}"
  return "" if value is None else str(value)


def format_markdown(rows: list[dict]) -> str:
  columns = []
  for row in rows:
    columns.extend(c for c in row if c not in columns)
  lines = ["| " + " | ".join(columns) + " |",
           "|" + "---|" * len(columns)]
  for row in rows:
    lines.append("| " + " | ".join(_format_cell(row.get(c)) for c in columns)
                 + " |")
  return "\n".join(lines)


def write_results(rows: list[dict], sweep_dir: pathlib.Path) -> str:
  """Writes results.csv / results.md in the sweep dir; returns the markdown."""
  import csv  # pylint: disable=g-import-not-at-top
  columns = []
  for row in rows:
    columns.extend(c for c in row if c not in columns)
  with (sweep_dir / "results.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  markdown = format_markdown(rows)
  (sweep_dir / "results.md").write_text(markdown + "\n")
  return markdown


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description="Run a sweep of experiments.train trials.")
  parser.add_argument("--sweep", required=True, help="sweep file (.py)")
  parser.add_argument("--workdir", default=None,
                      help="sweep directory; default runs/sweeps/<name>")
  parser.add_argument("--parallel", type=int, default=1,
                      help="trials run at once by the local executor")
  parser.add_argument("--xm", action="store_true",
                      help="run the trials as an xmanager experiment on its "
                      "local executor (all at once)")
  args = parser.parse_args(argv)
  sweep = load_sweep(args.sweep)
  name = pathlib.Path(args.sweep).stem
  sweep_dir = pathlib.Path(args.workdir or os.path.join("runs", "sweeps",
                                                        name)).absolute()
  sweep_dir.mkdir(parents=True, exist_ok=True)
  signum = None
  if args.xm:
    trials = run_xmanager(sweep, sweep_dir, title=name)
  else:
    trials, signum = run_local(sweep, sweep_dir, args.parallel)
  print(write_results(results_table(trials), sweep_dir))
  if signum is not None:
    print(f"[sweep] stopped by {signal.Signals(signum).name}; run the same "
          "command again to resume the interrupted trials")
    return 128 + signum
  failed = [t.name for t in trials if t.status()["status"] != "done"]
  if failed:
    print(f"[sweep] {len(failed)} of {len(trials)} trials are not done: "
          f"{', '.join(failed)}")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
