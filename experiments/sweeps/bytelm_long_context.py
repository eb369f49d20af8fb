"""Byte LM at S = 4096 from scratch: dense vs 2:4 vs 2:4 inside a hierarchical
block pattern (topk_blocks with a dense local band and sink, 0.335 of the
causal blocks); experiments/configs/bytelm_long.py.

  python -m experiments.launch --sweep=experiments/sweeps/bytelm_long_context.py

or, with overrides added to every trial and a table of bits per byte and
seconds per step at the end (what experiments/long_context_gpu.sh runs):

  python -m experiments.sweeps.bytelm_long_context \
      [--workdir=runs/sweeps/bytelm_long_context] \
      [--set num_steps=100 --set log_every=25 ...] [--json=PATH]

Both run the trials one by one through the launcher's local executor
(`experiments.launch.run_local`: status, logs, resume, signal forwarding).
This module imports no JAX, so the launching process holds no GPU memory.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import pathlib
import signal
import statistics
import sys

from experiments import launch
from experiments.launch import ATTENTION_KINDS, Sweep

HIERARCHICAL = {"attention.kind": "nm", "attention.n": 2, "attention.m": 4,
                "attention.pattern.name": "topk"}


def get_sweep(extra: dict | None = None) -> Sweep:
  """The three trials, each with the overrides `extra` added."""
  trials = tuple(ATTENTION_KINDS[:2]) + (HIERARCHICAL,)
  return Sweep(config="experiments/configs/bytelm_long.py",
               trials=tuple({**trial, **(extra or {})} for trial in trials))


def window_seconds_per_step(workdir: pathlib.Path) -> list[tuple[int, float]]:
  """`(step, seconds per step)` of each logged train window of a trial.

  From metrics.csv's `examples_per_second` (a window's steps times the batch
  over its wall time) and config.json's batch size. The first window of a
  session also holds the train step's compilation.
  """
  batch_size = json.loads((workdir / "config.json").read_text())["batch_size"]
  rates = []
  with (workdir / "metrics.csv").open() as f:
    for row in csv.DictReader(f):
      if row["split"] == "train" and row["metric"] == "examples_per_second":
        rates.append((int(row["step"]), batch_size / float(row["value"])))
  return sorted(rates)


def _seconds_between(start: str | None, end: str | None) -> float | None:
  if not (start and end):
    return None
  return (datetime.datetime.fromisoformat(end)
          - datetime.datetime.fromisoformat(start)).total_seconds()


def attention_label(config: dict) -> str:
  """"dense", "2:4" or "2:4 in topk blocks" for a resolved config.json."""
  attention = config["attention"]
  if attention["kind"] == "dense":
    return "dense"
  label = f"{attention['n']}:{attention['m']}"
  pattern = attention.get("pattern", {}).get("name", "")
  return f"{label} in {pattern} blocks" if pattern else label


def trial_summary(trial: launch.Trial) -> dict:
  """A trial's bits per byte and speed.

  `attention`: `attention_label` of its config.json ("" before it has one);
  `seconds_per_step`: the median over the logged windows after the first
  (None with fewer than two windows), so that the windows holding a
  compilation (the first, and the first after a resume) do not count;
  `first_window_seconds_per_step` includes the compilation;
  `wall_seconds`: the last session's process, start to end (status.json).
  """
  status = trial.status()
  final = trial.final_metrics().get("metrics", {})
  config_path = trial.workdir / "config.json"
  summary = {"trial": trial.name, "status": status["status"],
             "attention": (attention_label(json.loads(config_path.read_text()))
                           if config_path.exists() else ""),
             "overrides": trial.overrides,
             "valid_bits_per_byte": final.get("valid", {}).get("bits_per_byte"),
             "test_bits_per_byte": final.get("test", {}).get("bits_per_byte"),
             "steps": 0, "seconds_per_step": None,
             "first_window_seconds_per_step": None,
             "wall_seconds": _seconds_between(status.get("started"),
                                              status.get("finished"))}
  if (trial.workdir / "metrics.csv").exists():
    windows = window_seconds_per_step(trial.workdir)
    if windows:
      summary["steps"] = windows[-1][0]
      summary["first_window_seconds_per_step"] = windows[0][1]
    if len(windows) > 1:
      summary["seconds_per_step"] = statistics.median(s for _, s in windows[1:])
  return summary


def format_table(rows: list[dict]) -> str:
  """Markdown: one row per trial (its index), bits per byte and seconds per step."""
  def cell(value, digits):
    return "" if value is None else f"{value:.{digits}f}"
  lines = ["| trial | attention | status | steps | valid bits/byte | "
           "test bits/byte | s/step | s/step, first window | wall s |",
           "|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    lines.append(
        f"| {row['trial'][:3]} | {row['attention']} | {row['status']} | "
        f"{row['steps']} | "
        f"{cell(row['valid_bits_per_byte'], 4)} | "
        f"{cell(row['test_bits_per_byte'], 4)} | "
        f"{cell(row['seconds_per_step'], 4)} | "
        f"{cell(row['first_window_seconds_per_step'], 3)} | "
        f"{cell(row['wall_seconds'], 0)} |")
  return "\n".join(lines)


def parse_overrides(pairs: list[str]) -> dict:
  """`["num_steps=100", ...]` -> `{"num_steps": "100", ...}` (the launcher
  passes them on as `--config.FIELD=VALUE`, typed by the config)."""
  overrides = {}
  for pair in pairs:
    field, sep, value = pair.partition("=")
    if not sep or not field:
      raise ValueError(f"--set must be FIELD=VALUE; got --set={pair!r}")
    overrides[field] = value
  return overrides


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default=os.path.join(
      "runs", "sweeps", "bytelm_long_context"), help="sweep directory")
  parser.add_argument("--set", action="append", default=[], dest="overrides",
                      metavar="FIELD=VALUE",
                      help="config override added to every trial (repeatable)")
  parser.add_argument("--json", default=None,
                      help="summary JSON; default WORKDIR/long_context.json")
  args = parser.parse_args(argv)
  extra = parse_overrides(args.overrides)
  sweep = get_sweep(extra)
  sweep_dir = pathlib.Path(args.workdir).absolute()
  sweep_dir.mkdir(parents=True, exist_ok=True)
  trials, signum = launch.run_local(sweep, sweep_dir, parallel=1)
  launch.write_results(launch.results_table(trials), sweep_dir)
  rows = [trial_summary(trial) for trial in trials]
  json_path = pathlib.Path(args.json or sweep_dir / "long_context.json")
  json_path.write_text(json.dumps(
      {"sweep": "experiments/sweeps/bytelm_long_context.py",
       "config": sweep.config, "overrides": extra, "trials": rows},
      indent=2))
  print(format_table(rows))
  print(f"[sweep] summary: {json_path}; the launcher's table: "
        f"{sweep_dir / 'results.md'}")
  if signum is not None:
    print(f"[sweep] stopped by {signal.Signals(signum).name}; the same "
          "command resumes the trials that are not done")
    return 128 + signum
  return 0 if all(row["status"] == "done" for row in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
