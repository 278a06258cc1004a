#!/usr/bin/env bash
# Fault-tolerant training over several machines: run it on every node.
# usage: scripts/multi_node_train.sh TRAIN_TIME NODE_RANK NNODES SAVE_NAME BATCH_SIZE [extra options]
#   TRAIN_TIME  time budget in hours;  NODE_RANK  0 .. NNODES-1;  BATCH_SIZE  per rank
# Environment: MASTER_ADDR (node 0's address, required), MASTER_PORT (default 29500),
# NPROC (ranks per node; default: GPU count, else 2), MAX_RESTARTS (default 3),
# SAVE_LOCATION (must be storage every node sees, e.g. NFS: all ranks resume from
# the snapshots rank 0 wrote), MODEL, DATASET, DATA.
set -euo pipefail
if [ $# -lt 5 ]; then
  sed -n '2,8p' "$0"; exit 2
fi
TRAIN_TIME=$1 NODE_RANK=$2 NNODES=$3 SAVE_NAME=$4 BATCH_SIZE=$5
shift 5
: "${MASTER_ADDR:?set MASTER_ADDR to node 0's address}"
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
NPROC=${NPROC:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 2)}
DATA_ARGS=()
[ -n "${DATA:-}" ] && DATA_ARGS=(-d "$DATA")
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" \
  --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}" --max-restarts "${MAX_RESTARTS:-3}" \
  -m disttrain.cli train --time-budget "$TRAIN_TIME" --save-name "$SAVE_NAME" -b "$BATCH_SIZE" \
  -s "${SAVE_LOCATION:-runs}" -m "${MODEL:-resnet18}" --dataset "${DATASET:-digits}" "${DATA_ARGS[@]}" \
  --backend "${BACKEND:-disttrain}" "$@"
