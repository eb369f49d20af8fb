"""Byte-level language model on the CPython stdlib sources, from scratch.

  python -m experiments.train --config=experiments/configs/bytelm.py \
      --config.attention.kind=nm --config.attention.n=2 --config.attention.m=4

On your own text: `--config.data.text_paths="('notes/', 'book.txt')"` (files,
and directories read recursively; hidden files skipped), optionally
`--config.data.text_suffixes="('.md',)"`; the joined bytes are split by
position, the last `valid_percent` + `test_percent` percent held out.
"""

import ml_collections

from experiments.configs import common


def get_config() -> ml_collections.ConfigDict:
  config = common.base_config("bytelm", "bytelm")
  config.data = ml_collections.ConfigDict({
      "seq_len": 128, "eval_windows": 256,
      # Text files or directories to train on; () = the stdlib sources (split
      # by file, the percentages below then unused).
      "text_paths": (), "text_suffixes": (),
      "valid_percent": 5, "test_percent": 5})
  config.model.update(hidden_size=128, num_heads=4, mlp_size=512, num_layers=3)
  config.batch_size = 32
  config.num_steps = 600  # minutes on a CPU
  config.optimizer.update(learning_rate=2e-3, warmup_steps=100,
                          weight_decay=0.01)
  config.log_every = 50
  config.eval_every = 300
  config.checkpoint_every = 300
  return config
