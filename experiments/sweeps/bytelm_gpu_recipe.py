"""The DFSS recipe at S = 1024 on a GPU: seed 0's dense run of
bytelm_gpu_seeds continued for 500 more steps with dense, 2:4 and 1:2
attention (its parameters, a fresh AdamW with 50 warm-up steps; the
continuation's batches are those of steps 0-499 again, as in
bytelm_dense_to_sparse). The dense continuation is the control: 2500 dense
steps in all.

Needs that dense trial at its default place, the seeds sweep having run in
runs/sweeps/bytelm_gpu_seeds (relative to the repository root) without
added overrides, which would change the trial's name; otherwise
`--set init_from=THAT_TRIAL_DIR`.

  experiments/sweep_gpu.sh --sweep=experiments/sweeps/bytelm_gpu_recipe.py \
      --parallel=3
"""

from experiments.launch import ATTENTION_KINDS, Sweep, axis, product

DENSE_RUN = "runs/sweeps/bytelm_gpu_seeds/000_seed=0_kind=dense"


def get_sweep() -> Sweep:
  return Sweep(config="experiments/configs/bytelm_gpu.py",
               trials=product(ATTENTION_KINDS, axis("num_steps", [500]),
                              axis("optimizer.warmup_steps", [50]),
                              axis("init_from", [DENSE_RUN])))
