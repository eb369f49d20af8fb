#!/usr/bin/env bash
# The long-context byte-LM sweep (experiments/sweeps/bytelm_long_context.py:
# dense, 2:4, 2:4 in a topk_blocks pattern; S 4096, bf16) on one GPU:
# experiments/sweep_gpu.sh with that sweep, its own work dir and the step,
# log and checkpoint schedule of its results: 4500 steps, since at 1500 the
# dense model has not yet made its late drop (docs/results/long_context.md;
# the three trials of 4500 steps took 132 s on an H100, three at a time);
# "$OUT/bytelm_long_context" receives the outputs. Any sweep_gpu.sh argument
# may follow and wins over these.
#
#   experiments/long_context_gpu.sh [--steps=4500] [--log_every=100]
#       [--checkpoint_every=500] [--limit=470] [--set FIELD=VALUE ...]
exec "$(dirname "$0")/sweep_gpu.sh" \
  --sweep=experiments/sweeps/bytelm_long_context.py \
  --workdir=runs/sweeps/bytelm_long_context_gpu \
  --steps=4500 --log_every=100 --checkpoint_every=500 "$@"
