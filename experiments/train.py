"""The single training entry point for every experiment.

  python -m experiments.train --config=experiments/configs/NAME.py \
      [--config.some.field=value ...] [--workdir=DIR] [--force_resume]

The work dir (default `runs/NAME/OVERRIDES`, after the config file and the
`--config.*` overrides, see `default_workdir`) receives:
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

A run is right or it stops:
  * resuming a work dir whose `config.json` differs from the new config in
    any field outside `RESUMABLE_FIELDS` is a ValueError naming the fields
    (`--force_resume` continues anyway and records the changes);
  * a latest checkpoint that does not restore, or restores to a state that is
    not finite or not shaped as this config's state, is moved to
    `rejected_checkpoints/` with a warning and the one before it is used;
  * a non-finite training loss or gradient norm (checked at every log and
    before every checkpoint, so no non-finite state is saved) or a non-finite
    evaluation metric raises `NonFiniteError` (exit code 1); nothing
    non-finite is ever written as a result.

Training is data-parallel over all local devices (a 1-D `jax.sharding.Mesh`
named "data"; parameters replicated, the batch split). With
`--jax_distributed` the process joins a multi-host job through
`jax.distributed.initialize` (coordinator from the flags or the cluster
environment) and the mesh spans every host's devices.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import pathlib
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments import tasks
from experiments.models.attention import AttentionSpec

log = logging.getLogger(__name__)

# Config fields that may differ between a work dir's `config.json` and the
# config that resumes it: they change how long the run goes on and what is
# logged, evaluated or kept, not what is trained up to the checkpoint. (A new
# `num_steps` also moves the end of the cosine decay, so a lengthened run
# differs from one started with that length from the checkpoint on.)
RESUMABLE_FIELDS = frozenset({
    "num_steps", "log_every", "eval_every", "checkpoint_every",
    "max_checkpoints_to_keep", "eval_batch_size", "eval_splits",
    "final_eval_splits"})


class NonFiniteError(FloatingPointError):
  """A training loss, gradient norm or evaluation metric is NaN or infinite."""


def validate(config) -> None:
  """Raises ValueError naming the field and value of a bad config."""
  tasks.import_task_module(config)  # registers a user's task
  if config.task not in tasks.TASKS:
    raise ValueError(f"config.task must be one of {tasks.TASKS}; got "
                     f"config.task={config.task!r}")
  tasks.attention_spec(config)  # validates attention.kind / n / m
  # A task that does not declare other compute dtypes runs in float32 only,
  # so a bfloat16 request is refused rather than ignored.
  dtypes = getattr(tasks.TASKS[config.task], "compute_dtypes", ("float32",))
  dtype = config.get("model", {}).get("dtype", "float32")
  if dtype not in dtypes:
    raise ValueError(f"config.model.dtype must be one of {dtypes} for task "
                     f"{config.task!r}; got config.model.dtype={dtype!r}")
  for name in ("batch_size", "eval_batch_size", "log_every"):
    if config[name] < 1:
      raise ValueError(f"config.{name} must be >= 1; got "
                       f"config.{name}={config[name]}")
  # 0: no periodic evaluation / only the final checkpoint.
  for name in ("num_steps", "eval_every", "checkpoint_every"):
    if config[name] < 0:
      raise ValueError(f"config.{name} must be >= 0; got "
                       f"config.{name}={config[name]}")
  if config.max_checkpoints_to_keep < 1:
    raise ValueError("config.max_checkpoints_to_keep must be >= 1; got "
                     "config.max_checkpoints_to_keep="
                     f"{config.max_checkpoints_to_keep}")
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


def _flatten(tree: dict, prefix: str = "") -> dict:
  """`{"a": {"b": 1}}` -> `{"a.b": 1}`."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


_ABSENT = "<absent>"


def config_differences(saved_json: str, config) -> dict[str, tuple]:
  """`{field: (saved value, new value)}` for every field in which `config`
  differs from a saved `config.json` (compared as JSON, so tuples equal
  lists); a field missing on one side reads `"<absent>"`."""
  saved = _flatten(json.loads(saved_json))
  new = _flatten(json.loads(_config_to_json(config)))
  return {name: (saved.get(name, _ABSENT), new.get(name, _ABSENT))
          for name in sorted(saved.keys() | new.keys())
          if saved.get(name, _ABSENT) != new.get(name, _ABSENT)}


def default_workdir(config_file: str, overrides: dict) -> pathlib.Path:
  """`runs/<config file stem>/<overrides>`: a run's default work dir.

  No overrides give `runs/NAME/default`; otherwise the overrides, sorted by
  field, read `kind=nm_m=4_n=2` (the fields' last name parts; cut at 64
  characters) followed by the first 8 hex digits of a SHA-256 of all
  overrides, so any two different sets of overrides get different dirs and
  the same set (in any order) the same one.
  """
  root = pathlib.Path("runs") / pathlib.Path(config_file).stem
  if not overrides:
    return root / "default"
  fields = sorted(overrides)
  readable = "_".join(f"{field.split('.')[-1]}={overrides[field]}"
                      for field in fields)
  readable = "".join(c if c.isalnum() or c in "=_-.:@" else "-"
                     for c in readable)[:64]
  canonical = json.dumps([[field, overrides[field]] for field in fields],
                         default=repr)
  digest = hashlib.sha256(canonical.encode()).hexdigest()[:8]
  return root / f"{readable}-{digest}"


def _state_problem(state, reference, step: int) -> str | None:
  """Why a restored train state cannot continue the run, or None: its tree,
  shapes and dtypes must be `reference`'s, its step `step`, and every
  floating-point leaf finite."""
  if jax.tree.structure(state) != jax.tree.structure(reference):
    return "its tree structure differs from this config's train state"
  leaves = jax.tree_util.tree_leaves_with_path(state)
  for (path, leaf), ref in zip(leaves, jax.tree.leaves(reference)):
    if (leaf.shape, leaf.dtype) != (ref.shape, ref.dtype):
      return (f"{jax.tree_util.keystr(path)} is {leaf.dtype}{list(leaf.shape)}"
              f", this config's is {ref.dtype}{list(ref.shape)}")
  if int(state["step"]) != step:
    return f"it holds step {int(state['step'])}"
  for path, leaf in leaves:
    if jnp.issubdtype(leaf.dtype, jnp.inexact) and not bool(
        jnp.all(jnp.isfinite(leaf))):
      return f"{jax.tree_util.keystr(path)} is not finite"
  return None


def _restore_latest_intact(make_manager, reference, workdir: pathlib.Path,
                           is_chief: bool):
  """(manager, state, step) from the newest checkpoint that restores to a
  valid state (`_state_problem`); (manager, None, 0) if none does.

  Each newer checkpoint that fails is moved to `workdir/rejected_checkpoints/`
  with a warning (so that later saves of its step do not collide with it).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, reference)
  while True:
    manager = make_manager()
    step = manager.latest_step()
    if step is None:
      return manager, None, 0
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
      problem = _state_problem(state, reference, step)
    except Exception as error:  # pylint: disable=broad-except
      # orbax and tensorstore raise many types (ValueError, OSError,
      # tensorstore errors) for a truncated, rewritten or empty step dir.
      problem = f"it does not restore ({type(error).__name__}: {error})"
    if problem is None:
      return manager, state, step
    manager.close()
    rejected = workdir / "rejected_checkpoints" / str(step)
    log.warning("checkpoint %s is not used: %s; moving it to %s and "
                "resuming from the checkpoint before it", step,
                problem[:500], rejected)
    if is_chief:
      suffix = 0
      while rejected.exists():
        suffix += 1
        rejected = rejected.with_name(f"{step}.{suffix}")
      rejected.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(workdir / "checkpoints" / str(step)), str(rejected))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"rejected checkpoint {step}")


def _raise_if_not_finite(step_metrics, name: str) -> None:
  """NonFiniteError at the first (step, {metric: value}) whose loss or
  gradient norm is NaN or infinite."""
  for step, metrics in step_metrics:
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
      raise NonFiniteError(
          f"{name}: the training loss is not finite at step {step} "
          f"(loss={loss}, grad_norm={grad_norm}); the run stops here and "
          "saves nothing from this step on (lower "
          "config.optimizer.learning_rate, or check the data)")


def _attention_label(task, config) -> str:
  """The label of the attention the task's model runs: its own spec where it
  has one (a task may add a block pattern: "pattern+2:4"), else the config's."""
  spec = getattr(getattr(task, "model", None), "attention", None)
  if not isinstance(spec, AttentionSpec):
    spec = tasks.attention_spec(config)
  return spec.label


def train_and_evaluate(config, workdir, force_resume: bool = False) -> dict:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint).

  Returns the final summary (also written to `workdir/final_metrics.json`:
  the final metrics under "metrics", run statistics) and, only in the
  returned dict, "state": the final train state, a dict of "step", "params"
  and "opt_state" (replicated arrays).

  Raises ValueError if `workdir/config.json` differs from `config` outside
  `RESUMABLE_FIELDS` (unless `force_resume`), or if `config.num_steps` is
  below the step of the checkpoint it resumes; NonFiniteError on a
  non-finite training loss or evaluation metric.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  validate(config)
  workdir = pathlib.Path(workdir).absolute()
  is_chief = jax.process_index() == 0
  parallel = DataParallel()
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % parallel.num_devices:
      raise ValueError(
          f"config.{name} must be divisible by the {parallel.num_devices} "
          f"devices; got config.{name}={config[name]}")
  name = config.get("name", config.task)
  config_path = workdir / "config.json"
  changes = {}
  if config_path.exists():
    changes = config_differences(config_path.read_text(), config)
    refused = sorted(set(changes) - RESUMABLE_FIELDS)
    if refused and not force_resume:
      raise ValueError(
          f"workdir={str(workdir)!r} holds a run of another config; it "
          "differs in " + ", ".join(
              f"{field} ({changes[field][0]!r} there, {changes[field][1]!r} "
              "here)" for field in refused) +
          ". Choose another work dir, or resume with force_resume "
          "(--force_resume) to continue that run with this config")
  task = tasks.build(config)
  tx, schedule = make_optimizer(config)

  params = jax.device_put(task.init_params(jax.random.key(config.seed)),
                          parallel.replicated)
  state = {"step": jax.device_put(jnp.zeros((), jnp.int32), parallel.replicated),
           "params": params,
           "opt_state": jax.jit(tx.init, out_shardings=parallel.replicated)(
               params)}
  num_params = sum(x.size for x in jax.tree.leaves(state["params"]))

  def make_manager():
    return ocp.CheckpointManager(
        workdir / "checkpoints", options=ocp.CheckpointManagerOptions(
            max_to_keep=config.max_checkpoints_to_keep, create=True))

  manager, restored, start_step = _restore_latest_intact(
      make_manager, state, workdir, is_chief)
  if restored is not None:
    if start_step > config.num_steps:
      manager.close()
      raise ValueError(
          f"config.num_steps must be >= the step of the checkpoint it "
          f"resumes ({start_step} in {workdir / 'checkpoints'}); got "
          f"config.num_steps={config.num_steps}")
    state = restored
  if jax.process_count() > 1:  # every process has read config.json
    multihost_utils.sync_global_devices("config compared")
  if is_chief:
    config_path.write_text(_config_to_json(config))
    # The summary of an earlier session is not this config's result.
    (workdir / "final_metrics.json").unlink(missing_ok=True)
  if restored is None and config.init_from:
    state["params"] = _params_of_run(
        config.init_from, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  writer = MetricWriter(workdir, enabled=is_chief)
  try:
    summary = _train_loop(config, task, tx, schedule, state, start_step,
                          manager, writer, parallel)
  finally:
    writer.close()
    manager.close()
  state = summary.pop("state")
  summary = {
      "name": name,
      "task": config.task,
      "attention": _attention_label(task, config),
      "num_steps": config.num_steps,
      "resumed_from_step": start_step,
      "config_changes_on_resume": {field: list(values)
                                   for field, values in changes.items()},
      "num_params": int(num_params),
      "num_devices": parallel.num_devices,
      "num_processes": jax.process_count(),
      **summary,
  }
  if is_chief:
    (workdir / "final_metrics.json").write_text(json.dumps(summary, indent=2))
  return {**summary, "state": state}


def _train_loop(config, task, tx, schedule, state, start_step, manager,
                writer, parallel) -> dict:
  """Steps `start_step` to `config.num_steps`, logging, evaluating and
  checkpointing; then the final evaluation. Returns the run statistics, the
  final metrics and the final state."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  name = config.get("name", config.task)
  is_chief = jax.process_index() == 0
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
      bad = {k: v for k, v in results[split].items()
             if not math.isfinite(v)}
      if bad:
        raise NonFiniteError(f"{name}: {split} metrics at step {step} are "
                             f"not finite: {bad}")
      writer.write(step, split, results[split])
    return results

  def every(period, done):
    return period > 0 and done % period == 0

  progress = tqdm(total=config.num_steps, initial=start_step,
                  desc=name, disable=not is_chief,
                  dynamic_ncols=True, file=sys.stdout, mininterval=1.0)
  # Metrics of the log window, and of the steps whose loss is unchecked
  # (checked at each log and before each checkpoint, not every step, so that
  # steps are dispatched ahead of the host).
  accumulated, unchecked = [], []
  window_start = time.perf_counter()
  train_seconds = 0.0
  for step in range(start_step, config.num_steps):
    batch = parallel.shard(task.train_batch(step))
    state, metrics = train_step(state, batch)
    done = step + 1
    accumulated.append(metrics)
    unchecked.append((done, metrics))
    progress.update(1)
    final_step = done == config.num_steps
    if every(config.log_every, done) or final_step:
      _raise_if_not_finite(unchecked, name)
      unchecked = []
      means = {k: float(np.mean([float(m[k]) for m in accumulated]))
               for k in accumulated[0]}
      elapsed = time.perf_counter() - window_start
      train_seconds += elapsed
      means["examples_per_second"] = (len(accumulated) * config.batch_size
                                      / elapsed)
      writer.write(done, "train", means)
      progress.set_postfix(loss=f"{means['loss']:.4f}",
                           ex_per_s=f"{means['examples_per_second']:.1f}")
      accumulated = []
      window_start = time.perf_counter()
    if every(config.eval_every, done) and not final_step:
      run_eval(done, config.eval_splits)
    if every(config.checkpoint_every, done) or final_step:
      _raise_if_not_finite(unchecked, name)
      unchecked = []
      manager.save(done, args=ocp.args.StandardSave(state), force=True)
  progress.close()
  manager.wait_until_finished()

  final = run_eval(config.num_steps, config.final_eval_splits)
  return {"train_seconds_this_session": round(train_seconds, 2),
          "metrics": final, "state": state}


def main(argv):
  """absl entry point; flags are defined in `_define_flags`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  config = flags.FLAGS.config
  if flags.FLAGS.jax_distributed:
    jax.distributed.initialize(
        coordinator_address=flags.FLAGS.coordinator_address,
        num_processes=flags.FLAGS.num_processes,
        process_id=flags.FLAGS.process_id)
  workdir = flags.FLAGS.workdir
  if workdir is None:
    workdir = default_workdir(
        flags.FLAGS["config"].config_filename,
        config_flags.get_override_values(flags.FLAGS["config"]))
    if jax.process_index() == 0:
      print(f"work dir: {workdir}", flush=True)
  try:
    summary = train_and_evaluate(config, workdir,
                                 force_resume=flags.FLAGS.force_resume)
  except (ValueError, NonFiniteError) as error:
    raise SystemExit(f"experiments.train: {type(error).__name__}: "
                     f"{error}") from error
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
                      "Output directory; default runs/<config name>/"
                      "<overrides>.")
  flags.DEFINE_bool("force_resume", False,
                    "Resume a work dir whose config.json differs from this "
                    "config in fields that may not change on resume.")
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
