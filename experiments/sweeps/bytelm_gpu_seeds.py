"""Byte LM at S = 1024 from scratch on a GPU: dense, 2:4 and 1:2, seeds 0, 1, 2
(experiments/configs/bytelm_gpu.py).

Seed by seed: trials 000-002 are seed 0's dense, 2:4 and 1:2, so a sweep
stopped early still compares the three kinds, and `--only seed=0,1` keeps
the first six trials under the same names.

  experiments/sweep_gpu.sh --sweep=experiments/sweeps/bytelm_gpu_seeds.py \
      --parallel=3
"""

from experiments.launch import ATTENTION_KINDS, Sweep, axis, product

SEEDS = (0, 1, 2)


def get_sweep() -> Sweep:
  return Sweep(config="experiments/configs/bytelm_gpu.py",
               trials=product(axis("seed", SEEDS), ATTENTION_KINDS))
