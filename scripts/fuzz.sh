#!/usr/bin/env bash
# Coverage-guided fuzzing of disttrain's parsers (issue 19): libFuzzer for the
# C++ ones (fuzz/cpp: snapshot reader, TCP handshake and frames, the
# decentralised averager's messages), atheris for the Python entry points
# (fuzz/python: snapshot.load, the FSDP manifest loader, the decentralised
# control messages). The corpus is fuzz/corpus/<target> (committed; a run adds
# what it finds there); a crash lands in build/fuzz/crashes/<target>/ and must become
# a regression input in fuzz/regressions/<target>/ (tests/test_fuzz.py replays
# those and runs every target for a few seconds).
#
#   scripts/fuzz.sh                 every target for 600 s
#   scripts/fuzz.sh -t 60 snapshot_read tcp_handshake
#   scripts/fuzz.sh --build-only    build the C++ targets (clang-14, libFuzzer) only
#   scripts/fuzz.sh --merge         minimise each corpus (libFuzzer -merge / atheris -merge)
# Prints one line per target: executions, corpus files, crashes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SECONDS_PER_TARGET=600
BUILD_ONLY=0
MERGE=0
TARGETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -t|--seconds) SECONDS_PER_TARGET=$2; shift 2 ;;
    --build-only) BUILD_ONLY=1; shift ;;
    --merge) MERGE=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) TARGETS+=("$1"); shift ;;
  esac
done
CPP_TARGETS="snapshot_read tcp_handshake group_averager"
PY_TARGETS="snapshot_load fsdp_manifest decentralised_control"
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=($CPP_TARGETS $PY_TARGETS)

if ! command -v clang++-14 >/dev/null; then
  echo "fuzz: clang++-14 is missing (apt-get install clang-14 libfuzzer-14-dev; scripts/setup.sh does it)" >&2
  exit 1
fi
# (cmake --build reconfigures by itself when fuzz/CMakeLists.txt changes)
[ -f build/fuzz/build.ninja ] ||
  cmake -S fuzz -B build/fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build/fuzz -j "$(nproc)" >/dev/null
[ $BUILD_ONLY = 1 ] && exit 0

# libtorch is not instrumented: ASan's container-overflow annotations and
# new/delete pairing across it report false positives.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_container_overflow=0:alloc_dealloc_mismatch=0:detect_leaks=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
status=0
printf '%-22s %12s %8s %8s\n' target executions corpus crashes
for t in "${TARGETS[@]}"; do
  corpus=fuzz/corpus/$t
  crashes=build/fuzz/crashes/$t
  mkdir -p "$corpus" "$crashes"
  if [[ " $CPP_TARGETS " == *" $t "* ]]; then
    cmd=(build/fuzz/${t}_fuzzer)
  else
    cmd=($PY fuzz/python/fuzz_harness.py "$t")
  fi
  log=$crashes/last_run.log
  if [ $MERGE = 1 ]; then
    rm -rf "$corpus.merged" && mkdir "$corpus.merged"
    "${cmd[@]}" -merge=1 "$corpus.merged" "$corpus" >"$log" 2>&1
    rm -rf "$corpus" && mv "$corpus.merged" "$corpus"
  fi
  # -timeout: one input taking 25 s is a hang; -rss_limit_mb: a huge allocation is a crash.
  set +e
  mkdir -p fuzz/regressions/$t
  "${cmd[@]}" "$corpus" fuzz/regressions/$t -max_total_time="$SECONDS_PER_TARGET" -timeout=25 -rss_limit_mb=4096 \
    -artifact_prefix="$crashes/" -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -1 || true)
  found=$(ls "$crashes" | grep -cE '^(crash|timeout|oom|leak)-' || true)
  printf '%-22s %12s %8s %8s\n' "$t" "${runs:-?}" "$(ls "$corpus" | wc -l)" "$found"
  if [ $rc != 0 ]; then
    echo "fuzz: $t stopped with status $rc; log: $log" >&2
    status=1
  fi
done
exit $status
