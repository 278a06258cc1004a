#!/usr/bin/env bash
# The whole test suite: set-up, C++ unit tests (GoogleTest), Python tests
# (including multi-process, fault and notebook tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh

# C++ unit tests: built by setup.sh next to the extension. Missing tests are a
# failure, never a silent skip.
cpp_tests=$(ls build/*/disttrain_cpp_tests 2>/dev/null | head -n 1 || true)
if [ -z "$cpp_tests" ]; then
  if dpkg -s libgtest-dev >/dev/null 2>&1; then
    echo "run_tests: FAILED: GoogleTest is installed but the C++ unit tests (build/<wheel tag>/disttrain_cpp_tests) were not built; run scripts/setup.sh" >&2
  else
    echo "run_tests: FAILED: the C++ unit tests cannot run: GoogleTest (libgtest-dev) is not installed; run scripts/setup.sh as root (it installs it), or apt-get install libgtest-dev and rerun" >&2
  fi
  exit 1
fi
"$cpp_tests"

# Run from a folder outside the source tree so the installed package is tested.
$PY -m pytest -q -p no:cacheprovider --durations=15 "$@" tests
