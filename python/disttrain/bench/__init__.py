"""``disttrain bench NAME``: each benchmark compares disttrain with the PyTorch
equivalent in the same run, prints the ratio and writes CSV to
``benchmarks/results/``. Each is also a module: ``python -m disttrain.bench.NAME``.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys
import tempfile

BENCHMARKS = {
    "allreduce": "disttrain.bench.collectives",
    "allgather": "disttrain.bench.collectives",
    "reduce_scatter": "disttrain.bench.collectives",
    "broadcast": "disttrain.bench.collectives",
    "ddp": "disttrain.bench.ddp",
    "fsdp": "disttrain.bench.fsdp",
    "snapshot": "disttrain.bench.snapshot",
    "sampler": "disttrain.bench.sampler",
    "mpi": "disttrain.bench.mpi",
    "strategies": "disttrain.bench.strategies",
    "lightning": "disttrain.bench.lightning",
    "scaling": "disttrain.bench.scaling",
    "decentralised": "disttrain.bench.decentralised",
    "resume": "disttrain.bench.resume",
    "fault": "disttrain.bench.fault",
    "launch": "disttrain.bench.launch",
}


#: The benchmark-only venv with the peers that are not in the system's Python (scripts/bench_env.sh).
BENCH_VENV = os.environ.get("DISTTRAIN_BENCH_VENV", "/opt/disttrain-bench-venv")
BENCH_VENV_PYTHON = os.path.join(BENCH_VENV, "bin", "python")


def import_failure(*modules: str) -> str | None:
    """Why a peer's ``modules`` do not import in this interpreter (the first
    failure, ``Type: message``), or None when all do: any exception counts, as a
    peer's import can fail in many ways (a missing wheel, a torch ABI mismatch)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - any import failure means: skipped, with the reason
            return f"{type(e).__name__}: {e}"
    return None


def rerun_in_bench_venv(module: str, argv: list[str], missing: list[str]) -> None:
    """Re-runs ``python -m module *argv`` under the benchmark venv's Python
    (never returns) when a peer in ``missing`` does not import here but the
    venv exists; else returns, and the caller skips those peers."""
    if not missing or os.environ.get("DISTTRAIN_BENCH_RERUN") or not os.access(BENCH_VENV_PYTHON, os.X_OK) \
            or os.path.realpath(sys.prefix) == os.path.realpath(BENCH_VENV):
        return
    print(f"# {', '.join(missing)} not in this Python: re-running under {BENCH_VENV_PYTHON}", flush=True)
    sys.stdout.flush()
    os.execve(BENCH_VENV_PYTHON, [BENCH_VENV_PYTHON, "-m", module, *argv],
              dict(os.environ, DISTTRAIN_BENCH_RERUN="1"))


def write_csv(rows: list[dict], path: str, fields: list[str] | None = None) -> None:
    """Writes a benchmark's rows (one dict each) to ``path``, creating its folder. Atomically: an
    interrupted write (Ctrl-C, a full disk, a row that does not format) leaves the previous results
    file whole, never a truncated one."""
    from disttrain._atomic import umask, write_atomically

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def fill(f) -> None:
        writer = csv.DictWriter(f, fieldnames=fields or (list(rows[0]) if rows else []), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    write_atomically(path, fill, mode=0o666 & ~umask(), durable=False)
    print(f"# wrote {path}")


def run_per_world_size(module: str, argv: list[str], world_sizes: list[int], label: str) -> list[dict]:
    """Runs ``python -m module *argv`` as one torchrun job per world size (1
    thread per rank); each job's rank 0 writes its rows to ``--rows-file``.
    Returns all rows, in world-size order."""
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for world in world_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            rows_file = os.path.join(tmp, "rows.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                   "-m", module, *argv, "--rows-file", rows_file]
            print(f"# {world} ranks: {label}", flush=True)
            subprocess.run(cmd, env=env, check=True)
            with open(rows_file) as f:
                rows += json.load(f)
    return rows


def format_or_dash(value, spec: str) -> str:
    """A report cell: ``value`` formatted, or "-" for a CSV blank ("")."""
    return format(value, spec) if value != "" else "-"


def arguments(name: str, argv: list[str] | None) -> list[str]:
    """A benchmark's own arguments: ``argv`` (``sys.argv[1:]`` when None) without
    its leading NAME when called as ``disttrain bench NAME ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return argv[1:] if argv and argv[0] == name else argv


def per_world_size_main(name: str, argv: list[str] | None, build_parser, bench_rank, report, label) -> int:
    """``main`` of a benchmark that runs one torchrun job per ``--ranks`` entry:
    inside a job (RANK and WORLD_SIZE set) it runs ``bench_rank(args)``;
    otherwise it starts the jobs and ``report(rows, args.out)``s their rows.
    ``label(args)`` names the jobs in the progress lines."""
    argv = arguments(name, argv)
    args = build_parser().parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        bench_rank(args)
        return 0
    rows = run_per_world_size(f"disttrain.bench.{name}", argv, [int(w) for w in args.ranks.split(",") if w],
                              label(args))
    report(rows, args.out)
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        # asked for: the usage on stdout, exit 0; no benchmark named: an error, on stderr, exit 2
        usage = "usage: disttrain bench {" + ",".join(BENCHMARKS) + "} [options]"
        print(usage, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name = argv[0]
    if name not in BENCHMARKS:
        print(f"disttrain bench: unknown benchmark '{name}'; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[name])
    return int(module.main(argv) or 0)
