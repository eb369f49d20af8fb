"""Byte LM at S = 4096 from scratch: dense vs 2:4 vs 2:4 inside a hierarchical
block pattern (topk_blocks with a dense local band and sink, 0.335 of the
causal blocks); experiments/configs/bytelm_long.py."""

from experiments.launch import ATTENTION_KINDS, Sweep

HIERARCHICAL = {"attention.kind": "nm", "attention.n": 2, "attention.m": 4,
                "attention.pattern.name": "topk"}


def get_sweep() -> Sweep:
  return Sweep(config="experiments/configs/bytelm_long.py",
               trials=tuple(ATTENTION_KINDS[:2]) + (HIERARCHICAL,))
