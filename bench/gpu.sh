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
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader || echo "no nvidia-smi (CPU run)"

# hard cap below the 8-minute budget; the JSON is written at the end of a completed run
timeout 470 "$PY" bench/gpu_bench.py --out "$RESULTS/gpu.json" "$@"
