"""The `make demo` experiment: a small byte-level LM on the stdlib sources.

A two-layer decoder trained for a few minutes on a CPU; the demo sweep
(experiments/sweeps/demo.py) runs it with dense and with 2:4 attention.
"""

import ml_collections

from experiments.configs import bytelm


def get_config() -> ml_collections.ConfigDict:
  config = bytelm.get_config()
  config.name = "demo"
  config.data.update(seq_len=128, eval_windows=128)
  config.model.update(hidden_size=64, num_heads=4, mlp_size=256, num_layers=2)
  config.batch_size = 16
  config.num_steps = 300
  config.optimizer.update(learning_rate=3e-3, warmup_steps=30)
  config.log_every = 25
  config.eval_every = 150
  config.checkpoint_every = 150
  config.final_eval_splits = ("test",)
  return config
