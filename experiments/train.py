"""The single training entry point for every experiment.

  python -m experiments.train --config=experiments/configs/NAME.py \
      [--config.some.field=value ...] [--workdir=DIR]

The work dir (default `runs/NAME`, after the config file) receives:
  config.json          the resolved config
  checkpoints/         orbax checkpoints every `checkpoint_every` steps
  metrics.csv          step,split,metric,value (train, valid, test rows)
  events.out.tfevents* TensorBoard scalars
  final_metrics.json   the last evaluation of every split, run statistics

`--config.init_from=OTHER_WORKDIR` starts from the parameters of another run's
latest checkpoint (fresh optimizer, step 0): e.g. finetune a dense run with
N:M attention. Re-running with the same work dir resumes from the latest
checkpoint and continues the same run: the data order is a function of (seed, step), and
metrics logged after the checkpoint are dropped and recomputed.

Training is data-parallel over all local devices (a 1-D `jax.sharding.Mesh`
named "data"; parameters replicated, the batch split). With
`--jax_distributed` the process joins a multi-host job through
`jax.distributed.initialize` (coordinator from the flags or the cluster
environment) and the mesh spans every host's devices.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments import tasks


def validate(config) -> None:
  """Raises ValueError naming the field and value of a bad config."""
  if config.task not in tasks.TASKS:
    raise ValueError(f"config.task must be one of {tasks.TASKS}; got "
                     f"config.task={config.task!r}")
  tasks.attention_spec(config)  # validates attention.kind / n / m
  positive = ("batch_size", "eval_batch_size", "log_every", "eval_every",
              "checkpoint_every")
  for name in positive:
    if config[name] < 1:
      raise ValueError(f"config.{name} must be >= 1; got "
                       f"config.{name}={config[name]}")
  if config.num_steps < 0:
    raise ValueError(f"config.num_steps must be >= 0; got "
                     f"config.num_steps={config.num_steps}")
  if config.checkpoint_every % config.log_every:
    raise ValueError(
        "config.checkpoint_every must be a multiple of config.log_every (the "
        "logged train averages then restart at checkpoints); got "
        f"config.checkpoint_every={config.checkpoint_every}, "
        f"config.log_every={config.log_every}")
  optimizer = config.optimizer
  if optimizer.learning_rate <= 0:
    raise ValueError("config.optimizer.learning_rate must be > 0; got "
                     f"config.optimizer.learning_rate={optimizer.learning_rate}")
  if optimizer.warmup_steps < 0:
    raise ValueError("config.optimizer.warmup_steps must be >= 0; got "
                     f"config.optimizer.warmup_steps={optimizer.warmup_steps}")
  for name in ("eval_splits", "final_eval_splits"):
    if not set(config[name]) <= {"train", "valid", "test"}:
      raise ValueError(f"config.{name} entries must be train, valid or test; "
                       f"got config.{name}={tuple(config[name])}")


def make_optimizer(config):
  """AdamW with linear warm-up then cosine decay; returns (tx, schedule)."""
  opt = config.optimizer
  decay_steps = max(config.num_steps, opt.warmup_steps + 1)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.learning_rate,
      warmup_steps=opt.warmup_steps, decay_steps=decay_steps,
      end_value=opt.learning_rate * opt.end_learning_rate_fraction)
  tx = optax.chain(
      optax.clip_by_global_norm(opt.grad_clip_norm),
      optax.adamw(schedule, b1=opt.b1, b2=opt.b2,
                  weight_decay=opt.weight_decay))
  return tx, schedule


class MetricWriter:
  """Scalars to `metrics.csv` (step,split,metric,value) and TensorBoard.

  `resume(step, final)` drops CSV rows after `step` (and, when `final`, the
  final evaluation's rows at `step`, which the run writes again) and tells
  TensorBoard to discard its events after `step` (a SessionLog.START), so a
  resumed run's metrics read as one uninterrupted run.
  """

  def __init__(self, workdir: pathlib.Path, enabled: bool):
    self.enabled = enabled
    self.csv_path = workdir / "metrics.csv"
    self._events = None
    if enabled:
      from tensorboard.summary.writer.event_file_writer import EventFileWriter  # pylint: disable=g-import-not-at-top
      self._events = EventFileWriter(str(workdir))

  def resume(self, step: int, final: bool) -> None:
    if not self.enabled:
      return
    if self.csv_path.exists():
      with self.csv_path.open() as f:
        rows = [row for row in csv.reader(f)]
      kept = [row for row in rows[1:] if int(row[0]) < step or (
          int(row[0]) == step and (row[1] == "train" or not final))]
      with self.csv_path.open("w", newline="") as f:
        csv.writer(f).writerows([rows[0]] + kept)
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self._events.add_event(event_pb2.Event(
        wall_time=time.time(), step=step,
        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    new = not self.csv_path.exists()
    with self.csv_path.open("a", newline="") as f:
      writer = csv.writer(f)
      if new:
        writer.writerow(["step", "split", "metric", "value"])
      for name, value in sorted(scalars.items()):
        writer.writerow([step, split, name, repr(float(value))])
    self._events.add_event(event_pb2.Event(
        wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=f"{split}/{name}",
                                      simple_value=float(value))
            for name, value in sorted(scalars.items())])))
    self._events.flush()

  def close(self):
    if self._events is not None:
      self._events.close()


def read_metrics(workdir) -> list[tuple[int, str, str, float]]:
  """The rows of a run's metrics.csv as (step, split, metric, value)."""
  with (pathlib.Path(workdir) / "metrics.csv").open() as f:
    return [(int(r["step"]), r["split"], r["metric"], float(r["value"]))
            for r in csv.DictReader(f)]


class DataParallel:
  """A 1-D mesh over every device; puts global numpy batches on it."""

  def __init__(self):
    self.mesh = Mesh(np.asarray(jax.devices()), ("data",))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
    self.num_devices = self.mesh.size

  def shard(self, global_batch: dict[str, np.ndarray]):
    """Global arrays `[batch, ...]` split over the mesh; each process hands in
    only its own rows."""
    def put(x):
      per_process = x.shape[0] // jax.process_count()
      start = jax.process_index() * per_process
      return jax.make_array_from_process_local_data(
          self.batch_sharding, x[start:start + per_process], x.shape)
    return jax.tree.map(put, global_batch)

  def gather(self, outputs) -> dict[str, np.ndarray]:
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(
        outputs, tiled=True))


def evaluate(task, predict, params, split, batch_size, parallel) -> dict:
  """`task.metrics` over a whole split, `batch_size` examples per call."""
  inputs = task.eval_inputs(split)
  num = len(next(iter(inputs.values())))
  outputs = []
  for start in range(0, num, batch_size):
    chunk = {k: v[start:start + batch_size] for k, v in inputs.items()}
    size = len(next(iter(chunk.values())))
    if size < batch_size:  # pad with copies of the first row; cut below
      chunk = {k: np.concatenate([v, np.repeat(v[:1], batch_size - size, 0)])
               for k, v in chunk.items()}
    out = parallel.gather(predict(params, parallel.shard(chunk)))
    outputs.append(jax.tree.map(lambda x, size=size: x[:size], out))
  merged = jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)
  return task.metrics(merged)


def _params_of_run(run_dir, abstract_state):
  """The parameters of another run's latest checkpoint (`config.init_from`)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(run_dir).absolute() / "checkpoints"
  with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
      read_only=True)) as other:
    step = other.latest_step()
    if step is None:
      raise ValueError(f"config.init_from must be a run dir with a "
                       f"checkpoint; got config.init_from={str(run_dir)!r}")
    return other.restore(step, args=ocp.args.StandardRestore(
        abstract_state))["params"]


def _config_to_json(config) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def train_and_evaluate(config, workdir) -> dict:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint).

  Returns the final metrics (also written to `workdir/final_metrics.json`).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  validate(config)
  workdir = pathlib.Path(workdir).absolute()
  is_chief = jax.process_index() == 0
  parallel = DataParallel()
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % parallel.num_devices:
      raise ValueError(
          f"config.{name} must be divisible by the {parallel.num_devices} "
          f"devices; got config.{name}={config[name]}")
  if is_chief:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(_config_to_json(config))

  task = tasks.build(config)
  tx, schedule = make_optimizer(config)

  params = jax.device_put(task.init_params(jax.random.key(config.seed)),
                          parallel.replicated)
  state = {"step": jax.device_put(jnp.zeros((), jnp.int32), parallel.replicated),
           "params": params,
           "opt_state": jax.jit(tx.init, out_shardings=parallel.replicated)(
               params)}
  num_params = sum(x.size for x in jax.tree.leaves(state["params"]))

  manager = ocp.CheckpointManager(
      workdir / "checkpoints",
      options=ocp.CheckpointManagerOptions(
          save_interval_steps=config.checkpoint_every,
          max_to_keep=config.max_checkpoints_to_keep, create=True))
  start_step = 0
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  if manager.latest_step() is not None:
    start_step = manager.latest_step()
    state = manager.restore(start_step,
                            args=ocp.args.StandardRestore(abstract))
  elif config.init_from:
    state["params"] = _params_of_run(config.init_from, abstract)
  writer = MetricWriter(workdir, enabled=is_chief)
  # Evaluations at num_steps are the final ones, which this run redoes.
  writer.resume(start_step, final=start_step == config.num_steps)

  dropout_key = jax.random.key(config.seed + 1)

  @jax.jit
  def train_step(state, batch):
    rng = jax.random.fold_in(dropout_key, state["step"])
    (loss, aux), grads = jax.value_and_grad(task.loss, has_aux=True)(
        state["params"], batch, rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2)
                             for g in jax.tree.leaves(grads)))
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "learning_rate": schedule(state["step"]), **aux}
    return {"step": state["step"] + 1, "params": params,
            "opt_state": opt_state}, metrics

  predict = jax.jit(task.predict)

  def run_eval(step, splits):
    results = {}
    for split in splits:
      results[split] = evaluate(task, predict, state["params"], split,
                                config.eval_batch_size, parallel)
      writer.write(step, split, results[split])
    return results

  progress = tqdm(total=config.num_steps, initial=start_step,
                  desc=config.get("name", config.task), disable=not is_chief,
                  dynamic_ncols=True, file=sys.stdout, mininterval=1.0)
  accumulated, count = [], 0
  window_start = time.perf_counter()
  train_seconds = 0.0
  for step in range(start_step, config.num_steps):
    batch = parallel.shard(task.train_batch(step))
    state, metrics = train_step(state, batch)
    accumulated.append(metrics)
    count += 1
    progress.update(1)
    done = step + 1
    if done % config.log_every == 0 or done == config.num_steps:
      means = {k: float(np.mean([float(m[k]) for m in accumulated]))
               for k in accumulated[0]}
      elapsed = time.perf_counter() - window_start
      train_seconds += elapsed
      means["examples_per_second"] = count * config.batch_size / elapsed
      writer.write(done, "train", means)
      progress.set_postfix(loss=f"{means['loss']:.4f}",
                           ex_per_s=f"{means['examples_per_second']:.1f}")
      accumulated, count = [], 0
    if done % config.eval_every == 0 and done != config.num_steps:
      run_eval(done, config.eval_splits)
    if done % config.checkpoint_every == 0 or done == config.num_steps:
      manager.save(done, args=ocp.args.StandardSave(state), force=True)
    if done % config.log_every == 0:
      window_start = time.perf_counter()
  progress.close()
  manager.wait_until_finished()

  final = run_eval(config.num_steps, config.final_eval_splits)
  summary = {
      "name": config.get("name", config.task),
      "task": config.task,
      "attention": tasks.attention_spec(config).label,
      "num_steps": config.num_steps,
      "resumed_from_step": start_step,
      "num_params": int(num_params),
      "num_devices": parallel.num_devices,
      "num_processes": jax.process_count(),
      "train_seconds_this_session": round(train_seconds, 2),
      "metrics": final,
  }
  if is_chief:
    (workdir / "final_metrics.json").write_text(json.dumps(summary, indent=2))
  writer.close()
  manager.close()
  return summary


def main(argv):
  """absl entry point; flags are defined in `_define_flags`."""
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  config = flags.FLAGS.config
  if flags.FLAGS.jax_distributed:
    jax.distributed.initialize(
        coordinator_address=flags.FLAGS.coordinator_address,
        num_processes=flags.FLAGS.num_processes,
        process_id=flags.FLAGS.process_id)
  workdir = flags.FLAGS.workdir
  if workdir is None:
    config_name = pathlib.Path(flags.FLAGS["config"].config_filename).stem
    workdir = os.path.join("runs", config_name)
  summary = train_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    print(json.dumps(summary["metrics"], indent=2, sort_keys=True))


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file (experiments/configs/*.py).",
      lock_config=True)
  flags.mark_flag_as_required("config")
  flags.DEFINE_string("workdir", None,
                      "Output directory; default runs/<config name>.")
  flags.DEFINE_bool("jax_distributed", False,
                    "Call jax.distributed.initialize (multi-host run).")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 (with --jax_distributed; "
                      "default: from the cluster environment).")
  flags.DEFINE_integer("num_processes", None,
                       "Number of processes (with --jax_distributed).")
  flags.DEFINE_integer("process_id", None,
                       "This process's index (with --jax_distributed).")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
