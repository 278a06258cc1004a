#!/usr/bin/env bash
# Fault-tolerant training on one machine with every local GPU (or 2 CPU ranks).
# usage: scripts/one_node_train.sh TRAIN_TIME SAVE_NAME BATCH_SIZE [extra disttrain train options]
#   TRAIN_TIME  time budget in hours (e.g. 1.5)
#   SAVE_NAME   run folder under $SAVE_LOCATION (default runs/); rerunning resumes it
#   BATCH_SIZE  per rank
# Environment: NPROC (ranks; default: GPU count, else 2), MAX_RESTARTS (default 3),
# SAVE_LOCATION, MODEL (default resnet18), DATASET (default digits), DATA (folder).
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,9p' "$0"; exit 2
fi
TRAIN_TIME=$1 SAVE_NAME=$2 BATCH_SIZE=$3
shift 3
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
NPROC=${NPROC:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 2)}
DATA_ARGS=()
[ -n "${DATA:-}" ] && DATA_ARGS=(-d "$DATA")
exec torchrun --standalone --nproc-per-node "$NPROC" --max-restarts "${MAX_RESTARTS:-3}" \
  -m disttrain.cli train --time-budget "$TRAIN_TIME" --save-name "$SAVE_NAME" -b "$BATCH_SIZE" \
  -s "${SAVE_LOCATION:-runs}" -m "${MODEL:-resnet18}" --dataset "${DATASET:-digits}" "${DATA_ARGS[@]}" \
  --backend "${BACKEND:-disttrain}" "$@"
