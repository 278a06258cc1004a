"""Parallel-training strategies on one machine, same model and data, same run:

    ddp              disttrain DDP (data-parallel; the reference)
    hogwild          disttrain Hogwild, data split, shared optimizer state
    hogwild_local    disttrain Hogwild, data split, per-process optimizer state
    classic_hogwild  PyTorch's mnist_hogwild pattern as written: model.share_memory(), a
                     Python SGD loop per process, each process reading the whole data set,
                     torch's default threads per process
    classic_hogwild_1t  the same pattern with one thread per process (no oversubscription)
    ps_sync, ps_ssp2, ps_async   disttrain's parameter server (1 server + N-1 workers)
    rpc_ps           PyTorch's RPC parameter-server tutorial pattern (its failure reported)

Each configuration runs in a fresh process (so none inherits another's thread
pools) for ``--epochs`` passes over the embedded digits data (each sample
``--epochs`` times in all; the classic pattern reads it N times as often: that is
its defect, shown as is). Reported per configuration: time per pass over the
data, updates per second, time to ``--target`` test accuracy (accuracy measured
after each epoch with the clock paused; the parameter server snapshots during
the run), final accuracy, and each one's ratio to DDP. Rows go to
``benchmarks/results/strategies.csv`` and the loss curves to ``strategies_losses.png``.

    disttrain bench strategies --processes 2,4 --epochs 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F

from disttrain.bench import format_or_dash, write_csv

CONFIGS = ("ddp", "hogwild", "hogwild_local", "classic_hogwild", "classic_hogwild_1t", "ps_sync", "ps_ssp2",
           "ps_async", "rpc_ps")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disttrain bench strategies", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", default="2,4", help="comma-separated process counts (default 2,4)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    p.add_argument("--model", default="small_cnn", choices=("small_cnn", "mlp"))
    p.add_argument("--epochs", type=int, default=8, help="passes over the data set, all processes together")
    p.add_argument("--batch-size", type=int, default=32, help="per process (per worker, per rank)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--target", type=float, default=0.9, help="target test accuracy for time-to-target")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per configuration")
    p.add_argument("--out", default="benchmarks/results/strategies.csv")
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--job-processes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--rows-file", help=argparse.SUPPRESS)
    return p


def _model(args: argparse.Namespace) -> torch.nn.Module:
    from disttrain import models

    torch.manual_seed(args.seed)
    return models.small_cnn() if args.model == "small_cnn" else models.mlp(hidden=128)


def _data():
    from disttrain import data

    return data.digits(train=True), data.digits(train=False)


def _time_to(epochs: list[dict[str, Any]], target: float) -> float | None:
    return next((e["seconds"] for e in epochs if e["test_accuracy"] >= target), None)


# --- one configuration per process -----------------------------------------------------------


def _job_ddp(args: argparse.Namespace, n: int) -> dict[str, Any]:
    """A rank of a torchrun job: disttrain DDP, the data split by disttrain's sampler."""
    import torch.distributed as dist

    import disttrain
    from disttrain.ddp import DistributedDataParallel
    from disttrain.strategies.hogwild import evaluate

    torch.set_num_threads(1)
    rank, world = disttrain.init()
    train, test = _data()
    model = DistributedDataParallel(_model(args))
    sampler = disttrain.DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    x_all, y_all = train.tensors
    test_loader = torch.utils.data.DataLoader(test, batch_size=256)
    trained, steps = 0.0, 0
    losses: list[tuple[float, float]] = []
    epochs = []
    dist.barrier()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        t0 = time.perf_counter()
        for start in range(0, len(order), args.batch_size):
            idx = order[start:start + args.batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            loss.backward()
            opt.step()
            steps += 1
            losses.append((trained + time.perf_counter() - t0, loss.item()))
        dist.barrier()
        trained += time.perf_counter() - t0
        if rank == 0:
            test_loss, acc = evaluate(model.module, test_loader)
            epochs.append({"epoch": epoch + 1, "seconds": trained, "test_loss": test_loss, "test_accuracy": acc})
    dist.barrier()
    return {"seconds": trained, "updates": steps, "passes": args.epochs, "epochs": epochs, "losses": losses,
            "final_accuracy": epochs[-1]["test_accuracy"] if epochs else None, "error": ""}


def _job_hogwild(args: argparse.Namespace, n: int, state: str) -> dict[str, Any]:
    from disttrain.strategies import hogwild

    train, test = _data()
    model = _model(args)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    torch.set_num_threads(1)
    out = hogwild.train_model(model, torch.utils.data.DataLoader(train, batch_size=args.batch_size), n,
                              args.epochs, opt, log_interval=-1, seed=args.seed, optimizer_state=state,
                              test_dataloader=torch.utils.data.DataLoader(test, batch_size=256),
                              timeout=args.timeout)
    merged = sorted((t, loss) for p in out.per_process for t, loss in zip(p["times"], p["losses"]))
    return {"seconds": out.elapsed, "updates": out.updates, "passes": args.epochs, "epochs": out.epochs,
            "losses": merged, "final_accuracy": out.test_accuracy, "error": ""}


def _classic_worker(rank: int, model: torch.nn.Module, args: argparse.Namespace, threads: int | None, start: Any,
                    results: Any) -> None:
    """PyTorch's mnist_hogwild ``train``: a DataLoader over the whole data set, an
    optimizer of the process's own, a Python loop."""
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        torch.manual_seed(args.seed + rank)
        train, _ = _data()
        loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
        losses = []
        start.wait()
        t0 = time.perf_counter()
        for _ in range(args.epochs):
            model.train()
            for x, y in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                losses.append((time.perf_counter() - t0, loss.item()))
        results.put((rank, time.perf_counter() - t0, losses, ""))
    except BaseException as e:  # noqa: BLE001 - reported in the row
        results.put((rank, 0.0, [], f"{type(e).__name__}: {e}"))


def _job_classic_hogwild(args: argparse.Namespace, n: int, threads: int | None) -> dict[str, Any]:
    import torch.multiprocessing as tmp

    from disttrain.strategies.hogwild import evaluate

    model = _model(args)
    model.share_memory()
    ctx = tmp.get_context("fork")  # the example's default start method on Linux
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_classic_worker, args=(r, model, args, threads, start, results)) for r in range(n)]
    for p in procs:
        p.start()
    start.set()
    reports = [results.get(timeout=args.timeout) for _ in procs]
    for p in procs:
        p.join()
    errors = [r[3] for r in reports if r[3]]
    _, test = _data()
    _, acc = evaluate(model, torch.utils.data.DataLoader(test, batch_size=256))
    seconds = max(r[1] for r in reports)
    return {"seconds": seconds, "updates": sum(len(r[2]) for r in reports), "passes": args.epochs * n,
            "epochs": [], "losses": sorted(x for r in reports for x in r[2]), "final_accuracy": acc,
            "error": "; ".join(errors)}


def _job_ps(args: argparse.Namespace, n: int, mode: str) -> dict[str, Any]:
    from disttrain.strategies.parameter_server import launch_ps_and_workers

    train, test = _data()
    _, stats = launch_ps_and_workers(
        n, args.epochs, torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True),
        torch.utils.data.DataLoader(test, batch_size=256), model=_model(args), mode=mode, staleness=2,
        optimizer=lambda params: torch.optim.SGD(params, lr=args.lr, momentum=args.momentum),
        timeout=min(args.timeout, 120.0), seed=args.seed, log_interval=-1)
    epochs = [{"seconds": t, "test_accuracy": acc} for t, _, acc in stats.accuracy_history]
    return {"seconds": stats.elapsed, "updates": stats.updates, "passes": args.epochs, "epochs": epochs,
            "losses": list(stats.losses), "final_accuracy": stats.final_accuracy, "error": ""}


def _job_rpc_ps(args: argparse.Namespace, n: int) -> dict[str, Any]:
    from disttrain.bench.classic_ps import run_classic_ps

    r = run_classic_ps(n - 1, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       timeout=min(args.timeout, 120.0), seed=args.seed)
    return {"seconds": r.get("elapsed_s") or 0.0, "updates": r.get("steps") or 0, "passes": args.epochs,
            "epochs": [], "losses": [], "final_accuracy": r.get("final_accuracy"), "error": r.get("error") or ""}


def _run_job(args: argparse.Namespace) -> dict[str, Any]:
    n, job = args.job_processes, args.job
    if job == "ddp":
        return _job_ddp(args, n)
    if job in ("hogwild", "hogwild_local"):
        return _job_hogwild(args, n, "shared" if job == "hogwild" else "per_process")
    if job in ("classic_hogwild", "classic_hogwild_1t"):
        return _job_classic_hogwild(args, n, None if job == "classic_hogwild" else 1)
    if job.startswith("ps_"):
        return _job_ps(args, n, {"ps_sync": "sync", "ps_ssp2": "ssp", "ps_async": "async"}[job])
    if job == "rpc_ps":
        return _job_rpc_ps(args, n)
    raise ValueError(f"unknown configuration {job!r}")


# --- the driver --------------------------------------------------------------------------------


def _launch(config: str, n: int, argv: list[str], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = os.path.join(tmp, "row.json")
        job = ["-m", "disttrain.bench.strategies", *argv, "--job", config, "--job-processes", str(n),
               "--rows-file", rows_file]
        if config == "ddp":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *job]
            env = dict(os.environ, OMP_NUM_THREADS="1")
        else:
            cmd = [sys.executable, *job]
            env = dict(os.environ)
            env.pop("OMP_NUM_THREADS", None)  # the classic pattern runs with torch's default threads
        try:
            proc = subprocess.run(cmd, env=env, timeout=timeout + 60, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"error": f"did not finish within {timeout + 60:.0f} s"}
        if proc.returncode != 0 or not os.path.exists(rows_file):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"error": f"exit status {proc.returncode}: {tail[0]}"}
        with open(rows_file) as f:
            return json.load(f)


def _row(config: str, n: int, r: dict[str, Any], target: float) -> dict[str, Any]:
    seconds = r.get("seconds") or 0.0
    ok = not r.get("error") and seconds > 0
    ttt = _time_to(r.get("epochs") or [], target) if ok else None
    acc = r.get("final_accuracy")
    return {"config": config, "processes": n, "passes": r.get("passes", ""),
            "s_per_pass": seconds / r["passes"] if ok and r.get("passes") else "",
            "updates": r.get("updates", "") if ok else "", "updates_per_s": r["updates"] / seconds if ok else "",
            "time_to_target_s": ttt if ttt is not None else "", "final_accuracy": acc if ok and acc is not None else "",
            "error": r.get("error", "")}


def report(rows: list[dict[str, Any]], target: float, out: str) -> None:
    by = {(r["config"], r["processes"]): r for r in rows}
    for r in rows:
        base = by.get(("ddp", r["processes"]))
        for key, col in (("s_per_pass", "pass_time_vs_ddp"), ("time_to_target_s", "time_to_target_vs_ddp"),
                         ("updates_per_s", "updates_per_s_vs_ddp")):
            ok = base is not None and r[key] != "" and base[key] not in ("", 0)
            r[col] = r[key] / base[key] if ok else ""
    print(f"\n# strategies: same model and data; time to {target:.0%} test accuracy; ratios to DDP at the same N")
    print(f"{'config':<20} {'N':>2} {'s/pass':>8} {'upd/s':>8} {'t->target':>10} {'final acc':>9} "
          f"{'pass x':>7} {'target x':>8}  note")
    for r in rows:
        print(f"{r['config']:<20} {r['processes']:>2} {format_or_dash(r['s_per_pass'], '8.3f')} "
              f"{format_or_dash(r['updates_per_s'], '8.0f')} {format_or_dash(r['time_to_target_s'], '10.2f')} "
              f"{format_or_dash(r['final_accuracy'], '9.3f')} {format_or_dash(r['pass_time_vs_ddp'], '7.2f')} "
              f"{format_or_dash(r['time_to_target_vs_ddp'], '8.2f')}  {r['error'][:80]}")
    for n in sorted({r["processes"] for r in rows}):
        ours, classic = by.get(("hogwild", n)), by.get(("classic_hogwild", n))
        classic1 = by.get(("classic_hogwild_1t", n))
        for peer, name in ((classic, "classic_hogwild"), (classic1, "classic_hogwild_1t")):
            if ours and peer and ours["updates_per_s"] != "" and peer["updates_per_s"] not in ("", 0):
                print(f"# {n} processes: hogwild updates/s = {ours['updates_per_s'] / peer['updates_per_s']:.2f}x "
                      f"{name}'s")
    write_csv(rows, out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "strategies":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    if args.job:
        result = _run_job(args)
        if args.job != "ddp" or int(os.environ.get("RANK", "0")) == 0:
            with open(args.rows_file, "w") as f:
                json.dump(result, f)
        return 0
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        print(f"disttrain bench strategies: unknown configuration(s) {', '.join(unknown)}; choose from "
              f"{', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    try:
        counts = [int(n) for n in args.processes.split(",") if n]
    except ValueError:
        print(f"disttrain bench strategies: --processes {args.processes!r} is not a list of integers", file=sys.stderr)
        return 2
    if not counts or min(counts) < 2:
        print("disttrain bench strategies: --processes needs counts >= 2 (a server and a worker)", file=sys.stderr)
        return 2
    rows, curves = [], {}
    for n in counts:
        for config in configs:
            print(f"# {config}, {n} processes ...", flush=True)
            result = _launch(config, n, argv, args.timeout)
            rows.append(_row(config, n, result, args.target))
            if result.get("losses"):
                curves[f"{config} x{n}"] = result["losses"]
    report(rows, args.target, args.out)
    if curves:
        from disttrain.strategies.hogwild import chart_losses

        path = os.path.splitext(args.out)[0] + "_losses.png"
        window = max(1, min(len(c) for c in curves.values()) // 40)
        chart_losses(curves, "Training loss against time, per strategy", path=path, smooth=window, log_scale=True)
        print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
