"""Zero-shot fidelity against sequence length: the zero-shot sweep with code
up to 256 tokens (200 test pairs), dense, 2:4 and 1:2 only."""

from experiments.launch import ATTENTION_KINDS, Sweep, axis, product


def get_sweep() -> Sweep:
  return Sweep(config="experiments/configs/retrieval.py",
               trials=product(ATTENTION_KINDS, axis("num_steps", [0]),
                              axis("data.code_len", [256]),
                              axis("data.max_eval_pairs", [200])))
