#!/usr/bin/env bash
# The main job: set up, then a short fault-tolerant training run with 2 ranks on
# the embedded digits data set (no download), printing loss and accuracy per epoch.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUNS=$(mktemp -d)
python3 -m disttrain.cli train --nproc-per-node 2 -e 3 -b 32 -m small_cnn --dataset digits \
  -s "$RUNS" --save-name main-job --no-progress
echo "metrics: $RUNS/main-job/metrics.csv"
