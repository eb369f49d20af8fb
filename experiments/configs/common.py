"""Fields every experiment config shares; each config file starts from these."""

from __future__ import annotations

import ml_collections


def base_config(task: str, name: str) -> ml_collections.ConfigDict:
  """Defaults for `experiments.train`; experiment files override them."""
  config = ml_collections.ConfigDict()
  config.name = name
  config.task = task
  config.seed = 0
  # A run dir whose latest checkpoint's params initialise this run ("": none).
  config.init_from = ""
  # A module to import before the task is looked up, whose import registers
  # `task` (experiments.tasks.register); "": a built-in task.
  config.task_module = ""

  # Attention of every layer: kind in (dense, nm, topk, local); the density of
  # nm, topk and local is n / m.
  config.attention = ml_collections.ConfigDict(
      {"kind": "dense", "n": 2, "m": 4})

  config.model = ml_collections.ConfigDict({
      "hidden_size": 128, "num_heads": 4, "mlp_size": 512, "num_layers": 2,
      "dropout_rate": 0.0, "attention_dropout_rate": 0.0})

  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_steps = 1000
  config.optimizer = ml_collections.ConfigDict({
      "learning_rate": 1e-3, "warmup_steps": 100, "weight_decay": 0.01,
      "end_learning_rate_fraction": 0.0, "b1": 0.9, "b2": 0.98,
      "grad_clip_norm": 1.0})

  # Train averages every `log_every` steps; evaluation of `eval_splits` and
  # a checkpoint every `eval_every` / `checkpoint_every` steps (0: none but
  # the final ones). A resume reproduces the uninterrupted run's logged
  # averages where `checkpoint_every` is a multiple of `log_every` (otherwise
  # its first average covers the steps from the checkpoint only).
  config.log_every = 50
  config.eval_every = 500
  config.checkpoint_every = 500
  config.max_checkpoints_to_keep = 2
  config.eval_splits = ("valid",)
  config.final_eval_splits = ("valid", "test")
  return config
