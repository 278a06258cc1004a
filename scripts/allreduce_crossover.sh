#!/usr/bin/env bash
# Where recursive doubling stops beating the ring for the TCP all-reduce
# (csrc/comm/tcp/allreduce.cpp, kRecursiveDoublingMaxBytes): disttrain bench
# allreduce over TCP with each algorithm forced (DISTTRAIN_ALLREDUCE_ALGO), at
# 3 and 4 ranks on loopback, 1 KiB to 1 MiB; writes
# benchmarks/results/allreduce_crossover.csv (time per size and algorithm, and the faster one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for ws in 3 4; do
  for algo in ring rd; do
    DISTTRAIN_ALLREDUCE_ALGO=$algo OMP_NUM_THREADS=1 $PY -m disttrain.bench.collectives allreduce \
      --nproc "$ws" --transport tcp -b 1K -e 1M -f 2 --rounds 5 --out "$tmp/ws${ws}_${algo}.csv" >/dev/null
  done
done
$PY - "$tmp" <<'PY'
import csv, os, sys
tmp = sys.argv[1]
rows = []
for ws in (3, 4):
    times = {}
    for algo in ("ring", "rd"):
        with open(os.path.join(tmp, f"ws{ws}_{algo}.csv")) as f:
            for r in csv.DictReader(f):
                times.setdefault(int(r["size_bytes"]), {})[algo] = float(r["disttrain_us"])
    for size, t in sorted(times.items()):
        rows.append({"world_size": ws, "bytes": size, "ring_us": t["ring"], "rd_us": t["rd"],
                     "faster": "rd" if t["rd"] < t["ring"] else "ring"})
out = os.path.join("benchmarks", "results", "allreduce_crossover.csv")
with open(out, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
for r in rows:
    print(f"{r['world_size']} ranks {r['bytes']:>8} B  ring {r['ring_us']:9.1f} us  rd {r['rd_us']:9.1f} us  -> {r['faster']}")
print(f"# wrote {out}")
PY
