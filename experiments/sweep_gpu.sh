#!/usr/bin/env bash
# A sweep of byte-LM trials on one GPU machine under a time limit
# (experiments/sweep_summary.py through the launcher): prints the per-trial
# table (bits per byte, seconds per step, wall time) and the per-group mean
# and spread over seeds, and copies the summary JSON, the launcher's results
# table and each trial's small outputs to "$OUT/NAME" (when OUT is set).
#
#   experiments/sweep_gpu.sh --sweep=experiments/sweeps/NAME.py [--parallel=1]
#       [--steps=N] [--log_every=N] [--checkpoint_every=N] [--limit=470]
#       [--workdir=runs/sweeps/NAME] [--set FIELD=VALUE ...]
#       [--only FIELD=V1,V2 ...]
#
# --steps, --log_every, --checkpoint_every: num_steps, log_every and
#   checkpoint_every of every trial (given ones only: each enters the trial
#   names); --set: any other override, added to every trial.
# --only: keep the trials whose FIELD is one of the values (e.g. seed=0,1).
# --parallel: trials at once on the one GPU, each then preallocating
#   0.9 / N of its memory (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set). The
#   start-ups (imports, data, compilation) overlap; the steps share the GPU,
#   so seconds per step are a speed measurement only with --parallel=1.
# --limit: seconds for the whole sweep. At the limit the launcher stops the
#   running trials (SIGTERM, reaped within 30 s) and still writes the table;
#   the same command again keeps the finished trials and resumes the stopped
#   ones from their last checkpoints. With the default 470 the script ends
#   within about 9 minutes.
# Needs experiments' dependencies importable (ml_collections, absl, tqdm,
# tensorboard, orbax, flax, optax; PYTHONPATH may point at unpacked wheels);
# it checks them first and names what is missing. PYTHON picks the
# interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
me=sweep_gpu.sh

sweep="" parallel=1 limit=470 workdir=""
extra=() only=()
while (($#)); do
  case "$1" in
    --sweep=*) sweep="${1#*=}" ;;
    --parallel=*) parallel="${1#*=}" ;;
    --steps=*) extra+=(--set "num_steps=${1#*=}") ;;
    --log_every=*) extra+=(--set "log_every=${1#*=}") ;;
    --checkpoint_every=*) extra+=(--set "checkpoint_every=${1#*=}") ;;
    --limit=*) limit="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --set) shift; extra+=(--set "${1:?--set needs FIELD=VALUE}") ;;
    --set=*) extra+=(--set "${1#*=}") ;;
    --only) shift; only+=(--only "${1:?--only needs FIELD=V1,V2}") ;;
    --only=*) only+=(--only "${1#*=}") ;;
    *) echo "$me: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[[ -f "$sweep" ]] || { echo "$me: --sweep must be a sweep file; got --sweep=$sweep" >&2; exit 2; }
for value in "$parallel" "$limit"; do
  [[ "$value" =~ ^[0-9]+$ ]] || { echo "$me: not a count: $value" >&2; exit 2; }
done
((parallel >= 1)) || { echo "$me: --parallel must be >= 1; got --parallel=$parallel" >&2; exit 2; }
name=$(basename "$sweep" .py)
python="${PYTHON:-python3}"
# The trials run from the repository root.
workdir=$(realpath -m "${workdir:-runs/sweeps/$name}")

"$python" - <<'EOF'
import importlib.util, sys
needed = ["jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "absl",
          "tqdm", "tensorboard"]
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing:
  sys.exit("sweep_gpu.sh: not importable: " + ", ".join(missing)
           + " (install them or put their wheels on PYTHONPATH)")
EOF
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null || true
"$python" -c 'import jax; print("jax", jax.__version__, jax.devices())'

# Compilations persist across trials and runs of this script (later seeds
# and resumed trials reuse them); a JAX_COMPILATION_CACHE_DIR already set is
# kept.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$workdir/jax_cache}"
if ((parallel > 1)); then
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-$(
    awk -v n="$parallel" 'BEGIN { printf "%.2f", int(90 / n) / 100 }')}"
fi
mkdir -p "$workdir"

start=$SECONDS
status=0
# The launcher forwards timeout's SIGTERM to the trials; -k kills it all if
# it has not ended 60 s later.
timeout -k 60 "$limit" "$python" -m experiments.sweep_summary \
  --sweep="$sweep" --workdir="$workdir" --parallel="$parallel" \
  --device="$device" ${extra[@]+"${extra[@]}"} ${only[@]+"${only[@]}"} \
  || status=$?
echo "[$me] $name: exit status $status after $((SECONDS - start)) s"

if [[ -n "${OUT:-}" ]]; then
  out="$OUT/$name"
  mkdir -p "$out"
  cp "$workdir/$name.json" "$workdir"/results.md "$workdir"/results.csv \
    "$out/" 2>/dev/null || true
  for trial in "$workdir"/[0-9][0-9][0-9]_*/; do
    [[ -d "$trial" ]] || continue
    index=$(basename "$trial")
    index=${index%%_*}  # trial dir names hold "=" and ":"
    mkdir -p "$out/$index"
    cp "$trial"/{status.json,config.json,metrics.csv,final_metrics.json} \
      "$out/$index/" 2>/dev/null || true
    tail -n 200 "$trial/log.txt" > "$out/$index/log_tail.txt" 2>/dev/null || true
  done
  echo "[$me] copied to $out"
fi
exit "$status"
