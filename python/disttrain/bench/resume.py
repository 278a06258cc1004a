"""``disttrain bench resume``: mid-epoch resume of a data loader,
``disttrain.ResumableLoader`` over ``disttrain.DistributedSampler`` against
torchdata's ``StatefulDataLoader`` (``--peers torchdata``), with 0 and 2 workers.

A data set of ``--samples`` items whose item is its index (so the order is
what is checked) is loaded in batches; a first loader takes ``--resume-at`` of
the epoch's batches and saves its state; a new loader loads that state and
finishes the epoch. Per (loader, workers), best of ``--repeats`` interleaved
rounds:

* ``order``: ``exact`` when the resumed batches are the rest of the
  uninterrupted epoch, batch for batch, else how many differ;
* ``resume s``: from building the new loader (and loading the state) to its
  first batch; ``fresh s``: the same without a state (a new epoch's first
  batch), so ``resume - fresh`` is what resuming costs.

Loaders: ``disttrain`` (``DistributedSampler(mode="torch")``: PyTorch's order)
and ``disttrain-stream`` (``mode="stream"``), one rank of one; ``torchdata``
(``StatefulDataLoader(shuffle=True)``, its stateful ``RandomSampler``) and
``torchdata+torch-sampler`` (``StatefulDataLoader`` over PyTorch's
``DistributedSampler``, which has no state: torchdata fast-forwards it).
torchdata is not a dependency: from the benchmark venv (``scripts/bench_env.sh``),
where the bench re-runs itself if it is not importable here, else skipped with
the reason printed. Writes ``benchmarks/results/resume.csv``.

Example::

    disttrain bench resume --peers torchdata --samples 1000000 --workers 0 2
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from disttrain.bench import arguments, import_failure, rerun_in_bench_venv, write_csv


PEERS = ("torchdata",)


class _Indices(Dataset):
    """Item i is i."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def torchdata_unavailable() -> str | None:
    return import_failure("torchdata.stateful_dataloader")


def _factories(samples: int, batch: int, workers: int, seed: int) -> dict[str, Callable[[], Any]]:
    """Loader name -> a function building a new loader for epoch 0."""
    import disttrain

    data = _Indices(samples)
    kwargs: dict[str, Any] = {"batch_size": batch, "num_workers": workers}

    def ours(mode: str) -> Callable[[], Any]:
        def build() -> Any:
            sampler = disttrain.DistributedSampler(data, num_replicas=1, rank=0, seed=seed, mode=mode)
            sampler.set_epoch(0)
            return disttrain.ResumableLoader(DataLoader(data, sampler=sampler, **kwargs))
        return build

    def torchdata(with_torch_sampler: bool) -> Callable[[], Any]:
        def build() -> Any:
            # the bench venv's
            from torchdata.stateful_dataloader import StatefulDataLoader  # type: ignore[import-not-found]
            if with_torch_sampler:
                from torch.utils.data.distributed import DistributedSampler
                torch_sampler: DistributedSampler[int] = DistributedSampler(data, num_replicas=1, rank=0, seed=seed)
                torch_sampler.set_epoch(0)
                return StatefulDataLoader(data, sampler=torch_sampler, **kwargs)
            return StatefulDataLoader(data, shuffle=True, generator=torch.Generator().manual_seed(seed), **kwargs)
        return build

    return {"disttrain": ours("torch"), "disttrain-stream": ours("stream"), "torchdata": torchdata(False),
            "torchdata+torch-sampler": torchdata(True)}


def _run(build: Callable[[], Any], batches: int, state: Any = None) -> tuple[list[list[int]], float, Any]:
    """Builds a loader (loading ``state``), takes ``batches`` batches (all if -1):
    (the batches, seconds to the first batch, the state after them)."""
    start = time.perf_counter()
    loader = build()
    if state is not None:
        loader.load_state_dict(state)
    out: list[list[int]] = []
    first = 0.0
    it = iter(loader)
    for batch in it:
        if not out:
            first = time.perf_counter() - start
        out.append(batch.tolist())
        if len(out) == batches:
            break
    saved = loader.state_dict()
    del it  # shuts down the workers
    return out, first, saved


def measure(name: str, build: Callable[[], Any], resume_at: int) -> dict:
    whole, fresh, _ = _run(build, -1)
    head, _, state = _run(build, resume_at)
    rest, resume, _ = _run(build, -1, state)
    expected = whole[resume_at:]
    assert head == whole[:resume_at], f"{name}: the first loader's batches differ from the epoch's"
    differ = sum(a != b for a, b in zip(rest, expected)) + abs(len(rest) - len(expected))
    order = "exact" if differ == 0 else f"{differ} of {len(expected)} batches differ"
    return {"order": order, "resume_s": resume, "fresh_s": fresh, "resumed_batches": len(rest)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disttrain bench resume", description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", default="", help="comma-separated peers: torchdata")
    p.add_argument("--samples", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--resume-at", type=float, default=0.5, help="fraction of the epoch's batches taken first")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/resume.csv")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = arguments("resume", argv)
    args = build_parser().parse_args(argv)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    for peer in peers:
        if peer not in PEERS:
            print(f"disttrain bench resume: unknown peer '{peer}' (choose from {', '.join(PEERS)})", file=sys.stderr)
            return 2
    if peers:
        rerun_in_bench_venv("disttrain.bench.resume", argv, ["torchdata"] if torchdata_unavailable() else [])
    names = ["disttrain", "disttrain-stream"]
    if peers:
        why = torchdata_unavailable()
        if why is None:
            names += ["torchdata", "torchdata+torch-sampler"]
        else:
            print(f"# peer torchdata skipped: {why}", flush=True)
    torch.set_num_threads(1)
    batches = -(-args.samples // args.batch_size)
    resume_at = max(1, int(batches * args.resume_at))
    print(f"# disttrain bench resume: {args.samples:,} samples, batch {args.batch_size}, resume after {resume_at} of "
          f"{batches} batches; best of {args.repeats} interleaved rounds", flush=True)
    print(f"{'loader':<24} {'workers':>7} | {'order':<24} {'resume s':>9} {'fresh s':>8} {'resume-fresh':>12}")
    rows = []
    for workers in args.workers:
        builds = _factories(args.samples, args.batch_size, workers, args.seed)
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                runs[name].append(measure(name, builds[name], resume_at))
        for name in names:
            best = dict(min(runs[name], key=lambda row: row["resume_s"]))
            best["fresh_s"] = min(row["fresh_s"] for row in runs[name])
            orders = {row["order"] for row in runs[name]}
            best["order"] = "exact" if orders == {"exact"} else "; ".join(sorted(orders - {"exact"}))
            row = {"loader": name, "workers": workers, "samples": args.samples, "batch_size": args.batch_size,
                   "resume_at_batch": resume_at, **best, "resume_minus_fresh_s": best["resume_s"] - best["fresh_s"]}
            rows.append(row)
            print(f"{name:<24} {workers:>7} | {row['order']:<24} {row['resume_s']:>9.4f} {row['fresh_s']:>8.4f} "
                  f"{row['resume_minus_fresh_s']:>12.4f}", flush=True)
    write_csv(rows, args.out)
    return 0 if all(r["order"] == "exact" for r in rows if r["loader"].startswith("disttrain")) else 1


if __name__ == "__main__":
    sys.exit(main())
