"""Byte LM at S = 4096 from scratch: dense vs 2:4 vs 2:4 inside a hierarchical
block pattern (topk_blocks with a dense local band and sink, 0.335 of the
causal blocks); experiments/configs/bytelm_long.py.

  python -m experiments.launch --sweep=experiments/sweeps/bytelm_long_context.py

or, with overrides added to every trial and a table of bits per byte and
seconds per step at the end:

  experiments/long_context_gpu.sh [--steps=4500] ...    # on a GPU machine
  python -m experiments.sweep_summary \
      --sweep=experiments/sweeps/bytelm_long_context.py \
      [--set num_steps=100 --set log_every=25 ...]
"""

from experiments.launch import ATTENTION_KINDS, Sweep

HIERARCHICAL = {"attention.kind": "nm", "attention.n": 2, "attention.m": 4,
                "attention.pattern.name": "topk"}


def get_sweep() -> Sweep:
  return Sweep(config="experiments/configs/bytelm_long.py",
               trials=tuple(ATTENTION_KINDS[:2]) + (HIERARCHICAL,))
