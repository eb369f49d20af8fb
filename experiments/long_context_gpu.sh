#!/usr/bin/env bash
# The long-context byte-LM sweep (experiments/sweeps/bytelm_long_context.py:
# dense, 2:4, 2:4 in a topk_blocks pattern; S 4096, bf16) on one GPU:
# experiments/sweep_gpu.sh with that sweep, its own work dir and the step,
# log and checkpoint schedule it was measured with (the three trials of 1500
# steps took 169 s on an H200); "$OUT/bytelm_long_context" receives the
# outputs. Any sweep_gpu.sh argument may follow and wins over these.
#
#   experiments/long_context_gpu.sh [--steps=1500] [--log_every=100]
#       [--checkpoint_every=500] [--limit=470] [--set FIELD=VALUE ...]
exec "$(dirname "$0")/sweep_gpu.sh" \
  --sweep=experiments/sweeps/bytelm_long_context.py \
  --workdir=runs/sweeps/bytelm_long_context_gpu \
  --steps=1500 --log_every=100 --checkpoint_every=500 "$@"
