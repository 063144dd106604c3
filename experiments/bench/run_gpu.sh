#!/usr/bin/env bash
# The benchmark's GPU run, for a machine with Python, torch, Lightning and torchmetrics (e.g. the H200
# image). It uses the flowlab source tree it lives in (PYTHONPATH=src, no install). flowlab-bench
# composes conf/ with Hydra: when hydra-core or omegaconf is missing, they are installed offline from
# the wheels in $WHEELS (see README.md, "The GPU run", for how to fill that folder).
#
#   OUT=/tmp/out bash experiments/bench/run_gpu.sh                                      # on the GPU machine
#   DEVICE=cpu PRESET=quick OUT=/tmp/dry BUDGET_S=150 bash experiments/bench/run_gpu.sh   # dry run on a CPU
#
# Stages (STAGES, in this order; each rewrites its JSON + markdown in $OUT as it goes, so a stage cut
# short keeps what it measured):
#   env    nvidia-smi, Python / torch / CUDA versions                               -> $OUT/env.txt
#   bench  $MODELS with the training defaults: table, ratio to the reference, sampling ratio, layers, goals
#   plain  the same models without the fast path (--plain --no-layers)
#   all    every model (--models all --no-layers)
#   check  bits/dim after $CHECK_STEPS steps: training defaults vs strict float32
#
# Environment [default]: OUT [experiments/bench/results/gpu-<UTC time>]; PYTHON [.venv/bin/python if
#   there, else python3]; DEVICE [cuda]; PRESET [gpu]; STAGES ["env bench check"]; MODELS
#   [conv1x1_lu,nxn_lu,reference]; CHECK_STEPS [the preset's: 2000 at gpu]; WHEELS [experiments/bench/wheels];
#   ARGS [--threads 1 when DEVICE=cpu, else none]: more flowlab-bench flags for every stage;
#   BUDGET_S [420]: wall-clock seconds for all stages; each stage is stopped by `timeout` at its share of
#   what is left when it starts (bench/plain/all 50%, check all of it).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="${PYTHON:-$root/.venv/bin/python}"; else PYTHON="${PYTHON:-python3}"; fi
DEVICE="${DEVICE:-cuda}"
PRESET="${PRESET:-gpu}"
STAGES="${STAGES:-env bench check}"
MODELS="${MODELS:-conv1x1_lu,nxn_lu,reference}"
CHECK_STEPS="${CHECK_STEPS:-}"
WHEELS="${WHEELS:-$here/wheels}"
BUDGET_S="${BUDGET_S:-420}"
ARGS="${ARGS-$([[ $DEVICE == cpu ]] && echo --threads 1)}"
OUT="${OUT:-$root/experiments/bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

start=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }
log() { echo "[run_gpu $(date -u +%H:%M:%S), $(left)s left] $*" | tee -a "$OUT/run_gpu.log" >&2; }
# bench SECONDS FLAGS...: flowlab-bench under a hard time limit
# shellcheck disable=SC2086
bench() { local t=$1; shift; timeout -k 10 "$t" "$PYTHON" -m flowlab.cli.bench --device "$DEVICE" --preset "$PRESET" --out "$OUT" $ARGS "$@"; }

if ! "$PYTHON" -c "import hydra, omegaconf" 2>/dev/null; then
  log "hydra-core / omegaconf missing: installing them from $WHEELS (no index)"
  "$PYTHON" -m pip install --no-index --find-links "$WHEELS" hydra-core omegaconf antlr4-python3-runtime \
    || "$PYTHON" -m pip install --user --no-index --find-links "$WHEELS" hydra-core omegaconf antlr4-python3-runtime \
    || { log "cannot install hydra-core/omegaconf from $WHEELS: fill it as experiments/bench/README.md says"; exit 2; }
fi
"$PYTHON" -c "import flowlab.bench.suite" \
  || { log "$PYTHON cannot import flowlab-bench (the module named above is missing): install it or set PYTHON"; exit 2; }

status=0
for stage in $STAGES; do
  if (( $(left) < 20 )); then log "budget spent; skipping $stage"; continue; fi
  half=$(( $(left) / 2 > 30 ? $(left) / 2 : 30 ))
  case "$stage" in
    env)
      { date -u; nvidia-smi 2>&1 || true
        "$PYTHON" -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"; } \
        > "$OUT/env.txt" 2>&1
      cat "$OUT/env.txt" >&2 ;;
    bench) log "bench: $MODELS, training defaults (timeout ${half}s)"
      bench "$half" --models "$MODELS" || { log "bench failed or timed out"; status=1; } ;;
    plain) log "plain: $MODELS without the fast path (timeout ${half}s)"
      bench "$half" --models "$MODELS" --plain --no-layers --no-memory || { log "plain failed or timed out"; status=1; } ;;
    all) log "all: every model (timeout ${half}s)"
      bench "$half" --models all --no-layers --no-memory || { log "all failed or timed out"; status=1; } ;;
    check) log "check: bits/dim, training defaults vs float32 (timeout $(left)s)"
      bench "$(left)" --models none --no-layers --no-memory --check ${CHECK_STEPS} || { log "check failed or timed out"; status=1; } ;;
    *) log "unknown stage '$stage' (known: env bench plain all check)"; status=2 ;;
  esac
done
log "done; results in $OUT"
ls -la "$OUT" >&2
exit $status
