#!/usr/bin/env bash
# The whole test suite: set-up, C++ unit tests (GoogleTest), Python tests
# (including multi-process, fault and notebook tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh

# C++ unit tests: built by setup.sh next to the extension.
cpp_tests=$(ls build/*/disttrain_cpp_tests 2>/dev/null | head -n 1 || true)
if [ -n "$cpp_tests" ]; then
  "$cpp_tests"
elif dpkg -s libgtest-dev >/dev/null 2>&1; then
  echo "run_tests: GoogleTest is installed but the C++ tests were not built" >&2
  exit 1
fi

# Run from a folder outside the source tree so the installed package is tested.
$PY -m pytest -q -p no:cacheprovider --durations=15 "$@" tests
