#!/usr/bin/env bash
# The chaos soak of the snapshot trainer (issue 19): repeated `disttrain train`
# runs (digits, 2 ranks under torchrun), each with one fault - kill -9 of a
# random rank at a random instant, kill -9 mid-snapshot and mid-collective,
# SIGSTOP of a rank past the process-group timeout, a full disk (a small tmpfs
# under the run folder: needs root), a corrupted newest snapshot - each judged
# against an uninterrupted run: bit-identical, or a clear failure that then
# resumes to it; never a hang, never a completed epoch lost. Prints a line per
# run and a table (tests/chaos_soak.py; tests/test_chaos_soak.py is one run).
#
#   scripts/soak.sh                    30 runs (5 of each fault), a drawn seed
#   scripts/soak.sh --runs 60 --seed 7 --faults kill-random sigstop
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "$(id -u)" != 0 ]; then
  echo "soak: the full-disk fault mounts a tmpfs: run as root, or pass --faults without full-disk" >&2
fi
exec "$PY" tests/chaos_soak.py "$@"
