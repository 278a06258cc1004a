"""Sampler benchmark: one epoch of indices on one rank, disttrain against
``torch.utils.data.distributed.DistributedSampler``.

    disttrain bench sampler                          # N = 1e6, 1e7, 1e8 (+ 1e9 stream)
    disttrain bench sampler --sizes 1e6,1e7 --stream-sizes 1e9 --num-replicas 8

Each cell (sampler, N) runs in a fresh process, so no cell inherits another's
allocator caches. A cell builds the sampler, then iterates one epoch of rank
0's indices with a C-level consumer (``sum``, which also yields a checksum) and
reports:

* time: from ``iter(sampler)`` to the last index (PyTorch's sampler does its
  ``randperm`` and list building inside ``iter``, ours its set-up);
* extra RSS: the process's peak resident set during the epoch (VmHWM, reset
  through /proc/self/clear_refs just before) minus its resident set before:
  every allocation, Python's and torch's;
* Python peak: tracemalloc's peak during a second, separately run epoch
  (tracemalloc slows allocation, so it is kept out of the timed epoch), over
  its first ``--trace-limit`` indices (default 1e8: PyTorch's sampler builds
  its whole list before the first index, ours holds one chunk at a time).

PyTorch's sampler at N = 1e9 needs tens of GB (an 8 GB permutation plus a
Python list of a billion ints); that cell runs only when the extrapolation from
its N = 1e8 cell fits in MemAvailable, else the row says so. Writes
``benchmarks/results/sampler.csv``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, cast

from disttrain.bench import arguments, write_csv

if TYPE_CHECKING:
    from torch.utils.data import Dataset

IMPLS = {
    "pytorch": "torch.utils.data.distributed.DistributedSampler",
    "torch": 'disttrain.DistributedSampler(mode="torch")',
    "stream": 'disttrain.DistributedSampler(mode="stream")',
}


class _Sized:
    """A data set that is only a length: the samplers never touch samples."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _make_sampler(impl: str, n: int, num_replicas: int, seed: int):
    if impl == "pytorch":
        from torch.utils.data.distributed import DistributedSampler
        return DistributedSampler(cast("Dataset[int]", _Sized(n)), num_replicas, 0, shuffle=True, seed=seed)
    import disttrain
    return disttrain.DistributedSampler(_Sized(n), num_replicas, 0, shuffle=True, seed=seed, mode=impl)


def run_cell(impl: str, n: int, num_replicas: int, trace: bool, trace_limit: int) -> dict:
    """One (sampler, N) measurement in this process; returns a result row."""
    import gc
    import tracemalloc

    import torch

    torch.set_num_threads(1)
    _ = sum(_make_sampler(impl, 1000, num_replicas, 0))  # load every code path once
    sampler = _make_sampler(impl, n, num_replicas, seed=0)
    gc.collect()
    rss_before = _status_kb("VmRSS")
    exact_peak = _reset_peak_rss()
    start = time.perf_counter()
    checksum = sum(iter(sampler))
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")  # without the reset: the lifetime peak, an upper bound
    count = len(sampler)
    py_peak = None
    if trace:
        sampler.set_epoch(1)
        gc.collect()
        tracemalloc.start()
        sum(itertools.islice(iter(sampler), trace_limit))
        py_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return {
        "impl": impl, "sampler": IMPLS[impl], "n": n, "num_replicas": num_replicas, "indices": count,
        "seconds": seconds, "indices_per_s": count / seconds if seconds > 0 else float("inf"),
        "extra_rss_bytes": max(peak - rss_before, 0) * 1024, "py_peak_bytes": py_peak,
        "checksum": checksum, "peak_exact": exact_peak,
        "note": f"Python peak over the first {trace_limit:,} indices" if trace and count > trace_limit else "",
    }


def _spawn_cell(impl: str, n: int, num_replicas: int, trace: bool, trace_limit: int, timeout: float) -> dict:
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "disttrain.bench.sampler", "--cell", impl, str(n), str(num_replicas)]
    cmd += ["--trace-limit", str(trace_limit)] if trace else ["--no-tracemalloc"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"cell {impl} N={n} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _parse_sizes(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disttrain bench sampler", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1e6,1e7,1e8", help="N for all three samplers (default 1e6,1e7,1e8)")
    p.add_argument("--stream-sizes", default="1e9",
                   help="extra N for stream mode, and PyTorch's if memory allows (default 1e9)")
    p.add_argument("--num-replicas", type=int, default=1, help="ranks the epoch is split over; rank 0 is timed")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds per cell, samplers alternating; the fastest round counts (default 1)")
    p.add_argument("--no-tracemalloc", action="store_true", help="skip the Python-allocation epoch")
    p.add_argument("--trace-limit", type=float, default=1e8,
                   help="indices of the traced epoch (default 1e8; the Python peak of ours is per chunk)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per cell (default 1800)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "sampler.csv"))
    p.add_argument("--cell", nargs=3, metavar=("IMPL", "N", "R"), help=argparse.SUPPRESS)
    return p


def _print_row(row: dict, torch_seconds: float | None) -> None:
    if row["seconds"] is None:
        print(f"{row['n']:>13,} {row['impl']:>8} | skipped: {row['note']}", flush=True)
        return
    ratio = "" if torch_seconds is None else f"{torch_seconds / row['seconds']:7.2f}x"
    py = "" if row["py_peak_bytes"] is None else f"{row['py_peak_bytes'] / 1e6:10.2f}"
    print(f"{row['n']:>13,} {row['impl']:>8} | {row['seconds']:9.3f} {row['indices_per_s'] / 1e6:9.2f} | "
          f"{row['extra_rss_bytes'] / 1e6:11.2f} {py:>10} | {ratio:>8}", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = arguments("sampler", argv)
    args = build_parser().parse_args(argv)
    trace = not args.no_tracemalloc
    if args.cell:
        impl, n, num_replicas = args.cell[0], int(args.cell[1]), int(args.cell[2])
        print(json.dumps(run_cell(impl, n, num_replicas, trace, int(args.trace_limit))))
        return 0

    sizes = _parse_sizes(args.sizes)
    stream_sizes = [n for n in _parse_sizes(args.stream_sizes) if n not in sizes]
    print(f"# disttrain bench sampler: one epoch on rank 0 of {args.num_replicas}, shuffle=True, one thread, "
          f"best of {args.repeats} round(s); speedup = PyTorch's time / this time")
    print(f"{'N':>13} {'sampler':>8} | {'time s':>9} {'Mindex/s':>9} | {'extra RSS MB':>11} {'py peak MB':>10} "
          f"| {'speedup':>8}")
    rows = []
    torch_bytes_per_index: float | None = None
    for n in sizes + stream_sizes:
        impls = ["pytorch", "stream"] if n in stream_sizes else ["pytorch", "torch", "stream"]
        if n in stream_sizes:
            need = None if torch_bytes_per_index is None else torch_bytes_per_index * n * 1.1
            available = _mem_available()
            if need is None or need > available:
                impls.remove("pytorch")
                estimate = "unknown" if need is None else f"~{need / 1e9:.0f} GB"
                row = {"impl": "pytorch", "sampler": IMPLS["pytorch"], "n": n, "num_replicas": args.num_replicas,
                       "indices": None, "seconds": None, "indices_per_s": None, "extra_rss_bytes": None,
                       "py_peak_bytes": None, "checksum": None, "peak_exact": None,
                       "note": f"needs {estimate} (extrapolated from the largest measured N), "
                               f"MemAvailable {available / 1e9:.1f} GB"}
                rows.append(row)
                _print_row(row, None)
        # Rounds alternate the samplers so that each sees the same machine;
        # a cell's time is its fastest round, its memory its largest.
        runs: dict[str, list[dict]] = {impl: [] for impl in impls}
        for round_index in range(args.repeats):
            for impl in impls:
                runs[impl].append(_spawn_cell(impl, n, args.num_replicas, trace and round_index == 0,
                                              int(args.trace_limit), args.timeout))
        torch_row = None
        for impl in impls:
            row = dict(min(runs[impl], key=lambda r: r["seconds"]))
            row["extra_rss_bytes"] = max(r["extra_rss_bytes"] for r in runs[impl])
            row["py_peak_bytes"] = runs[impl][0]["py_peak_bytes"]
            row["note"] = runs[impl][0]["note"]
            row["rounds"] = args.repeats
            if impl == "pytorch":
                torch_row = row
                torch_bytes_per_index = row["extra_rss_bytes"] / n
            elif impl == "torch" and torch_row is not None and row["checksum"] != torch_row["checksum"]:
                row["note"] = "CHECKSUM DIFFERS FROM PYTORCH"
            row["speedup_vs_pytorch"] = (torch_row["seconds"] / row["seconds"]) if torch_row else None
            rows.append(row)
            _print_row(row, torch_row["seconds"] if torch_row and impl != "pytorch" else None)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fields = ["impl", "sampler", "n", "num_replicas", "indices", "seconds", "indices_per_s", "extra_rss_bytes",
              "py_peak_bytes", "speedup_vs_pytorch", "rounds", "checksum", "peak_exact", "note"]
    write_csv(rows, args.out, fields)
    bad = [r for r in rows if "DIFFERS" in r["note"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
