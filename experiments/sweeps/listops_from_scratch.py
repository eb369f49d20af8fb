"""ListOps from scratch with dense, 2:4 and 1:2 attention."""

from experiments.launch import ATTENTION_KINDS, Sweep


def get_sweep() -> Sweep:
  return Sweep(config="experiments/configs/listops.py",
               trials=tuple(ATTENTION_KINDS))
