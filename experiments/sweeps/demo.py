"""`make demo`: the demo byte-LM with dense and with 2:4 attention."""

from experiments.launch import ATTENTION_KINDS, Sweep


def get_sweep() -> Sweep:
  return Sweep(config="experiments/configs/demo.py",
               trials=tuple(ATTENTION_KINDS[:2]))
