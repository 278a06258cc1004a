"""``disttrain bench launch``: how long ``disttrain.launch`` takes to run a function on N local
ranks and bring back their results, against the same job through torchrun (``python -m
torch.distributed.run --standalone``, which ``launch`` used before; the ranks, the payload and
the function are the same) and through ``torch.multiprocessing.spawn`` (what a script would
otherwise use; its ranks rendezvous over ``tcp://``). The function does one all-reduce and
returns: what is measured is starting, joining and ending a job, what a notebook user waits
for on every call. The methods take turns within each repeat, so a change of the machine's load
falls on all of them; the table gives each one's median and its ratio to torchrun's.

    disttrain bench launch                   # 2 and 3 ranks, 5 repeats
    disttrain bench launch --nproc 2 --repeats 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from disttrain.bench import arguments, write_csv

METHODS = ("disttrain.launch", "torchrun", "mp.spawn")


def _all_reduce_once() -> float:
    import torch
    import torch.distributed as dist

    t = torch.ones(4) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    return float(t[0])


def _torchrun_job(fn: Callable[[], Any], nproc: int) -> list[Any]:
    """``fn`` on ``nproc`` ranks through torchrun: the payload and rank side of disttrain.launch."""
    from disttrain.launch import collect_results, rank_environment, write_payload

    with tempfile.TemporaryDirectory(prefix="disttrain-bench-launch-") as workdir:
        write_payload(workdir, fn, (), "disttrain")
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc-per-node={nproc}", "-m", "disttrain._launch_worker", workdir],
                              env=rank_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results, failures = collect_results(workdir, [proc.returncode] * nproc, [])
        if failures:
            raise RuntimeError("under torchrun:\n" + "\n".join(failures))
        return results


def _expected(nproc: int) -> float:
    return nproc * (nproc + 1) / 2


def _spawned_rank(rank: int, nproc: int, port: int) -> None:
    """A rank of the mp.spawn job: mp.spawn brings no value back, so the rank checks its own sum
    (an exception here fails the job)."""
    import torch.distributed as dist

    import disttrain  # noqa: F401  (registers the backend)

    dist.init_process_group("disttrain", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=nproc)
    value = _all_reduce_once()
    dist.destroy_process_group()
    if value != _expected(nproc):
        raise RuntimeError(f"mp.spawn at {nproc} ranks: rank {rank} returned {value}")


def _spawn_job(nproc: int) -> None:
    import torch.multiprocessing as mp

    from disttrain.distributed import free_port

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_spawned_rank, args=(nproc, free_port()), nprocs=nproc, join=True)


def _time(method: str, nproc: int) -> float:
    import disttrain

    start = time.perf_counter()
    if method == "mp.spawn":
        _spawn_job(nproc)  # its ranks check their sums
        return time.perf_counter() - start
    if method == "disttrain.launch":
        results = disttrain.launch(_all_reduce_once, nproc=nproc, quiet=True, timeout=300)
    else:
        results = _torchrun_job(_all_reduce_once, nproc)
    seconds = time.perf_counter() - start
    if results != [_expected(nproc)] * nproc:
        raise RuntimeError(f"{method} at {nproc} ranks returned {results}")
    return seconds


def _counts(text: str) -> list[int]:
    try:
        counts = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"whole numbers separated by commas, got {text!r}") from None
    if any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError(f"every rank count must be >= 1, got {text!r}")
    return counts


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disttrain bench launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=_counts, default=[2, 3], help="rank counts, comma-separated (default 2,3)")
    p.add_argument("--repeats", type=_positive, default=5, help="jobs per method and rank count (default 5)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "launch.csv"))
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(arguments("launch", argv))
    counts = a.nproc
    rows = []
    for nproc in counts:
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        for i in range(a.repeats):
            for method in METHODS:
                times[method].append(_time(method, nproc))
            print(f"# {nproc} ranks, repeat {i + 1}/{a.repeats}: "
                  + ", ".join(f"{m} {times[m][-1]:.2f} s" for m in METHODS), flush=True)
        reference = statistics.median(times["torchrun"])
        for method in METHODS:
            median = statistics.median(times[method])
            rows.append({"method": method, "nproc": nproc, "repeats": a.repeats, "median_s": round(median, 3),
                         "min_s": round(min(times[method]), 3), "max_s": round(max(times[method]), 3),
                         "time_vs_torchrun": round(median / reference, 3)})
    print(f"{'method':<18} {'nproc':>5} {'median s':>9} {'min s':>7} {'max s':>7} {'vs torchrun':>12}")
    for r in rows:
        print(f"{r['method']:<18} {r['nproc']:>5} {r['median_s']:>9.2f} {r['min_s']:>7.2f} {r['max_s']:>7.2f} "
              f"{r['time_vs_torchrun']:>12.2f}")
    write_csv(rows, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
