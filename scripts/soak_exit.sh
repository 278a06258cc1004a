#!/usr/bin/env bash
# Exit soak: runs the exit cases of tests/exit_worker.py many times under
# torchrun and prints a table: runs, runs where every rank exited with status
# 0, aborts (a rank died of SIGABRT, "terminate called without an active
# exception"), hangs (past the limit) and other failures. The case of the
# report comes first: a disttrain default group with a gloo subgroup, two
# hosts (network namespaces, 2 ranks each), no destroy_process_group().
#
#   bash scripts/soak_exit.sh                 # 50 runs of that case, 10 of each other exit case
#   RUNS=100 OTHER_RUNS=0 bash scripts/soak_exit.sh
#   PYTHONPATH=DIR bash scripts/soak_exit.sh  # another build of the package (e.g. the one before a fix)
#
# Needs root and iproute2 for the two-host cases (as tests/test_multihost.py).
# Exit status 0 only if every run of every case was clean. A run takes about
# 5 s on two cores: the default plan about 15 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RUNS=${RUNS:-50}
OTHER_RUNS=${OTHER_RUNS:-10}
export OMP_NUM_THREADS=1
soak() { $PY tests/exit_matrix.py soak "$@"; }

status=0
echo "== the reported case: $RUNS runs"
soak --runs "$RUNS" --topology two-hosts --default disttrain --teardown none || status=1
if [ "$OTHER_RUNS" -gt 0 ]; then
  echo "== the other exit cases: $OTHER_RUNS runs each"
  soak --runs "$OTHER_RUNS" --topology two-hosts --default gloo --teardown none || status=1
  soak --runs "$OTHER_RUNS" --topology two-hosts --default disttrain --teardown none --hold || status=1
  soak --runs "$OTHER_RUNS" --topology one-host --default disttrain gloo --teardown none || status=1
  soak --runs "$OTHER_RUNS" --topology one-host two-hosts --default disttrain gloo --teardown none destroy \
    --pending on || status=1
fi
exit $status
