#!/usr/bin/env bash
# The long-context byte-LM sweep (experiments/sweeps/bytelm_long_context.py:
# dense, 2:4, 2:4 in a topk_blocks pattern; S 4096, bf16) on one GPU, under a
# time limit. Prints the bits-per-byte and seconds-per-step table and copies
# the summary JSON, the launcher's results table and each trial's small
# outputs to "$OUT" (when set).
#
#   experiments/long_context_gpu.sh [--steps=1500] [--log_every=100]
#       [--checkpoint_every=500] [--limit=470] [--workdir=DIR]
#       [--set FIELD=VALUE ...]
#
# --steps: num_steps of every trial (the config's 1500 by default; on an
#   H200 the three trials of 1500 steps took 169 s).
# --limit: seconds for the whole sweep. At the limit the launcher stops the
#   running trial (SIGTERM, reaped within 30 s) and still writes the table;
#   the same command again keeps the finished trials and resumes the stopped
#   one from its last checkpoint (every --checkpoint_every steps). With the
#   default 470 the script ends within about 9 minutes.
# --set: any other config override, added to every trial.
# Needs experiments' dependencies importable (ml_collections, absl, tqdm,
# tensorboard, orbax, flax, optax; PYTHONPATH may point at unpacked wheels);
# it checks them first and names what is missing. PYTHON picks the
# interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

steps=1500 log_every=100 checkpoint_every=500 limit=470
workdir=runs/sweeps/bytelm_long_context_gpu
extra=()
while (($#)); do
  case "$1" in
    --steps=*) steps="${1#*=}" ;;
    --log_every=*) log_every="${1#*=}" ;;
    --checkpoint_every=*) checkpoint_every="${1#*=}" ;;
    --limit=*) limit="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --set) shift; extra+=(--set "${1:?--set needs FIELD=VALUE}") ;;
    --set=*) extra+=(--set "${1#*=}") ;;
    *) echo "long_context_gpu.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
for value in "$steps" "$log_every" "$checkpoint_every" "$limit"; do
  [[ "$value" =~ ^[0-9]+$ ]] || { echo "long_context_gpu.sh: not a count: $value" >&2; exit 2; }
done
python="${PYTHON:-python3}"
workdir=$(realpath -m "$workdir")  # the trials run from the repository root

"$python" - <<'EOF'
import importlib.util, sys
needed = ["jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "absl",
          "tqdm", "tensorboard"]
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing:
  sys.exit("long_context_gpu.sh: not importable: " + ", ".join(missing)
           + " (install them or put their wheels on PYTHONPATH)")
EOF
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
"$python" -c 'import jax; print("jax", jax.__version__, jax.devices())'

# Compilations persist across runs of this script (a resumed trial reuses
# them); a JAX_COMPILATION_CACHE_DIR already set is kept.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$workdir/jax_cache}"
mkdir -p "$workdir"

start=$SECONDS
status=0
# The runner forwards timeout's SIGTERM to the trial; -k kills it all if it
# has not ended 60 s later.
timeout -k 60 "$limit" "$python" -m experiments.sweeps.bytelm_long_context \
  --workdir="$workdir" --set "num_steps=$steps" --set "log_every=$log_every" \
  --set "checkpoint_every=$checkpoint_every" ${extra[@]+"${extra[@]}"} \
  || status=$?
echo "[long_context_gpu] sweep exit status $status after $((SECONDS - start)) s"

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT/long_context"
  cp "$workdir"/long_context.json "$workdir"/results.md "$workdir"/results.csv \
    "$OUT/long_context/" 2>/dev/null || true
  for trial in "$workdir"/[0-9][0-9][0-9]_*/; do
    name=$(basename "$trial")
    name=${name%%_*}  # the index: trial dir names hold "=" and ":"
    mkdir -p "$OUT/long_context/$name"
    cp "$trial"/{status.json,config.json,metrics.csv,final_metrics.json} \
      "$OUT/long_context/$name/" 2>/dev/null || true
    tail -n 200 "$trial/log.txt" > "$OUT/long_context/$name/log_tail.txt" 2>/dev/null || true
  done
  echo "[long_context_gpu] copied to $OUT/long_context"
fi
exit "$status"
