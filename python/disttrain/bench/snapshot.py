"""``disttrain bench snapshot``: snapshot save/load throughput against
``torch.save``/``torch.load``, and how long training is blocked by an async
save against a synchronous one, all in the same run.

Rows (best of ``--repeats``: on a shared machine the fastest run is the one
least disturbed by others; every row's two columns come from the same run):

- ``save (durable)``: ``disttrain.snapshot.save`` (fsync of file and directory)
  vs ``torch.save`` followed by ``os.fsync`` (what a crash-safe torch.save costs);
- ``save (page cache)``: both without fsync;
- ``load``: ``disttrain.snapshot.load`` (every CRC checked) vs ``torch.load``,
  files in the page cache for both;
- ``async blocked``: time ``AsyncSnapshotter.save`` holds the caller (the
  staging copy) vs the synchronous durable save;
- ``train ...``: an MLP whose parameters plus momentum make the state size
  trains with SGD and saves a snapshot in a step (median over repeats): ``blocked`` is the time the
  training thread spends inside snapshot calls, ``step slower`` how much longer
  the step takes than one without a snapshot (the background write competes
  for the cores), both against the blocked time of a synchronous save.
  ``async`` copies before returning; ``overlapped`` is the trainer's mode, the
  copy overlapping forward and backward (``copy_in_background=True``,
  ``wait_staged()`` before ``optimizer.step()``).

With ``--peers dcp,torchsnapshot``, the comparison with PyTorch Distributed
Checkpoint and torchsnapshot instead, and the kill-during-save test (see
:mod:`disttrain.bench.snapshot_peers`).

Example::

    disttrain bench snapshot --sizes-mb 100 1000 --repeats 3
    disttrain bench snapshot --peers dcp,torchsnapshot --sizes-mb 100 1000 --kill-mb 100
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from disttrain.bench import arguments, rerun_in_bench_venv, write_csv

import torch

from .. import snapshot
from .snapshot_peers import PEERS  # noqa: F401 - `disttrain bench` checks --peers against it


def _state(total_bytes: int) -> dict:
    """A model-like state: 8 MB weight tensors plus many small ones."""
    torch.manual_seed(0)
    big, small = 8 << 20, 4096
    n_small = 200
    n_big = max(1, (total_bytes - n_small * small) // big)
    state = {f"layer{i}.weight": torch.randn(big // 4) for i in range(n_big)}
    state.update({f"layer{i}.bias": torch.randn(small // 4) for i in range(n_small)})
    return {"model": state, "step": 1000, "history": [0.5] * 100}


def _nbytes(state: dict) -> int:
    return sum(t.nbytes for t in state["model"].values())


def _torch_save(state, path: str, durable: bool) -> None:
    torch.save(state, path)
    if durable:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        dfd = os.open(os.path.dirname(path), os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _measure(state: dict, folder: str, repeats: int) -> dict[str, tuple[float, float]]:
    ours_path, torch_path = os.path.join(folder, "state.dts"), os.path.join(folder, "state.pt")
    times: dict[str, tuple[list[float], list[float]]] = {
        k: ([], []) for k in ("save (durable)", "save (page cache)", "load", "async blocked")}
    writer = snapshot.AsyncSnapshotter(os.path.join(folder, "async"), keep=1)
    writer.save(state, step=0)  # the first save allocates the staging memory, reused afterwards
    writer.wait()
    for r in range(repeats):
        # Alternate who goes first so neither always finds a cold page cache.
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for who in order:
            if who == 0:
                times["save (durable)"][0].append(_timed(lambda: snapshot.save(ours_path, state)))
                times["save (page cache)"][0].append(_timed(lambda: snapshot.save(ours_path, state, fsync=False)))
                times["load"][0].append(_timed(lambda: snapshot.load(ours_path)))
            else:
                times["save (durable)"][1].append(_timed(lambda: _torch_save(state, torch_path, True)))
                times["save (page cache)"][1].append(_timed(lambda: _torch_save(state, torch_path, False)))
                times["load"][1].append(_timed(lambda: torch.load(torch_path)))
        blocked = _timed(lambda: writer.save(state, step=r + 1))
        writer.wait()
        times["async blocked"][0].append(blocked)
    times["async blocked"][1].extend(times["save (durable)"][0])  # against our own synchronous save
    return {k: (min(a), min(b)) for k, (a, b) in times.items()}


def _mlp_for(total_bytes: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Linear(2048, 2048) layers: parameters + momentum ~ total_bytes."""
    width = 2048
    layers = max(1, total_bytes // 2 // (width * width * 4))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    return model, torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)


def _train_blocked(total_bytes: int, folder: str, repeats: int) -> dict[str, tuple[float, float]]:
    model, opt = _mlp_for(total_bytes)
    batch = torch.randn(32, 2048)
    writer = snapshot.AsyncSnapshotter(os.path.join(folder, "train"), keep=1)
    sync_path = os.path.join(folder, "train_sync.dts")

    def state():
        return {"model": model.state_dict(), "optimizer": opt.state_dict()}

    def step(save=None) -> tuple[float, float]:
        """Returns (step time, time the training thread spent blocked in snapshot calls)."""
        start = time.perf_counter()
        if save == "sync":
            snapshot.save(sync_path, state())
        elif save == "async":
            writer.save(state(), step=0)
        elif save == "overlapped":
            writer.save(state(), step=0, copy_in_background=True)
        blocked = time.perf_counter() - start
        opt.zero_grad()
        model(batch).square().mean().backward()
        if save == "overlapped":
            wait_start = time.perf_counter()
            writer.wait_staged()
            blocked += time.perf_counter() - wait_start
        opt.step()
        return time.perf_counter() - start, blocked

    for _ in range(2):
        step()
    writer.save(state(), step=0)  # allocates the staging memory once
    writer.wait()
    steps: dict[str, list[float]] = {"none": [], "sync": [], "async": [], "overlapped": []}
    blocked: dict[str, list[float]] = {mode: [] for mode in steps}
    for _ in range(repeats):
        for mode in steps:
            step_time, blocked_time = step(None if mode == "none" else mode)
            steps[mode].append(step_time)
            blocked[mode].append(blocked_time)
            writer.wait()  # the background write is not part of the next step
    base = statistics.median(steps["none"])
    return {mode: (statistics.median(blocked[mode]), max(0.0, statistics.median(steps[mode]) - base))
            for mode in steps if mode != "none"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disttrain bench snapshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="folder on the disk to measure (default: a temporary folder)")
    parser.add_argument("--csv", default="benchmarks/results/snapshot.csv")
    parser.add_argument("--peers", default="", help="comma-separated peers: dcp, torchsnapshot (then only the "
                        "peer comparison and the kill test run)")
    parser.add_argument("--kill-mb", type=int, default=100, help="state size of the kill-during-save test (0: skip)")
    parser.add_argument("--kill-at", type=float, nargs="+", default=[0.33, 0.9],
                        help="kill once the new checkpoint has this fraction of the state's bytes on disk")
    parser.add_argument("--min-free-gb", type=float, default=4.0,
                        help="skip a size whose state, copies and staging would leave less memory than this")
    parser.add_argument("--peers-csv", default="benchmarks/results/snapshot_peers.csv")
    parser.add_argument("--kill-csv", default="benchmarks/results/snapshot_kill.csv")
    return parser


def _peers_main(args: argparse.Namespace, argv: list[str]) -> int:
    import sys

    from . import snapshot_peers
    from .sampler import _mem_available

    wanted = [p.strip() for p in args.peers.split(",") if p.strip()]
    rerun_in_bench_venv("disttrain.bench.snapshot", argv,
                        [p for p in wanted if snapshot_peers.peer_unavailable(p) is not None])
    peers = []
    for name in wanted:
        why = snapshot_peers.peer_unavailable(name)
        if why is None:
            peers.append(name)
        else:
            print(f"# peer {name} skipped: {why}", flush=True)
    folder = tempfile.mkdtemp(prefix="disttrain-bench-snapshot-peers-", dir=args.dir)
    rows: list[dict] = []
    kill_rows: list[dict] = []
    print(f"# disttrain bench snapshot --peers {','.join(peers) or '(none)'}: best of {args.repeats} interleaved "
          f"rounds; x = peer's time / disttrain's (> 1: disttrain faster); folder {folder}", flush=True)
    try:
        for size_mb in args.sizes_mb:
            # The state, a loaded copy, DCP's and disttrain's staging copies, and the page cache of the files.
            need = 5 * (size_mb << 20)
            available = _mem_available()
            if available - need < args.min_free_gb * 2**30:
                print(f"{size_mb:>6}MB skipped: needs ~{need / 2**30:.1f} GiB, MemAvailable {available / 2**30:.1f} "
                      f"GiB (keeping {args.min_free_gb} GiB free)", flush=True)
                rows.append({"size_mb": size_mb, "system": "all", "operation": "skipped", "seconds": "",
                             "durable": "", "over_disttrain": "", "over_disttrain_same_durability": "",
                             "note": f"MemAvailable {available / 2**30:.1f} GiB"})
                continue
            state = _state(size_mb << 20)
            measured = snapshot_peers.measure(state, os.path.join(folder, f"{size_mb}mb"), peers, args.repeats)
            ours = {r["operation"]: r["seconds"] for r in measured if r["system"] == "disttrain"}
            # disttrain of the same durability: fsync for DCP, disttrain-nofsync for torchsnapshot
            like = {(r["operation"], r["durable"]): r["seconds"] for r in measured if r["system"].startswith("disttrain")}
            for r in measured:
                same = like.get((r["operation"], r["durable"]), ours[r["operation"]])
                r.update(size_mb=round(_nbytes(state) / 2**20), over_disttrain=r["seconds"] / ours[r["operation"]],
                         over_disttrain_same_durability=r["seconds"] / same, note="")
                rows.append(r)
                print(f"{r['size_mb']:>6}MB {r['system']:<17} {r['operation']:<14} {r['seconds']:>9.4f} s "
                      f"{'durable' if r['durable'] else 'page cache':<10} {r['over_disttrain']:>6.2f}x "
                      f"{r['over_disttrain_same_durability']:>6.2f}x (same durability)", flush=True)
            del state, measured
            shutil.rmtree(os.path.join(folder, f"{size_mb}mb"), ignore_errors=True)
        if args.kill_mb:
            for fraction in args.kill_at:
                for system in ["disttrain", *peers]:
                    for layout in ("one per step", "same path"):
                        row = snapshot_peers.kill_test(system, layout, args.kill_mb << 20, folder, sys.executable,
                                                       fraction)
                        row["size_mb"] = args.kill_mb
                        kill_rows.append(row)
                        print(f"kill {args.kill_mb}MB at {fraction:.0%} {system:<14} {layout:<13} "
                              f"{row['killed']:<16} -> {row['outcome']}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    write_csv(rows, args.peers_csv, ["size_mb", "system", "operation", "seconds", "over_disttrain",
                                     "over_disttrain_same_durability", "durable", "note"])
    if kill_rows:
        write_csv(kill_rows, args.kill_csv, ["size_mb", "system", "layout", "kill_at", "killed", "outcome"])
    return 0


def main(argv: list[str]) -> int:
    argv = arguments("snapshot", argv)
    args = build_parser().parse_args(argv)
    if args.peers:
        return _peers_main(args, argv)

    folder = tempfile.mkdtemp(prefix="disttrain-bench-snapshot-", dir=args.dir)
    rows = []
    print(f"threads {torch.get_num_threads()}, crc32c {snapshot._C.crc32c_implementation}, folder {folder}")
    header = f"{'size':>8} {'operation':<30} {'ours s':>8} {'base s':>9} {'disttrain GB/s':>14} " \
             f"{'base GB/s':>10} {'speed-up':>8}   (base: torch.save/torch.load; sync save for async rows)"
    print(header)
    try:
        for size_mb in args.sizes_mb:
            state = _state(size_mb << 20)
            nbytes = _nbytes(state)
            for op, (ours, theirs) in _measure(state, folder, args.repeats).items():
                baseline = "sync save" if op == "async blocked" else "torch"
                row = {"size_mb": round(nbytes / 2**20), "operation": op, "disttrain_s": ours, "baseline": baseline,
                       "baseline_s": theirs, "disttrain_GBps": nbytes / ours / 1e9,
                       "baseline_GBps": nbytes / theirs / 1e9, "speedup": theirs / ours}
                rows.append(row)
                note = f"   blocked {100 * ours / theirs:.1f}% of the sync save" if op == "async blocked" else ""
                print(f"{row['size_mb']:>6}MB {op:<30} {ours:>8.4f} {theirs:>9.4f} {row['disttrain_GBps']:>14.2f} "
                      f"{row['baseline_GBps']:>10.2f} {row['speedup']:>7.2f}x{note}")
            del state
            training = _train_blocked(size_mb << 20, folder, args.repeats)
            sync_blocked = training["sync"][0]
            for mode in ("async", "overlapped"):
                for what, index in (("blocked", 0), ("step slower", 1)):
                    op = f"train {mode} {what}"
                    ours = training[mode][index]
                    rows.append({"size_mb": size_mb, "operation": op, "disttrain_s": ours,
                                 "baseline": "train sync blocked", "baseline_s": sync_blocked, "disttrain_GBps": "",
                                 "baseline_GBps": "", "speedup": sync_blocked / ours if ours > 0 else float("inf")})
                    print(f"{size_mb:>6}MB {op:<30} {ours:>8.4f} {sync_blocked:>9.4f} {'':>14} {'':>10} "
                          f"{rows[-1]['speedup']:>7.2f}x   {100 * ours / sync_blocked:.1f}% of the sync save")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    write_csv(rows, args.csv)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
