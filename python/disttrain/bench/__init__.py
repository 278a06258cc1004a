"""``disttrain bench NAME``: each benchmark compares disttrain with the PyTorch
equivalent in the same run, prints the ratio and writes CSV to
``benchmarks/results/``. Each is also a module: ``python -m disttrain.bench.NAME``.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "allreduce": "disttrain.bench.collectives",
    "allgather": "disttrain.bench.collectives",
    "reduce_scatter": "disttrain.bench.collectives",
    "broadcast": "disttrain.bench.collectives",
    "ddp": "disttrain.bench.ddp",
    "snapshot": "disttrain.bench.snapshot",
    "sampler": "disttrain.bench.sampler",
}


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
