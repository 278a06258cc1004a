"""``disttrain bench NAME``: each benchmark compares disttrain with the PyTorch
equivalent in the same run, prints the ratio and writes CSV to
``benchmarks/results/``. Each is also a module: ``python -m disttrain.bench.NAME``.
"""

from __future__ import annotations

import csv
import importlib
import os
import sys

BENCHMARKS = {
    "allreduce": "disttrain.bench.collectives",
    "allgather": "disttrain.bench.collectives",
    "reduce_scatter": "disttrain.bench.collectives",
    "broadcast": "disttrain.bench.collectives",
    "ddp": "disttrain.bench.ddp",
    "fsdp": "disttrain.bench.fsdp",
    "snapshot": "disttrain.bench.snapshot",
    "sampler": "disttrain.bench.sampler",
}


def write_csv(rows: list[dict], path: str, fields: list[str] | None = None) -> None:
    """Writes a benchmark's rows (one dict each) to ``path``, creating its folder."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields or list(rows[0]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"# wrote {path}")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: disttrain bench {" + ",".join(BENCHMARKS) + "} [options]")
        return 0 if argv else 2
    name = argv[0]
    if name not in BENCHMARKS:
        print(f"disttrain bench: unknown benchmark '{name}'; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[name])
    return int(module.main(argv) or 0)
