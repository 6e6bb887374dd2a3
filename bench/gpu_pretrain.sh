#!/usr/bin/env bash
# Pretrain phantom-3d "v2" (2 mm in-plane, 1.75 M parameters) on one GPU within a time budget:
# the one device run issue 11 needs (v2 costs 0.45 s per training sample on 2 CPU cores, 4.3x v1;
# a useful run would take most of a day there). Weights + card land in $RESULTS/phantom-3d
# ($OUT/phantom-3d on the device machine); a snapshot is saved after every epoch, so a run cut
# short still leaves the last finished epoch (card "complete": false).
#
#   bench/gpu_pretrain.sh                  # defaults below (about 8 minutes of budget)
#   BUDGET_MIN=3 bench/gpu_pretrain.sh --train-phantoms 2000    # extra args go to pretrain
#   DEVICE=cpu AMP=false OUT=/tmp/p bench/gpu_pretrain.sh --train-phantoms 8 --val-phantoms 4 \
#     --epochs 1 --workers 1     # checks the script on a CPU
#
# To ship the result: copy phantom-3d/{model.safetensors,card.json} to molre/resources/phantom-3d,
# set PHANTOM_ARCH = "v2" in molre/backbones/phantom.py, rebuild the demo
# (python -m molre.demo_checkpoint) and re-run the 400-phantom evaluation (docs/training.md).
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"

nproc
# the generator processes are the bottleneck on the GPU: one per core, the rest for the trainer
WORKERS=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
"$PY" -m molre.training.pretrain --arch v2 --device "${DEVICE:-cuda}" --amp "${AMP:-true}" \
  --workers "$WORKERS" --threads 2 --train-phantoms 10000 --val-phantoms 500 --epochs 20 \
  --batch-size 8 --time-budget-min "${BUDGET_MIN:-7.6}" --out "$RESULTS/phantom-3d" "$@" \
  2>&1 | tee "$RESULTS/pretrain.log"
