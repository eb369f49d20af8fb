"""Docstring -> code retrieval with the pretrained all-MiniLM-L6-v2.

Starts from the dense pretrained weights with the configured attention.
`--config.num_steps=0` measures zero-shot fidelity (recall@1 and embedding
cosine to dense attention on the test split); the default finetunes for two
epochs of 1024 training pairs.

  python -m experiments.train --config=experiments/configs/retrieval.py \
      --config.attention.kind=nm --config.attention.n=2 --config.attention.m=4

On your own pairs: `--config.data.pairs_jsonl=pairs.jsonl`, one JSON object a
line with the fields `query_field` and `document_field` (default "query",
"document") and optionally "split" (train, valid or test; else a hash of the
query with `valid_percent` / `test_percent` decides).
"""

import ml_collections

from experiments.configs import common


def get_config() -> ml_collections.ConfigDict:
  config = common.base_config("retrieval", "retrieval")
  config.data = ml_collections.ConfigDict({
      "query_len": 32, "code_len": 64, "valid_percent": 5, "test_percent": 20,
      # Pairs used, after a fixed shuffle (0: all); sized for a CPU.
      "max_train_pairs": 1024, "max_eval_pairs": 500,
      "packages": (),  # stdlib top-level packages to draw from; () = all
      # A JSONL file of (query, document) pairs in place of the stdlib's.
      "pairs_jsonl": "", "query_field": "query", "document_field": "document",
      "logit_scale": 20.0})
  config.model.update(dropout_rate=0.1)  # MiniLM's own sizes; only dropout
  config.batch_size = 16
  config.eval_batch_size = 100
  config.num_steps = 128  # 2 epochs of the 1024 training pairs
  config.optimizer.update(learning_rate=2e-5, warmup_steps=13,
                          weight_decay=0.01, b2=0.999)
  config.log_every = 16
  config.eval_every = 128
  config.checkpoint_every = 64
  config.final_eval_splits = ("test",)
  return config
