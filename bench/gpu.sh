#!/usr/bin/env bash
# One prepared GPU benchmark run (< 8 minutes on one H100): CT-FM forward and forward+backward
# volumes/s in bf16 for none / LoRA / MoLRE / full fine-tuning, plus per-series inference time.
# Writes bench/results/gpu.json (or $OUT/gpu.json when OUT is set, e.g. on the device machine).
#
#   bench/gpu.sh               # the real run (needs a CUDA GPU)
#   bench/gpu.sh --dry-run     # tiny sizes on whatever device there is (checks the script on CPU)
#
# The GPU image has torch but not monai/pydicom/structlog: put wheels for the missing packages
# in .whl/ (see BENCHMARKS.md) and they are installed into /tmp/site first.
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"

# hard cap below the 8-minute budget; the JSON is written at the end of a completed run
timeout 470 "$PY" bench/gpu_bench.py --out "$RESULTS/gpu.json" "$@"
