"""Finetuning the pretrained (dense) MiniLM on docstring -> code retrieval with
dense, 2:4 and 1:2 attention (config: 2 epochs of 1024 pairs)."""

from experiments.launch import ATTENTION_KINDS, Sweep


def get_sweep() -> Sweep:
  return Sweep(config="experiments/configs/retrieval.py",
               trials=tuple(ATTENTION_KINDS))
