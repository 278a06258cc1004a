#!/usr/bin/env bash
# PyTorch's own distributed test suite (torch.testing._internal.distributed.distributed_test) against
# disttrain and against gloo, at 2 and 3 ranks, run the same way (tests/torch_suite/torch_distributed_suite.py),
# then every test gloo passes and disttrain does not, listed. Long: each test spawns its ranks.
#   bash scripts/torch_suite.sh [OUT_DIR] [-k EXPRESSION]
# WORLD_SIZES (default "2 3") and BACKENDS (default "disttrain gloo") narrow it; SUMMARY_ONLY=1
# only compares the XML files already in OUT_DIR (e.g. after runs started by hand, side by side).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-torch_suite_results}
shift || true
mkdir -p "$OUT"
WORLD_SIZES=${WORLD_SIZES:-2 3}
if [ -z "${SUMMARY_ONLY:-}" ]; then
  for ws in $WORLD_SIZES; do
    for backend in ${BACKENDS:-disttrain gloo}; do
      echo "torch_suite: $backend at $ws ranks" >&2
      TEMP_DIR=$(mktemp -d) BACKEND=$backend WORLD_SIZE=$ws $PY -m pytest -q -p no:cacheprovider \
        --junitxml="$OUT/${backend}_ws${ws}.xml" tests/torch_suite/torch_distributed_suite.py "$@" \
        > "$OUT/${backend}_ws${ws}.log" 2>&1 || true
    done
  done
fi
WORLD_SIZES="$WORLD_SIZES" $PY - "$OUT" <<'PY'
import os, sys, xml.etree.ElementTree as ET
out = sys.argv[1]
def outcomes(path):
    result = {}
    if not os.path.exists(path):
        return None
    for case in ET.parse(path).getroot().iter("testcase"):
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        result[case.get("name")] = kind
    return result
def counts(o):
    return ", ".join(f"{sum(v == k for v in o.values())} {label}" for k, label in
                     (("passed", "passed"), ("failure", "failed"), ("error", "errors"), ("skipped", "skipped")))
for ws in map(int, os.environ["WORLD_SIZES"].split()):
    d, g = outcomes(f"{out}/disttrain_ws{ws}.xml"), outcomes(f"{out}/gloo_ws{ws}.xml")
    if d is None or g is None:
        print(f"{ws} ranks: no results for {'disttrain' if d is None else 'gloo'}")
        continue
    print(f"{ws} ranks: disttrain {counts(d)}; gloo {counts(g)}")
    for name in sorted(n for n, v in g.items() if v == "passed" and d.get(n) != "passed"):
        print(f"  gloo passes, disttrain {d.get(name, 'absent')}: {name}")
PY
