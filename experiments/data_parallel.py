"""Data-parallel training against one device: same loss curve, how much faster.

  python -m experiments.data_parallel [--devices=2] [--steps=300] \
      [--override=data.seq_len=1024 ...] [--workdir=runs/data_parallel] \
      [--json=PATH]

Trains the byte-level decoder (`experiments/configs/bytelm.py`, 2:4
attention with `implementation=None`, so the GPU kernels run) twice with
`experiments.train`'s own command line, each in a fresh process: on 1 device
and on `--devices` devices, at the same global batch, seed and data order.
`experiments.train` shards the batch over a 1-D mesh of all the devices it
sees; the devices are chosen per process with `CUDA_VISIBLE_DEVICES` on a GPU
machine, and made with `--xla_force_host_platform_device_count` on a CPU
(`--platform`, default `gpu` where `nvidia-smi` is on the PATH).

The loss is logged every step. Reported (printed, and as JSON to `--json`
or `$OUT/data_parallel.json`): the largest absolute and relative difference
between the two loss curves (only the order of the float32 gradient
reductions differs between the runs, so they agree to rounding that grows
slowly with the step), the final evaluation of each, and tokens per second of
each (the median over the steps after `--skip_steps`, which hold the
compilation) with the N-device run's speed-up.

The mesh has one axis ("data"): attention sharded over heads needs a second
mesh axis in `experiments.train`, which it does not have.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np

from experiments import train

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "experiments" / "configs" / "bytelm.py"
# The run of issue 24: 2:4 attention, long enough sequences to fill a GPU.
DEFAULT_OVERRIDES = ("attention.kind=nm", "attention.n=2", "attention.m=4",
                     "data.seq_len=1024", "batch_size=32",
                     "optimizer.warmup_steps=30")


def device_env(platform: str, num_devices: int) -> dict[str, str]:
  """The environment of a training process that sees `num_devices` devices."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  if platform == "gpu":
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(num_devices)))
  else:
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(
        flags + [f"--xla_force_host_platform_device_count={num_devices}"])
  return env


def train_command(config: pathlib.Path, overrides, steps: int,
                  workdir: pathlib.Path) -> list[str]:
  """`experiments.train`'s command line: loss every step, no mid-run eval."""
  schedule = (f"num_steps={steps}", "log_every=1", f"eval_every={steps}",
              f"checkpoint_every={steps}")
  return ([sys.executable, "-m", "experiments.train", f"--config={config}",
           f"--workdir={workdir}"]
          + [f"--config.{o}" for o in (*overrides, *schedule)])


def run_training(config, overrides, steps, workdir, platform, num_devices,
                 timeout):
  """One fresh training run; returns (loss per step, examples/s per step,
  final_metrics.json)."""
  if workdir.exists():  # a fresh run, never a resumed one
    shutil.rmtree(workdir)
  result = subprocess.run(
      train_command(config, overrides, steps, workdir),
      env=device_env(platform, num_devices), cwd=REPO, capture_output=True,
      text=True, timeout=timeout)
  if result.returncode:
    raise RuntimeError(f"training on {num_devices} device(s) failed "
                       f"(exit {result.returncode}):\n{result.stderr[-4000:]}")
  summary = json.loads((workdir / "final_metrics.json").read_text())
  if summary["num_devices"] != num_devices:
    raise RuntimeError(f"asked for {num_devices} device(s); the run saw "
                       f"{summary['num_devices']}")
  rows = [r for r in train.read_metrics(workdir) if r[1] == "train"]
  curve = lambda name: np.asarray(
      [v for _, _, metric, v in sorted(rows) if metric == name])
  return curve("loss"), curve("examples_per_second"), summary


def compare(losses_one, losses_many, speed_one, speed_many, skip_steps,
            tokens_per_example, num_devices) -> dict:
  """The agreement of two loss curves and the throughput of the two runs."""
  if losses_one.shape != losses_many.shape or not len(losses_one):
    raise ValueError("the runs logged different numbers of steps: "
                     f"{len(losses_one)} and {len(losses_many)}")
  if not (np.isfinite(losses_one).all() and np.isfinite(losses_many).all()):
    raise ValueError("a loss curve is not finite; no comparison to report")
  if not 0 <= skip_steps < len(speed_one):
    raise ValueError(f"skip_steps must be in [0, {len(speed_one)}); got "
                     f"skip_steps={skip_steps}")
  difference = np.abs(losses_many - losses_one)
  tokens_one = float(np.median(speed_one[skip_steps:])) * tokens_per_example
  tokens_many = float(np.median(speed_many[skip_steps:])) * tokens_per_example
  return {
      "steps": len(losses_one),
      "max_abs_loss_difference": float(difference.max()),
      "max_rel_loss_difference": float(np.max(difference / np.abs(losses_one))),
      "first_loss": float(losses_one[0]), "last_loss": float(losses_one[-1]),
      "tokens_per_second_1_device": tokens_one,
      f"tokens_per_second_{num_devices}_devices": tokens_many,
      "speedup": tokens_many / tokens_one,
      "scaling_efficiency": tokens_many / tokens_one / num_devices,
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=2)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--skip_steps", type=int, default=10,
                      help="first steps left out of tokens/s (compilation)")
  parser.add_argument("--config", type=pathlib.Path, default=DEFAULT_CONFIG)
  parser.add_argument("--override", action="append", default=[],
                      help="config override a.b=value, after the defaults "
                      f"{' '.join(DEFAULT_OVERRIDES)}")
  parser.add_argument("--platform", choices=("gpu", "cpu"),
                      default="gpu" if shutil.which("nvidia-smi") else "cpu")
  parser.add_argument("--workdir", type=pathlib.Path,
                      default=pathlib.Path("runs/data_parallel"))
  parser.add_argument("--json", type=pathlib.Path, default=None)
  parser.add_argument("--timeout", type=float, default=3600.0,
                      help="seconds per training run")
  args = parser.parse_args(argv)
  if args.devices < 2:
    raise ValueError(f"--devices must be >= 2; got --devices={args.devices}")
  if args.steps < 1:
    raise ValueError(f"--steps must be >= 1; got --steps={args.steps}")
  overrides = (*DEFAULT_OVERRIDES, *args.override)
  for override in overrides:
    if "=" not in override:
      raise ValueError(f"--override must be a.b=value; got {override!r}")
  workdir = args.workdir.absolute()
  runs = {}
  for num_devices in (1, args.devices):
    runs[num_devices] = run_training(
        args.config.absolute(), overrides, args.steps,
        workdir / f"{num_devices}_devices", args.platform, num_devices,
        args.timeout)
  (loss_one, speed_one, summary_one) = runs[1]
  (loss_many, speed_many, summary_many) = runs[args.devices]
  # Tokens predicted per example: the config's sequence length.
  seq_len = json.loads((workdir / "1_devices" / "config.json").read_text())[
      "data"]["seq_len"]
  report = compare(loss_one, loss_many, speed_one, speed_many,
                   min(args.skip_steps, args.steps - 1), seq_len, args.devices)
  report.update({
      "devices": args.devices, "platform": args.platform,
      "config": str(args.config), "overrides": list(overrides),
      "attention": summary_one["attention"],
      "final_metrics_1_device": summary_one["metrics"],
      f"final_metrics_{args.devices}_devices": summary_many["metrics"],
      "command": " ".join([sys.executable, "-m", "experiments.data_parallel",
                           *(argv if argv is not None else sys.argv[1:])]),
  })
  out = args.json or (pathlib.Path(os.environ["OUT"]) / "data_parallel.json"
                      if os.environ.get("OUT") else None)
  if out is not None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
  print(f"{report['attention']} byte LM, {report['steps']} steps, "
        f"1 vs {args.devices} {args.platform} devices")
  print(f"  loss curves: max |diff| {report['max_abs_loss_difference']:.3g}, "
        f"max rel {report['max_rel_loss_difference']:.3g} "
        f"(loss {report['first_loss']:.4f} -> {report['last_loss']:.4f})")
  print(f"  tokens/s: {report['tokens_per_second_1_device']:.4g} on 1, "
        f"{report[f'tokens_per_second_{args.devices}_devices']:.4g} on "
        f"{args.devices}: {report['speedup']:.2f}x "
        f"({100 * report['scaling_efficiency']:.0f}% efficiency)")
  return report


if __name__ == "__main__":
  main()
