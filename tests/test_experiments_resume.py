"""experiments.train runs that are right or stop: a changed config refuses to
resume, damaged checkpoints fall back to intact ones, a non-finite loss or
metric stops the run, the default work dir follows the overrides, short runs
without an eval or checkpoint schedule."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import train

REPO = pathlib.Path(__file__).resolve().parent.parent
LISTOPS = REPO / "experiments" / "configs" / "listops.py"

TINY = {"data.num_train": 64, "data.num_valid": 16, "data.num_test": 16,
        "data.min_length": 8, "data.max_length": 23, "data.max_depth": 3,
        "model.hidden_size": 16, "model.num_heads": 2, "model.mlp_size": 32,
        "model.num_layers": 1, "batch_size": 8, "eval_batch_size": 16,
        "num_steps": 4, "log_every": 2, "eval_every": 4,
        "checkpoint_every": 2, "max_checkpoints_to_keep": 3,
        "optimizer.warmup_steps": 1}


def load_config(overrides):
  spec = importlib.util.spec_from_file_location("listops_config", LISTOPS)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update_from_flattened_dict({**TINY, **overrides})
  return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished 4-step run with checkpoints 2 and 4, and its summary."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  summary = train.train_and_evaluate(load_config({}), workdir)
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == [2, 4]
  return workdir, summary


def copy_of(finished_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run[0], workdir)
  return workdir


def test_resume_with_a_changed_config_refuses(finished_run, tmp_path):
  workdir = copy_of(finished_run, tmp_path)
  saved = (workdir / "config.json").read_text()
  changed = load_config({"attention.kind": "nm", "model.mlp_size": 48})
  with pytest.raises(ValueError) as refusal:
    train.train_and_evaluate(changed, workdir)
  message = str(refusal.value)
  assert f"workdir={str(workdir)!r}" in message
  assert "attention.kind ('dense' there, 'nm' here)" in message
  assert "model.mlp_size (32 there, 48 here)" in message
  assert "--force_resume" in message
  assert (workdir / "config.json").read_text() == saved

  # A resumable field may change: two more steps from the checkpoint at 4.
  longer = train.train_and_evaluate(load_config({"num_steps": 6}), workdir)
  assert longer["resumed_from_step"] == 4 and longer["num_steps"] == 6
  assert longer["config_changes_on_resume"] == {"num_steps": [4, 6]}
  assert int(longer["state"]["step"]) == 6
  with pytest.raises(ValueError, match=r"\(6 in .*config.num_steps=5"):
    train.train_and_evaluate(load_config({"num_steps": 5}), workdir)

  # Forced: continues with the new attention, and says what changed.
  forced = train.train_and_evaluate(
      load_config({"attention.kind": "nm", "num_steps": 6}), workdir,
      force_resume=True)
  assert forced["attention"] == "2:4"
  assert forced["config_changes_on_resume"] == {"attention.kind": ["dense",
                                                                   "nm"]}
  assert json.loads((workdir / "config.json").read_text())[
      "attention"]["kind"] == "nm"


def largest_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((p for p in step_dir.rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def poison_with_nan(workdir: pathlib.Path, step: int):
  """Rewrites checkpoint `step` through orbax with NaN in every 2-D param."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.CheckpointManager(workdir / "checkpoints") as manager:
    state = manager.restore(step)
    state["params"] = jax.tree.map(
        lambda x: jnp.full_like(x, jnp.nan) if x.ndim == 2 else x,
        state["params"])
    manager.delete(step)
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()


# How a work dir's checkpoints are damaged -> (the steps rejected, newest
# first; the step resumed from).
DAMAGES = {
    "truncated latest, stray empty step dir": ([5, 4], 2),
    "NaN latest, rewritten bytes before it": ([4, 2], 0),
}


def damage(workdir: pathlib.Path, how: str, seed: int):
  checkpoints = workdir / "checkpoints"
  if how == "truncated latest, stray empty step dir":
    # Every file cut to half: which one a restore reads first varies (the
    # largest alone was sometimes not read, and the checkpoint restored).
    for data in (p for p in (checkpoints / "4").rglob("*") if p.is_file()):
      data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
    (checkpoints / "5").mkdir()
  else:
    poison_with_nan(workdir, 4)
    data = largest_file(checkpoints / "2")
    data.write_bytes(np.random.default_rng(seed).bytes(data.stat().st_size))


@pytest.mark.parametrize("how", sorted(DAMAGES))
def test_damaged_checkpoints_fall_back_to_intact_ones(finished_run, tmp_path,
                                                      how, seed, caplog):
  workdir = copy_of(finished_run, tmp_path)
  damage(workdir, how, seed)
  rejected, resumed_from = DAMAGES[how]
  with caplog.at_level(logging.WARNING, logger="experiments.train"):
    summary = train.train_and_evaluate(load_config({}), workdir)
  warned = [r.getMessage() for r in caplog.records
            if "is not used" in r.getMessage()]
  assert [int(m.split()[1]) for m in warned] == rejected, warned
  if "NaN" in how:
    assert "['params']" in warned[0] and "is not finite" in warned[0]
    assert "does not restore" in warned[1]
  assert sorted(int(p.name) for p in (workdir / "rejected_checkpoints")
                .iterdir()) == sorted(rejected)
  # Resuming from an intact checkpoint (or from scratch) repeats the run.
  assert summary["resumed_from_step"] == resumed_from
  assert summary["metrics"] == finished_run[1]["metrics"]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(summary["state"]))


def test_non_finite_loss_stops_the_run(tmp_path):
  """Through the command line, in the default work dir of its overrides."""
  overrides = {**TINY, "num_steps": 8, "checkpoint_every": 1,
               "optimizer.learning_rate": 1e30}
  command = ([sys.executable, "-m", "experiments.train",
              f"--config={LISTOPS}"] +
             [f"--config.{k}={v}" for k, v in overrides.items()])
  result = subprocess.run(
      command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"))
  assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
  assert "NonFiniteError: listops: the training loss is not finite at step" \
      in result.stderr
  nan_step = int(result.stderr.split("not finite at step ")[1].split()[0])
  workdir = tmp_path / train.default_workdir(str(LISTOPS), overrides)
  assert f"work dir: {workdir.relative_to(tmp_path)}" in result.stdout
  assert json.loads((workdir / "config.json").read_text())[
      "optimizer"]["learning_rate"] == 1e30
  assert not (workdir / "final_metrics.json").exists()
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert saved and max(saved) < nan_step
  metrics = train.read_metrics(workdir)
  assert all(np.isfinite(value) for *_, value in metrics)


def test_non_finite_metric_stops_the_run(finished_run, tmp_path):
  """A zero-step evaluation of NaN parameters (`init_from`) reports no NaN."""
  source = copy_of(finished_run, tmp_path)
  poison_with_nan(source, 4)
  config = load_config({"num_steps": 0, "init_from": str(source)})
  with pytest.raises(train.NonFiniteError,
                     match=r"valid metrics at step 0 are not finite"):
    train.train_and_evaluate(config, tmp_path / "zero_shot")
  assert not (tmp_path / "zero_shot" / "final_metrics.json").exists()


def test_a_short_run_needs_no_eval_or_checkpoint_schedule(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config = load_config({"num_steps": 3, "log_every": 2, "eval_every": 0,
                        "checkpoint_every": 0})
  summary = train.train_and_evaluate(config, tmp_path)
  rows = train.read_metrics(tmp_path)
  assert sorted({step for step, split, *_ in rows if split == "train"}) == [
      2, 3]
  assert {(step, split) for step, split, *_ in rows if split != "train"} == {
      (3, "valid"), (3, "test")}
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]
  # The returned state is the final one, the one checkpointed.
  state = summary["state"]
  assert int(state["step"]) == 3
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    saved = manager.restore(3)
  for ours, theirs in zip(jax.tree.leaves(state), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  assert "state" not in json.loads(
      (tmp_path / "final_metrics.json").read_text())


def test_default_workdir_follows_the_overrides():
  dense = train.default_workdir("experiments/configs/demo.py",
                                {"attention.kind": "dense"})
  nm = train.default_workdir("experiments/configs/demo.py",
                             {"attention.kind": "nm", "attention.n": 2})
  assert dense.parent == nm.parent == pathlib.Path("runs/demo")
  assert dense != nm
  assert nm.name.startswith("kind=nm_n=2-")
  assert nm == train.default_workdir(
      "demo.py", {"attention.n": 2, "attention.kind": "nm"})
  assert train.default_workdir("demo.py", {}) == pathlib.Path(
      "runs/demo/default")
  # Same last name parts, different fields: different dirs.
  assert train.default_workdir("demo.py", {"model.n": 2}) != (
      train.default_workdir("demo.py", {"attention.n": 2}))
  long = train.default_workdir("demo.py", {"init_from": "/x/" * 40})
  assert len(long.name) == 64 + 9 and "/" not in long.name


def test_config_differences_reads_absent_fields():
  config = load_config({})
  saved = json.loads(config.to_json_best_effort())
  saved["model"]["old_field"] = 1
  del saved["seed"]
  saved["eval_splits"] = list(saved["eval_splits"])  # tuples are lists in JSON
  assert train.config_differences(json.dumps(saved), config) == {
      "model.old_field": (1, "<absent>"), "seed": ("<absent>", 0)}
