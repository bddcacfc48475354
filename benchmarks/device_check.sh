#!/usr/bin/env bash
# The GPU check (benchmarks/device_check.py): search cost on CUDA, a 2-epoch paper-size
# search with its precision and eigenvalue checks, and 4 trials per GPU against 1, in at
# most 8 minutes. Writes device_check.json and device_check.md to $OUT (or the directory
# given). On a machine without a GPU: benchmarks/device_check.sh --smoke DIR.
#   benchmarks/device_check.sh                 # -> $OUT, else ./device-check
#   benchmarks/device_check.sh results/gpu     # -> results/gpu
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=()
if [ "${1:-}" = "--smoke" ]; then smoke=(--smoke); shift; fi
out="${1:-${OUT:-device-check}}"
exec timeout 480 python benchmarks/device_check.py --out "$out" "${smoke[@]}"
