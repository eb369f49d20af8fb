"""Byte LM from scratch at S = 1024 on one GPU: dense, 2:4 and 1:2 over seeds.

The model of experiments/configs/bytelm_long.py (task "bytelm_pattern",
4 layers, hidden 256, 4 heads of 64, MLP 1024; bfloat16 activations and
attention inputs, float32 parameters, logits and loss; causal by
`is_causal`; no block pattern) on 1024-byte windows of the stdlib sources,
batch 32 (the same 32768 bytes a step as bytelm_long's 8 x 4096), 2000
steps, AdamW at 2e-3 with a cosine decay. Evaluation: 384 windows of 1025
bytes a split, which cover the 390 kB test split end to end (46% of valid).

Two sweeps (issue 22, "Results at GPU scale"):
  experiments/sweeps/bytelm_gpu_seeds.py   dense, 2:4, 1:2 x seeds 0, 1, 2
  experiments/sweeps/bytelm_gpu_recipe.py  seed 0's dense run continued for
                                           500 steps with dense, 2:4, 1:2

  experiments/sweep_gpu.sh --sweep=experiments/sweeps/bytelm_gpu_seeds.py \
      --parallel=3 --limit=330
  experiments/sweep_gpu.sh --sweep=experiments/sweeps/bytelm_gpu_recipe.py \
      --parallel=3 --limit=150

How it is sized (none of it is measured with this config yet):

Measured, on one H200 (2026-12-04, bytelm_long at 4096 x 8 through
experiments/long_context_gpu.sh, one trial at a time;
experiments/results/long_context/h200_*.json): a
step takes 6.5 ms dense (cuDNN), 8.3 ms 2:4 (pallas_mosaic forward, Triton
backward). A trial's wall time less its steps is 28-30 s dense, 43-44 s
2:4, alike at 300 and at 1500 steps: a fixed start-up (process, imports,
data, compilation of the train step, ~10 s dense and ~16 s 2:4 of the first
logged window, evaluation, checkpoint).

Estimated: a step here does the same token-wise work and a quarter of the
attention, so it should take at most the 4096 times, <= 6.5 / 8.3 ms; 1:2
is taken to be as 2:4 (not measured). Start-up taken as at 4096. One at a
time, the 9 seed trials would take 3 x (28 + 13) + 6 x (44 + 17) = 490 s
and the 3 continuations 31 + 2 x 48 = 127 s, 10 minutes in all, of which
7.7 start-up. So the runner runs them 3 at a time on the one GPU
(`--parallel=3`, each process taking 0.3 of its memory): the start-ups run
side by side on the CPU cores and the steps take turns on the GPU. The
seeds sweep goes seed by seed (dense, 2:4, 1:2 of seed 0 first), about
three waves of three. If three start-ups side by side take as long as one
(16 CPU cores on the H200 machine), a wave takes at most the longest
start-up plus all of its steps, 44 + 2000 x 23.1 ms = 90 s, so the seeds
take <= 270 s and the continuations <= 44 + 500 x 23.1 ms = 56 s, with the
runner's own checks (~5 s a call) <= 5.6 minutes; less where seeds 1 and 2
find seed 0's compilations in the runner's cache. The steps
per second under `--parallel=3` are not a speed measurement (the trials
share the GPU); bytelm_long's are, one trial at a time.
"""

import ml_collections

from experiments.configs import bytelm_long


def get_config() -> ml_collections.ConfigDict:
  config = bytelm_long.get_config()
  config.name = "bytelm_gpu"
  config.data.update(seq_len=1024, eval_windows=384)
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_steps = 2000
  config.optimizer.update(learning_rate=2e-3, warmup_steps=50)
  # bytelm_long's schedule: logs every 100 steps, the final evaluation and
  # the final checkpoint only (the recipe sweep starts from it).
  return config
