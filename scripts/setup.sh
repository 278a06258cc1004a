#!/usr/bin/env bash
# Installs everything disttrain needs on a fresh Debian machine and builds the
# package. Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# The CPU build of torch; never let pip resolve an open 'torch' (a CUDA build of several GB).
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==2.13.0"
fi
# Debian packages: GoogleTest for the C++ unit tests, iproute2 for the multi-host
# (network namespace) tests, Open MPI (mpiexec, and the headers mpi4py builds
# against) for the mpiexec launch tests and disttrain bench mpi.
missing=""
dpkg -s libgtest-dev >/dev/null 2>&1 || missing="$missing libgtest-dev"
command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
dpkg -s openmpi-bin >/dev/null 2>&1 || missing="$missing openmpi-bin"
dpkg -s libopenmpi-dev >/dev/null 2>&1 || missing="$missing libopenmpi-dev"
# clang 14 and libFuzzer for the fuzz targets of the C++ parsers (scripts/fuzz.sh, tests/test_fuzz.py)
dpkg -s clang-14 >/dev/null 2>&1 || missing="$missing clang-14"
dpkg -s libfuzzer-14-dev >/dev/null 2>&1 || missing="$missing libfuzzer-14-dev"
if [ -n "$missing" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "setup: missing Debian packages:$missing (run as root to install them)" >&2
  fi
fi
# The C++ unit tests are part of the suite (scripts/run_tests.sh fails without
# them): no GoogleTest is an error here, not a build without the tests.
if ! dpkg -s libgtest-dev >/dev/null 2>&1; then
  echo "setup: FAILED: GoogleTest (libgtest-dev) is not installed and could not be installed here (not root, or no apt-get); the C++ unit tests need it" >&2
  exit 1
fi
# Chromium renders the advisor's web page in its headless browser test.
if ! command -v chromium >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: chromium missing and cannot apt-get install it (not root); the advisor web test will fail" >&2
  fi
fi
$PY -m pip install -q scikit-build-core ninja
# The same build also compiles the C++ unit tests (build/<wheel tag>/disttrain_cpp_tests),
# reusing the core's objects.
$PY -m pip install -q --no-build-isolation --config-settings=cmake.define.DISTTRAIN_BUILD_TESTS=ON ".[dev]"
# The libFuzzer targets (build/fuzz, clang-14 with coverage and sanitizers): a separate
# project, so the package build above never depends on clang.
bash scripts/fuzz.sh --build-only
