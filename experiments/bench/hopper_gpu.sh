#!/usr/bin/env bash
# The Hopper backward's checks and timings in one GPU call (issue 21; about
# 9 minutes at most, each step under its own time limit):
#   1. its GPU tests that run both backward kernels: the backward keeps the
#      forward's keys (per n:m, the fraction of groups that differ) and the
#      block-pattern gradients against the reference (test_pallas_mosaic's
#      pattern cases with the Hopper backward), and the long-context byte
#      LM's decoder with its topk pattern through the GPU kernels (head_dim
#      64): no logit may move when later bytes change;
#   2. experiments.bench.attention at S 16k, 4k, 8k (bf16, head_dim 128,
#      causal and not, forward and forward + backward): cuDNN, nmattn
#      pallas_mosaic 2:4 as it ships (the Hopper backward) and with the
#      Triton backward ("pallas_mosaic+triton_bwd"), the Hopper backward at
#      4:4 ("pallas_mosaic+bwd 4:4"), tokamax's Mosaic GPU attention when
#      importable, nmattn pallas_triton 2:4;
#   3. experiments.bench.patterns at S 16k, non-causal: the Hopper forward and
#      backward with random and topk_blocks patterns at 100/50/25% density.
# Logs and JSON go to "$OUT" (default /tmp/hopper_gpu). PYTHON picks the
# interpreter (default python3); PYTHONPATH may point at unpacked wheels.
# SEQS picks step 2's lengths (default "16384 4096 8192"; "16384" alone
# takes about a third of its time, for a call on little device time).
#
#   experiments/bench/hopper_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/hopper_gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
"$py" -c "import jax; print('jax', jax.__version__, jax.devices()[0].device_kind)"
timeout 180 "$py" -m pytest -q -p no:cacheprovider -rs \
  tests/test_pallas_mosaic_backward.py::test_backward_selects_the_forward_keys \
  tests/test_pallas_mosaic.py "tests/test_experiments_long_context.py::test_pattern_model_is_causal" \
  -k "selects or (block_pattern_matches and not triton) or trial" \
  2>&1 | tee "$out/tests.log" | tail -15
# shellcheck disable=SC2086  # SEQS is a list of lengths
timeout 230 "$py" -m experiments.bench.attention --seq ${SEQS:-16384 4096 8192} \
  --head-dims 128 --seconds 0.05 --json "$out/bench_attention.json" \
  --rows cudnn "pallas_mosaic 2:4" "pallas_mosaic+triton_bwd" "pallas_mosaic+bwd 4:4" \
  tokamax "pallas_triton 2:4" \
  2>&1 | grep -v Warning | tail -70
timeout 140 "$py" -m experiments.bench.patterns --seq 16384 --causal False \
  --implementation pallas_mosaic+bwd --nm 2:4 --densities 1 0.5 0.25 \
  --patterns random topk --rows dense "pallas_mosaic+bwd" --budget-s 100 \
  --json "$out/patterns_16k_mosaic_bwd.json" 2>&1 | grep -v Warning | tail -30
