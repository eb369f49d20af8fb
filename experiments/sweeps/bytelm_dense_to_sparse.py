"""The DFSS recipe on the byte LM: continue the dense from-scratch run for
200 more steps with dense, 2:4 and 1:2 attention (fresh optimizer).

Needs the dense trial of bytelm_from_scratch at its default sweep dir
(runs/sweeps/bytelm_from_scratch, relative to the repository root).
"""

from experiments.launch import ATTENTION_KINDS, Sweep, axis, product

DENSE_RUN = "runs/sweeps/bytelm_from_scratch/000_kind=dense"


def get_sweep() -> Sweep:
  return Sweep(config="experiments/configs/bytelm.py",
               trials=product(ATTENTION_KINDS, axis("num_steps", [200]),
                              axis("optimizer.warmup_steps", [20]),
                              axis("init_from", [DENSE_RUN])))
