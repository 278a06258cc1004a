#!/usr/bin/env bash
# Development build: compiles _C into python/disttrain/ so that
# `PYTHONPATH=python python ...` uses this checkout without installing it.
# Incremental: only changed files are rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DDISTTRAIN_INPLACE=ON \
  -DPython3_EXECUTABLE="$(command -v $PY)" "$@" >build-config.log 2>&1 || { cat build-config.log; exit 1; }
cmake --build build/dev -j2
