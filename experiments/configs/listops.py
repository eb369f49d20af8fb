"""ListOps from scratch: a 2-layer encoder, dense or sparse attention.

  python -m experiments.train --config=experiments/configs/listops.py \
      --config.attention.kind=nm --config.attention.n=2 --config.attention.m=4
"""

import ml_collections

from experiments.configs import common


def get_config() -> ml_collections.ConfigDict:
  config = common.base_config("listops", "listops")
  config.data = ml_collections.ConfigDict({
      "num_train": 20_000, "num_valid": 1_000, "num_test": 2_000,
      "min_length": 16, "max_length": 127, "max_depth": 6, "max_args": 5,
      "seed": 0})
  config.model.update(hidden_size=128, num_heads=4, mlp_size=256, num_layers=2)
  config.batch_size = 32
  config.num_steps = 1200  # ~2 epochs; minutes on a CPU
  config.optimizer.update(learning_rate=1e-3, warmup_steps=100,
                          weight_decay=0.05)
  config.log_every = 50
  config.eval_every = 400
  config.checkpoint_every = 400
  return config
