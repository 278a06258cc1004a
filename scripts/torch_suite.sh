#!/usr/bin/env bash
# PyTorch's own distributed test suite (torch.testing._internal.distributed.distributed_test) against
# disttrain and against gloo, at 2 and 3 ranks, run the same way (tests/torch_suite/torch_distributed_suite.py),
# then every test gloo passes and disttrain does not, listed. Long: each test spawns its ranks.
#   bash scripts/torch_suite.sh [OUT_DIR] [-k EXPRESSION]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-torch_suite_results}
shift || true
mkdir -p "$OUT"
for ws in 2 3; do
  for backend in disttrain gloo; do
    echo "torch_suite: $backend at $ws ranks" >&2
    TEMP_DIR=$(mktemp -d) BACKEND=$backend WORLD_SIZE=$ws $PY -m pytest -q -p no:cacheprovider \
      --junitxml="$OUT/${backend}_ws${ws}.xml" tests/torch_suite/torch_distributed_suite.py "$@" \
      > "$OUT/${backend}_ws${ws}.log" 2>&1 || true
  done
done
$PY - "$OUT" <<'PY'
import sys, xml.etree.ElementTree as ET
out = sys.argv[1]
def outcomes(path):
    result = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        result[case.get("name")] = kind
    return result
rows = []
for ws in (2, 3):
    d, g = outcomes(f"{out}/disttrain_ws{ws}.xml"), outcomes(f"{out}/gloo_ws{ws}.xml")
    count = lambda o, k: sum(v == k for v in o.values())
    print(f"{ws} ranks: disttrain {count(d, 'passed')} passed, {count(d, 'failure') + count(d, 'error')} failed, "
          f"{count(d, 'skipped')} skipped; gloo {count(g, 'passed')} passed, "
          f"{count(g, 'failure') + count(g, 'error')} failed, {count(g, 'skipped')} skipped")
    for name in sorted(n for n, v in g.items() if v == "passed" and d.get(n) != "passed"):
        print(f"  gloo passes, disttrain {d.get(name, 'absent')}: {name}")
PY
