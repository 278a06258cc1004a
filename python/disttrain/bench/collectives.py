"""Collective benchmark in the style of nccl-tests, disttrain against gloo.

    disttrain bench allreduce --nproc 2            # starts 2 ranks itself
    torchrun --nproc-per-node 4 -m disttrain.bench.collectives allreduce

For each size, both backends run the same op on the same tensors in the same
job, alternating rounds so that both see the same machine. Per row: time,
algbw (bytes / time), busbw (algbw scaled by the op's traffic factor:
2(n-1)/n for all-reduce, (n-1)/n for all-gather and reduce-scatter, 1 for
broadcast), the gloo/disttrain time ratio and a correctness check. Rank 0
writes ``benchmarks/results/<op>_ws<N>.csv``.

``--peers deepspeed`` adds DeepSpeed's CPU shared-memory all-reduce
(``deepspeed.comm.inference_all_reduce`` after ``deepspeed.init_distributed("gloo")``,
``LOCAL_SIZE`` set to the ranks on this host as DeepSpeed's launcher does) to the
same rounds, with its own columns and its time over disttrain's per row. DeepSpeed
is never a dependency of disttrain: install it into the benchmark environment
only (docs/benchmarks.md). A peer that does not import, build or apply to the op
and dtype is skipped with the reason printed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from typing import cast

from disttrain.bench import write_csv

OPS = ("allreduce", "allgather", "reduce_scatter", "broadcast")
PEERS = ("deepspeed",)


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    for suffix, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10), ("B", 1)):
        if text.endswith(suffix):
            return int(float(text[:-1]) * mult)
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disttrain bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("op", choices=OPS)
    p.add_argument("-b", "--min-bytes", type=_parse_size, default=8, help="smallest size (default 8)")
    p.add_argument("-e", "--max-bytes", type=_parse_size, default=64 << 20, help="largest size (default 64M)")
    p.add_argument("-f", "--factor", type=int, default=4, help="size multiplier between rows (default 4)")
    p.add_argument("--nproc", type=int, default=2, help="ranks to start when not under torchrun (default 2)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16", "int32"])
    p.add_argument("--iters", type=int, default=0, help="timed iterations per round (default: by size)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per backend; the best counts (default 5)")
    p.add_argument("--baseline", default="gloo", help="backend to compare against (default gloo)")
    p.add_argument("--peers", default="", help="comma-separated peers measured in the same rounds: deepspeed")
    p.add_argument("--transport", choices=["auto", "tcp", "shm"], default=None,
                   help="force disttrain's transport (default: DISTTRAIN_TRANSPORT or auto)")
    p.add_argument("--out", default=None,
                   help="CSV path (default benchmarks/results/<op>_ws<N>_<transport>.csv)")
    return p


def _bus_factor(op: str, n: int) -> float:
    if op == "allreduce":
        return 2 * (n - 1) / n if n > 1 else 1.0
    if op in ("allgather", "reduce_scatter"):
        return (n - 1) / n if n > 1 else 1.0
    return 1.0


class Peer:
    """A library measured beside disttrain and the baseline: its own all-reduce
    (SUM, in place) on the same tensors, in the same rounds."""

    def __init__(self, name: str, all_reduce) -> None:
        self.name = name
        self.all_reduce = all_reduce


def _deepspeed_peer(op: str, dtype_name: str) -> tuple[Peer | None, str]:
    """DeepSpeed's CPU shared-memory all-reduce, or None and why not. Called on
    every rank after the default group exists (DeepSpeed then only adds its
    shared-memory op, built with ninja on first use)."""
    if op != "allreduce":
        return None, f"DeepSpeed's shared-memory op is an all-reduce only, not {op}"
    if dtype_name not in ("float32", "bfloat16", "float16"):
        return None, f"DeepSpeed's shared-memory all-reduce takes float32, bfloat16 and float16, not {dtype_name}"
    # DeepSpeed's launcher sets LOCAL_SIZE; its op uses shared memory only when
    # it equals the world size (every rank on this host), as here.
    os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    try:
        # By name: an optional package of the benchmark environment, typed Any
        # whether it is installed (untyped) or not.
        deepspeed = importlib.import_module("deepspeed")
        ds_comm = importlib.import_module("deepspeed.comm")

        deepspeed.init_distributed("gloo")
        backend = ds_comm.comm.cdb
        if getattr(backend, "shm_comm_op", None) is None:
            return None, "DeepSpeed imported but its shared-memory op did not build (ninja and a C++ compiler needed)"
        level = getattr(backend, "shm_vector_kernel_level", 0)
        if level < (1 if dtype_name == "float32" else 2):
            return None, "DeepSpeed's shared-memory kernels need AVX2 (float32) or AVX-512BW (16-bit) here"
    except Exception as e:  # noqa: BLE001 - any failure to import or build means: skipped, with the reason
        return None, f"DeepSpeed unavailable: {type(e).__name__}: {e}".splitlines()[0]
    return Peer("deepspeed", ds_comm.inference_all_reduce), ""


def _make_case(op, nbytes, dtype, rank, world):
    """Returns (run(pg), check(pg), bytes) for one op and size. run is what is
    timed (no refill of the buffers inside it, as in nccl-tests); check runs the
    op once on known data and says whether the result is right. For all-reduce,
    pg may be a Peer."""
    import torch
    import torch.distributed as dist

    elem = torch.tensor([], dtype=dtype).element_size()
    count = max(nbytes // elem, 1) if nbytes > 0 else 0
    if op == "allreduce":
        t = torch.zeros(count, dtype=dtype)  # zeros stay zeros under repeated sums

        def run(pg):
            if isinstance(pg, Peer):
                pg.all_reduce(t)
            else:
                dist.all_reduce(t, group=pg)

        def check(pg):
            t.fill_(rank + 1)
            run(pg)
            ok = count == 0 or bool((t == world * (world + 1) // 2).all())
            t.zero_()
            return ok
        return run, check, count * elem
    if op == "allgather":
        per = max(count // world, 1)
        src = torch.full((per,), rank, dtype=dtype)
        out = torch.empty(per * world, dtype=dtype)
        expect = torch.arange(world, dtype=dtype).repeat_interleave(per)

        def run(pg):
            dist.all_gather_into_tensor(out, src, group=pg)

        def check(pg):
            out.zero_()
            run(pg)
            return bool(torch.equal(out, expect))
        return run, check, per * world * elem
    if op == "reduce_scatter":
        per = max(count // world, 1)
        src = torch.arange(world, dtype=dtype).repeat_interleave(per)
        out = torch.empty(per, dtype=dtype)

        def run(pg):
            dist.reduce_scatter_tensor(out, src, group=pg)

        def check(pg):
            out.zero_()
            run(pg)
            return bool((out == rank * world).all())
        return run, check, per * world * elem
    t = torch.full((count,), 7 if rank == 0 else 0, dtype=dtype)

    def run(pg):
        dist.broadcast(t, src=0, group=pg)

    def check(pg):
        if rank != 0:
            t.zero_()
        run(pg)
        return count == 0 or bool((t == 7).all())
    return run, check, count * elem


def _time(run, pg, iters, barrier_pg=None):
    """Wall and CPU (all threads of this process) seconds per op."""
    import torch.distributed as dist

    dist.barrier(group=barrier_pg if barrier_pg is not None else pg)
    cpu0, start = time.process_time(), time.perf_counter()
    for _ in range(iters):
        run(pg)
    return (time.perf_counter() - start) / iters, (time.process_time() - cpu0) / iters


def memcpy_bandwidth(nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """Bytes per second one core copies between two large buffers (best of repeats)."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def bench_rank(args) -> None:
    import torch
    import torch.distributed as dist

    import disttrain

    if args.transport:
        os.environ["DISTTRAIN_TRANSPORT"] = args.transport
    torch.set_num_threads(1)
    disttrain.init()
    rank, world = dist.get_rank(), dist.get_world_size()
    world_group = dist.group.WORLD
    assert world_group is not None  # disttrain.init() created it
    backend = cast("disttrain._C.ProcessGroupDisttrain", world_group._get_backend(torch.device("cpu")))
    transport = backend.transport
    # The machine's copy bandwidth, measured by rank 0 alone, in the same run.
    dist.barrier()
    memcpy = torch.tensor([memcpy_bandwidth() if rank == 0 else 0.0], dtype=torch.float64)
    dist.broadcast(memcpy, src=0)
    memcpy_gbps = memcpy.item() / 1e9
    base_pg = dist.new_group(backend=args.baseline)
    ours_pg = dist.group.WORLD
    dtype = getattr(torch, args.dtype)
    peers: list[Peer] = []
    for name in [p.strip() for p in args.peers.split(",") if p.strip()]:
        if name not in PEERS:
            raise SystemExit(f"disttrain bench: unknown peer {name!r}; known: {', '.join(PEERS)}")
        peer, why = _deepspeed_peer(args.op, args.dtype)
        # Every rank must agree, or the ranks would run different rounds.
        ok = torch.tensor([1 if peer is not None else 0], dtype=torch.int32)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=base_pg)
        if peer is not None and ok.item():
            peers.append(peer)
        elif rank == 0:
            print(f"# peer {name} skipped: {why or 'not available on every rank'}", flush=True)
    sizes = []
    s = args.min_bytes
    while s <= args.max_bytes:
        sizes.append(s)
        s *= args.factor
    if sizes[-1] != args.max_bytes:
        sizes.append(args.max_bytes)
    rows = []
    if rank == 0:
        print(f"# disttrain bench {args.op}: {world} ranks, dtype {args.dtype}, baseline {args.baseline}, "
              f"disttrain transport {transport}, memcpy {memcpy_gbps:.2f} GB/s (one core, same run)"
              + "".join(f", peer {p.name}" for p in peers))
        print(f"{'size(B)':>12} {'count':>10} | {'disttrain us':>12} {'algbw':>8} {'busbw':>8} | "
              f"{args.baseline + ' us':>12} {'algbw':>8} {'busbw':>8} | {'speedup':>7} {'bw/memcpy':>9}"
              + "".join(f" | {p.name + ' us':>13} {'busbw':>8} {'x':>6}" for p in peers) + " check")
    for nbytes in sizes:
        run, check, moved = _make_case(args.op, nbytes, dtype, rank, world)
        iters = args.iters or max(3, min(200, int(32e6 / max(moved, 1))))
        ok = check(ours_pg) and check(base_pg)  # also the warm-up of both
        for peer in peers:
            ok = check(peer) and ok
        ours, base = [], []
        theirs: list[list[tuple[float, float]]] = [[] for _ in peers]
        for _ in range(args.rounds):
            # Interleaved: every contender sees the same machine, round by round.
            ours.append(_time(run, ours_pg, iters))
            base.append(_time(run, base_pg, iters))
            for peer, times in zip(peers, theirs):
                # Started by disttrain's barrier, the one that leaves the ranks
                # least apart (a gloo barrier's skew would land in the peer's first ops).
                times.append(_time(run, peer, iters, barrier_pg=ours_pg))
        ok = ok and check(ours_pg)
        # Best round of each: on a shared machine the other rounds measure the
        # neighbours. Rank 0 reports the slowest rank: a collective is as fast as its last rank.
        best_ours, best_base = min(ours), min(base)
        best_theirs = [min(times) for times in theirs]
        t = torch.tensor([best_ours[0], best_base[0], best_ours[1], best_base[1], 0.0 if ok else 1.0]
                         + [b[0] for b in best_theirs], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=base_pg)
        t_ours, t_base, cpu_ours, cpu_base, bad, *t_theirs = t.tolist()
        factor = _bus_factor(args.op, world)
        row = {
            "op": args.op, "world_size": world, "transport": transport, "dtype": args.dtype, "size_bytes": moved,
            "disttrain_us": t_ours * 1e6, "disttrain_algbw_GBps": moved / t_ours / 1e9,
            "disttrain_busbw_GBps": moved / t_ours / 1e9 * factor,
            "baseline": args.baseline, "baseline_us": t_base * 1e6, "baseline_algbw_GBps": moved / t_base / 1e9,
            "baseline_busbw_GBps": moved / t_base / 1e9 * factor,
            "speedup": t_base / t_ours, "disttrain_cpu_us": cpu_ours * 1e6, "baseline_cpu_us": cpu_base * 1e6,
            "memcpy_GBps": memcpy_gbps, "busbw_over_memcpy": moved / t_ours / 1e9 * factor / memcpy_gbps,
            "baseline_busbw_over_memcpy": moved / t_base / 1e9 * factor / memcpy_gbps,
        }
        for peer, t_peer in zip(peers, t_theirs):
            # <peer>_over_disttrain: the peer's time over disttrain's (> 1: disttrain is faster).
            row.update({
                f"{peer.name}_us": t_peer * 1e6, f"{peer.name}_algbw_GBps": moved / t_peer / 1e9,
                f"{peer.name}_busbw_GBps": moved / t_peer / 1e9 * factor,
                f"{peer.name}_busbw_over_memcpy": moved / t_peer / 1e9 * factor / memcpy_gbps,
                f"{peer.name}_over_disttrain": t_peer / t_ours,
            })
        row["correct"] = bad == 0.0
        rows.append(row)
        if rank == 0:
            print(f"{moved:>12} {moved // torch.tensor([], dtype=dtype).element_size():>10} | "
                  f"{row['disttrain_us']:>12.1f} {row['disttrain_algbw_GBps']:>8.3f} {row['disttrain_busbw_GBps']:>8.3f} | "
                  f"{row['baseline_us']:>12.1f} {row['baseline_algbw_GBps']:>8.3f} {row['baseline_busbw_GBps']:>8.3f} | "
                  f"{row['speedup']:>7.2f} {row['busbw_over_memcpy']:>9.3f}"
                  + "".join(f" | {row[p.name + '_us']:>13.1f} {row[p.name + '_busbw_GBps']:>8.3f} "
                            f"{row[p.name + '_over_disttrain']:>6.2f}" for p in peers)
                  + f" {'OK' if row['correct'] else 'WRONG'}", flush=True)
    if rank == 0:
        out = args.out or os.path.join("benchmarks", "results", f"{args.op}_ws{world}_{transport}.csv")
        write_csv(rows, out)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        bench_rank(args)
        return 0
    from torch.distributed.run import main as torchrun

    forwarded = list(sys.argv[1:] if argv is None else argv)
    # --nproc is ours, and torchrun's parser would take it for --nproc-per-node.
    for i, a in enumerate(forwarded):
        if a == "--nproc":
            del forwarded[i:i + 2]
            break
        if a.startswith("--nproc="):
            del forwarded[i]
            break
    torchrun(["--standalone", f"--nproc-per-node={args.nproc}", "-m", "disttrain.bench.collectives", *forwarded])
    return 0


if __name__ == "__main__":
    sys.exit(main())


def peers_table(paths: list[str], peer: str = "deepspeed") -> str:
    """A markdown table of ``disttrain bench allreduce --peers`` CSVs (docs/benchmarks.md):
    per size, the time and busbw of disttrain, the baseline and the peer, the
    ratios to disttrain (> 1: disttrain is faster) and busbw over this machine's memcpy."""
    import csv

    rows: list[dict[str, str]] = []
    for path in paths:
        with open(path, newline="") as fh:
            rows += list(csv.DictReader(fh))

    def size(n: int) -> str:
        for unit, mult in (("MiB", 1 << 20), ("KiB", 1 << 10)):
            if n >= mult and n % mult == 0:
                return f"{n // mult} {unit}"
        return f"{n} B"

    head = ("| size | disttrain us | gloo us | DeepSpeed us | gloo / disttrain | DeepSpeed / disttrain "
            "| busbw GB/s disttrain / gloo / DeepSpeed | busbw / memcpy disttrain / gloo / DeepSpeed |")
    out = [head, "|" + "---|" * 8]
    for r in sorted(rows, key=lambda r: int(r["size_bytes"])):
        f = {k: float(v) for k, v in r.items() if k.endswith(("_us", "_GBps", "_memcpy", "speedup", "_disttrain"))}
        mem = f["memcpy_GBps"]
        out.append(
            f"| {size(int(r['size_bytes']))} | {f['disttrain_us']:.1f} | {f['baseline_us']:.1f} | {f[peer + '_us']:.1f} "
            f"| {f['speedup']:.2f} | {f[peer + '_over_disttrain']:.2f} "
            f"| {f['disttrain_busbw_GBps']:.3f} / {f['baseline_busbw_GBps']:.3f} / {f[peer + '_busbw_GBps']:.3f} "
            f"| {f['disttrain_busbw_GBps'] / mem:.3f} / {f['baseline_busbw_GBps'] / mem:.3f} "
            f"/ {f[peer + '_busbw_GBps'] / mem:.3f} |")
    return "\n".join(out)
