#!/usr/bin/env bash
# The whole test suite: set-up, C++ unit tests (GoogleTest), Python tests
# (including multi-process, fault and notebook tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh

if dpkg -s libgtest-dev >/dev/null 2>&1; then
  cmake -S . -B build/cpp-tests -G Ninja -DCMAKE_BUILD_TYPE=Release -DDISTTRAIN_BUILD_TESTS=ON \
    -DPython3_EXECUTABLE="$(command -v $PY)" >/dev/null
  cmake --build build/cpp-tests --target disttrain_cpp_tests -j2
  ./build/cpp-tests/disttrain_cpp_tests
fi

# Run from a folder outside the source tree so the installed package is tested.
$PY -m pytest -q -p no:cacheprovider "$@" tests
