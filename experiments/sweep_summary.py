"""Runs a sweep through the launcher, then summarises its byte-LM trials.

  python -m experiments.sweep_summary --sweep=experiments/sweeps/NAME.py \
      [--workdir=runs/sweeps/NAME] [--set FIELD=VALUE ...] \
      [--only FIELD=V1,V2 ...] [--parallel=1] [--json=PATH] [--device=TEXT]

The trials run through the launcher's local executor
(`experiments.launch.run_local`: status, logs, resume, signal forwarding),
`--parallel` at a time; `--set` adds an override to every trial, `--only`
keeps the trials whose FIELD is one of the values (before `--set`; trial
names keep the full sweep's indices only where the kept trials come first).
Then it prints and writes (JSON, default WORKDIR/NAME.json):

  trials  per trial: valid and test bits per byte, seconds per step (the
          median of the logged windows after the first, which holds the
          compilation), the first window's, and the wall time;
  groups  the trials that differ only in `seed`: per split the mean, the
          sample standard deviation and the min and max of bits per byte
          over the done trials, the relative difference of the means to the
          dense group of the same other overrides, and per seed the test
          difference to that seed's dense trial (same initialisation and
          batches: the kinds share a parameter tree).

experiments/sweep_gpu.sh runs this on a GPU machine; experiments/report.py
renders the JSON of the bytelm_gpu sweeps into docs/RESULTS.md. This module
imports no JAX, so the launching process holds no GPU memory.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import pathlib
import signal
import statistics
import sys

from experiments import launch


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


def parse_only(pairs: list[str]) -> dict[str, tuple[str, ...]]:
  """`["seed=0,1"]` -> `{"seed": ("0", "1")}`."""
  only = {}
  for pair in pairs:
    field, sep, values = pair.partition("=")
    kept = tuple(v for v in values.split(",") if v)
    if not sep or not field or not kept:
      raise ValueError(f"--only must be FIELD=VALUE[,VALUE...]; got "
                       f"--only={pair!r}")
    only[field] = kept
  return only


def prepare(sweep: launch.Sweep, extra: dict | None = None,
            only: dict[str, tuple[str, ...]] | None = None) -> launch.Sweep:
  """`sweep` with the trials `only` keeps (values compared as strings), each
  with the overrides `extra` added."""
  trials = sweep.trials
  for field, values in (only or {}).items():
    if not any(field in trial for trial in trials):
      raise ValueError(f"--only field {field!r} is set by no trial of the "
                       f"sweep; got --only={field}={','.join(values)}")
    trials = tuple(t for t in trials if str(t.get(field)) in values)
  if not trials:
    raise ValueError(f"--only keeps no trial of the sweep; got only={only!r}")
  return launch.Sweep(config=sweep.config,
                      trials=tuple({**t, **(extra or {})} for t in trials))


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
  `seed`: config.json's (else the overrides', else None);
  `seconds_per_step`: the median over the logged windows after the first
  (None with fewer than two windows), so that the windows holding a
  compilation (the first, and the first after a resume) do not count;
  `first_window_seconds_per_step` includes the compilation;
  `wall_seconds`: the last session's process, start to end (status.json).
  """
  status = trial.status()
  final = trial.final_metrics().get("metrics", {})
  config_path = trial.workdir / "config.json"
  config = json.loads(config_path.read_text()) if config_path.exists() else {}
  summary = {"trial": trial.name, "status": status["status"],
             "attention": attention_label(config) if config else "",
             "seed": config.get("seed", trial.overrides.get("seed")),
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


def spread(values: list[float]) -> dict:
  """n, mean, sample standard deviation (None below two values), min, max."""
  if not values:
    return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
  return {"n": len(values), "mean": statistics.fmean(values),
          "std": statistics.stdev(values) if len(values) > 1 else None,
          "min": min(values), "max": max(values)}


def _relative(value, reference):
  if value is None or not reference:
    return None
  return (value - reference) / reference


def _result(row: dict, split: str) -> float | None:
  value = row[f"{split}_bits_per_byte"]
  if row["status"] != "done" or value is None or not math.isfinite(value):
    return None
  return value


def group_summaries(rows: list[dict]) -> list[dict]:
  """The trials that differ only in `seed`, in order of first appearance.

  Each group: `attention`, `overrides` (without the seed), `trials`,
  `seeds` (of the done trials), `valid` / `test`: `spread` of their bits
  per byte; `relative_to_dense`: per split, (mean - dense mean) / dense
  mean, the dense group being the one with the same overrides outside
  `seed` and `attention.*` (None without one); `test_relative_by_seed`:
  {seed: (test - that seed's dense test) / that dense test};
  `seconds_per_step`: the median of the trials'.
  """
  groups = {}
  for row in rows:
    rest = {k: v for k, v in row["overrides"].items() if k != "seed"}
    group = groups.setdefault(json.dumps(rest, sort_keys=True, default=str),
                              {"attention": "", "overrides": rest, "rows": []})
    group["attention"] = group["attention"] or row["attention"]
    group["rows"].append(row)

  summaries = []
  for group in groups.values():
    done = [r for r in group["rows"] if _result(r, "test") is not None]
    speeds = [r["seconds_per_step"] for r in group["rows"]
              if r["seconds_per_step"] is not None]
    summaries.append({
        "attention": group["attention"], "overrides": group["overrides"],
        "trials": [r["trial"] for r in group["rows"]],
        "seeds": [r["seed"] for r in done],
        **{split: spread([v for r in group["rows"]
                          if (v := _result(r, split)) is not None])
           for split in ("valid", "test")},
        "seconds_per_step": statistics.median(speeds) if speeds else None,
        "_rows": done})

  def context(summary):
    return json.dumps({k: v for k, v in summary["overrides"].items()
                       if not k.startswith("attention.")},
                      sort_keys=True, default=str)
  dense = {}
  for summary in summaries:
    if summary["attention"] == "dense":
      dense.setdefault(context(summary), summary)
  for summary in summaries:
    reference = dense.get(context(summary))
    summary["relative_to_dense"] = {
        split: _relative(summary[split]["mean"],
                         reference and reference[split]["mean"])
        for split in ("valid", "test")}
    dense_by_seed = {r["seed"]: _result(r, "test")
                     for r in (reference["_rows"] if reference else [])}
    summary["test_relative_by_seed"] = {
        str(r["seed"]): _relative(_result(r, "test"), dense_by_seed[r["seed"]])
        for r in summary["_rows"] if r["seed"] in dense_by_seed}
  for summary in summaries:
    del summary["_rows"]
  return summaries


def _cell(value, digits):
  return "" if value is None else f"{value:.{digits}f}"


def _percent(value):
  return "" if value is None else f"{100 * value:+.2f}%"


def format_table(rows: list[dict]) -> str:
  """Markdown: one row per trial (its index), bits per byte and seconds per step."""
  lines = ["| trial | attention | seed | status | steps | valid bits/byte | "
           "test bits/byte | s/step | s/step, first window | wall s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    seed = "" if row["seed"] is None else row["seed"]
    lines.append(
        f"| {row['trial'][:3]} | {row['attention']} | {seed} | "
        f"{row['status']} | {row['steps']} | "
        f"{_cell(row['valid_bits_per_byte'], 4)} | "
        f"{_cell(row['test_bits_per_byte'], 4)} | "
        f"{_cell(row['seconds_per_step'], 4)} | "
        f"{_cell(row['first_window_seconds_per_step'], 3)} | "
        f"{_cell(row['wall_seconds'], 0)} |")
  return "\n".join(lines)


def _range(stats):
  if stats["min"] is None:
    return ""
  return f"{stats['min']:.4f}-{stats['max']:.4f}"


def format_groups(groups: list[dict]) -> str:
  """Markdown: one row per group, mean and spread over its seeds."""
  lines = ["| attention | seeds | test bits/byte: mean | std | min-max | "
           "valid: mean | std | min-max | test vs dense | per seed | "
           "s/step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for group in groups:
    test, valid = group["test"], group["valid"]
    per_seed = ", ".join(_percent(v)
                         for v in group["test_relative_by_seed"].values())
    lines.append(
        f"| {group['attention']} | "
        f"{','.join(str(s) for s in group['seeds'])} | "
        f"{_cell(test['mean'], 4)} | {_cell(test['std'], 4)} | "
        f"{_range(test)} | {_cell(valid['mean'], 4)} | "
        f"{_cell(valid['std'], 4)} | {_range(valid)} | "
        f"{_percent(group['relative_to_dense']['test'])} | {per_seed} | "
        f"{_cell(group['seconds_per_step'], 4)} |")
  return "\n".join(lines)


def summarize(sweep_file: str, sweep: launch.Sweep, trials, *, extra: dict,
              only: dict, parallel: int, device: str,
              signum: int | None) -> dict:
  """The JSON of a run of `sweep` (its `trials`, run or not); `trial_config`
  is the first trial's resolved config.json ({} before it has one)."""
  rows = [trial_summary(trial) for trial in trials]
  first_config = trials[0].workdir / "config.json"
  return {"sweep": sweep_file, "config": sweep.config, "overrides": extra,
          "only": {k: list(v) for k, v in only.items()},
          "parallel": parallel, "device": device,
          "written": datetime.datetime.now().isoformat(timespec="seconds"),
          "stopped_by": None if signum is None else signal.Signals(signum).name,
          "trial_config": (json.loads(first_config.read_text())
                           if first_config.exists() else {}),
          "trials": rows, "groups": group_summaries(rows)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sweep", required=True, help="sweep file (.py)")
  parser.add_argument("--workdir", default=None,
                      help="sweep directory; default runs/sweeps/NAME")
  parser.add_argument("--set", action="append", default=[], dest="overrides",
                      metavar="FIELD=VALUE",
                      help="config override added to every trial (repeatable)")
  parser.add_argument("--only", action="append", default=[],
                      metavar="FIELD=V1,V2",
                      help="keep the trials whose FIELD is one of the values "
                      "(repeatable)")
  parser.add_argument("--parallel", type=int, default=1,
                      help="trials run at once")
  parser.add_argument("--json", default=None,
                      help="summary JSON; default WORKDIR/NAME.json")
  parser.add_argument("--device", default="",
                      help="what the trials ran on, recorded in the JSON")
  args = parser.parse_args(argv)
  name = pathlib.Path(args.sweep).stem
  extra = parse_overrides(args.overrides)
  only = parse_only(args.only)
  sweep = prepare(launch.load_sweep(args.sweep), extra, only)
  sweep_dir = pathlib.Path(
      args.workdir or os.path.join("runs", "sweeps", name)).absolute()
  sweep_dir.mkdir(parents=True, exist_ok=True)
  trials, signum = launch.run_local(sweep, sweep_dir, parallel=args.parallel)
  launch.write_results(launch.results_table(trials), sweep_dir)
  summary = summarize(args.sweep, sweep, trials, extra=extra, only=only,
                      parallel=args.parallel, device=args.device,
                      signum=signum)
  json_path = pathlib.Path(args.json or sweep_dir / f"{name}.json")
  json_path.write_text(json.dumps(summary, indent=2))
  print(format_table(summary["trials"]))
  print()
  print(format_groups(summary["groups"]))
  print(f"[sweep] summary: {json_path}; the launcher's table: "
        f"{sweep_dir / 'results.md'}")
  if signum is not None:
    print(f"[sweep] stopped by {signal.Signals(signum).name}; the same "
          "command resumes the trials that are not done")
    return 128 + signum
  return 0 if all(row["status"] == "done" for row in summary["trials"]) else 1


if __name__ == "__main__":
  sys.exit(main())
