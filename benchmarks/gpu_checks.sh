#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md, as one prepared run on a machine with one CUDA device.
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]      (about 8 minutes on one H100/H200)
#
# Ray must be importable for the audited round (a slim copy: bash ../shared/tools/device-ray.sh here, then
# start from the header of that script). Each step has its own time limit and a failed step does not stop
# the others; every table goes to stdout and to OUT_DIR/gpu-checks.md.
set -uo pipefail
out=${1:-${OUT:-.}}
mkdir -p "$out"
report="$out/gpu-checks.md"
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_LOGGING_LEVEL=WARNING
step() {  # step SECONDS TITLE COMMAND...
    local limit=$1 title=$2
    shift 2
    { echo; echo "## $title"; echo; echo "\`$*\`"; echo; } | tee -a "$report"
    local started=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$report"
    echo "(exit ${PIPESTATUS[0]}, $((SECONDS - started)) s)" | tee -a "$report"
}
{
    echo "# GPU checks"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'); $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)"
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} | tee "$report"
step 240 "Inverting Gradients throughput (1,000 iterations)" \
    python3 benchmarks/attack_throughput.py --device cuda --iterations 1000 --victims 1 64 1024 4096 --repeats 1
step 300 "Audited FedSGD rounds, attack actors on the GPU" \
    python3 benchmarks/throughput.py --clients 1000 --algorithms fedsgd --no-baseline --audit \
    --audit-attack dense-ratio ce-demix cocktail-party --audit-clients ce-demix=200 cocktail-party=200 \
    --attack-gpus 0.5
