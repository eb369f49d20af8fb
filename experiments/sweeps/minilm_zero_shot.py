"""Zero-shot fidelity: pretrained MiniLM with every attention replaced.

Dense, 2:4, 1:2, and at the density of 2:4 (0.5) unstructured top-k per row
and a fixed local window; no training (num_steps=0). Reports the test split's
docstring -> code recall@1 and the cosine of every sentence embedding to the
dense model's.
"""

from experiments.launch import Sweep, product, axis

ATTENTION = (
    {"attention.kind": "dense"},
    {"attention.kind": "nm", "attention.n": 2, "attention.m": 4},
    {"attention.kind": "nm", "attention.n": 1, "attention.m": 2},
    {"attention.kind": "topk", "attention.n": 2, "attention.m": 4},
    {"attention.kind": "local", "attention.n": 2, "attention.m": 4},
)


def get_sweep() -> Sweep:
  return Sweep(config="experiments/configs/retrieval.py",
               trials=product(ATTENTION, axis("num_steps", [0])))
