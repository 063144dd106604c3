#!/usr/bin/env bash
# The GPU run of issue 6, for a machine that has nothing but Python and torch (e.g. the H200 image).
# Run from anywhere; it uses the flowlab source tree it lives in (PYTHONPATH=src, no install).
#
#   OUT=/tmp/out bash experiments/bench/run_gpu.sh                 # on the GPU machine
#   DEVICE=cpu PRESET=quick OUT=/tmp/dry bash experiments/bench/run_gpu.sh   # dry run on a CPU
#
# Stages (STAGES, in this order; each writes its JSON + markdown to $OUT as soon as it ends):
#   env      nvidia-smi, torch / CUDA versions                         -> $OUT/env.txt
#   fast     flowlab's fast path (the training defaults: bf16 channels-last coupling networks, fused
#            Adam; plus $FAST_ARGS) on $FAST_MODELS beside the plain reference, ratio in alternating rounds
#   bench    every model, plain float32 (+TF32) eager (--plain), + layer micro-benchmarks
#   check    bits/dim after $CHECK_STEPS steps: fast path vs strict float32 run of the same model
#   profile  torch.profiler of one training step of conv1x1_lu with the fast path (top ops by CUDA time)
#
# Environment (defaults in brackets):
#   OUT [experiments/bench/results/gpu-<UTC time>]   PYTHON [python3]   DEVICE [cuda]   PRESET [gpu]
#   STAGES ["env fast bench check"]   BUDGET_S [420]: wall-clock seconds for all stages together; every
#       stage gets a share of what is left when it starts (fast 30%, bench 40%, profile 60 s, check: all
#       the rest) and is stopped by `timeout` there. Results are written as each model finishes, so a
#       stage cut short keeps what it measured; the check stops itself at its last evaluation point that fits.
#   MODELS [all]   BENCH_ARGS [--steps 8 --repeats 3 --warmup 3 --eval-repeats 3]
#   FAST_ARGS [] (extra switches, e.g. --compile)   FAST_MODELS [conv1x1_lu,nxn,reference]
#   CHECK_STEPS [2000]   CHECK_ARGS [--batch 64]   (add --data-npz FILE for real images)
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
PRESET="${PRESET:-gpu}"
STAGES="${STAGES:-env fast bench check}"
BUDGET_S="${BUDGET_S:-420}"
MODELS="${MODELS:-all}"
BENCH_ARGS="${BENCH_ARGS:---steps 8 --repeats 3 --warmup 3 --eval-repeats 3}"
FAST_ARGS="${FAST_ARGS:-}"
FAST_MODELS="${FAST_MODELS:-conv1x1_lu,nxn,reference}"
CHECK_STEPS="${CHECK_STEPS:-2000}"
CHECK_ARGS="${CHECK_ARGS:---batch 64}"
OUT="${OUT:-$root/experiments/bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

start=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }
share() { local s=$(( $(left) * $1 / 100 )); (( s < 30 )) && s=30; echo "$s"; }
# bench SECONDS ARGS...: flowlab-bench under a hard time limit
bench() { local t=$1; shift; timeout -k 10 "$t" "$PYTHON" -m flowlab.cli.bench --device "$DEVICE" --preset "$PRESET" --out "$OUT" "$@"; }
status=0
log() { echo "[run_gpu $(date -u +%H:%M:%S), $(left)s left] $*" | tee -a "$OUT/run_gpu.log" >&2; }

"$PYTHON" -c "import torch" || { echo "run_gpu.sh: $PYTHON cannot import torch; set PYTHON" >&2; exit 2; }

for stage in $STAGES; do
  if (( $(left) < 20 )); then log "budget spent; skipping $stage"; continue; fi
  case "$stage" in
    env)
      { date -u; nvidia-smi 2>&1 || true
        "$PYTHON" -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"; } > "$OUT/env.txt" 2>&1
      cat "$OUT/env.txt" >&2 ;;
    bench)
      t=$(share 40); log "bench: all models, plain float32 (timeout ${t}s)"
      # shellcheck disable=SC2086
      bench "$t" --models "$MODELS" --tag plain --plain $BENCH_ARGS || { log "bench stage failed or timed out"; status=1; } ;;
    fast)
      t=$(share 30); log "fast: training defaults $FAST_ARGS on $FAST_MODELS (timeout ${t}s)"
      # shellcheck disable=SC2086
      bench "$t" --models "$FAST_MODELS" --tag fast --no-layers $BENCH_ARGS $FAST_ARGS || { log "fast stage failed or timed out"; status=1; } ;;
    profile)
      t=60; log "profile: conv1x1_lu, fast path $FAST_ARGS (timeout ${t}s)"
      # shellcheck disable=SC2086
      bench "$t" --profile --models conv1x1_lu --steps 2 $FAST_ARGS > "$OUT/profile.txt" 2>&1 || { log "profile failed"; status=1; } ;;
    check)
      t=$(( $(left) - 15 )); log "check: bits/dim after $CHECK_STEPS steps, fast path $FAST_ARGS vs float32 (budget ${t}s)"
      # shellcheck disable=SC2086
      bench $(( t + 60 )) --check-bpd "$CHECK_STEPS" --time-budget "$t" $CHECK_ARGS $FAST_ARGS
      rc=$?; (( rc == 0 )) || { log "check did not pass (exit $rc)"; status=1; } ;;
    *) log "unknown stage '$stage' (known: env bench fast check profile)"; status=2 ;;
  esac
done
log "done; results in $OUT"
ls -la "$OUT" >&2
exit $status
