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
its defect, shown as is), with SGD at each (lr, momentum) of ``--grid``: the
strategies want different settings (momentum 0.9 with the staleness of an
asynchronous parameter server diverges), so each is reported at the pair that
reached ``--target`` accuracy on a validation set (20% of the training split)
first. Reported: time per pass over the data, updates per second, time to the
target (validation accuracy after each epoch with the clock paused; the
parameter server snapshots during its run; post-selection, since the choice
is made on it), accuracy on the test split (which no choice uses), and ratios
to DDP. Rows go to ``benchmarks/results/strategies.csv`` (every run of the grid
to ``strategies_grid.csv``) and the chosen runs' loss curves, one chart per
process count, to ``strategies_losses_<N>.png``.

    disttrain bench strategies --processes 2,4 --epochs 15
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

from disttrain.bench import arguments, format_or_dash, write_csv

CONFIGS = ("ddp", "hogwild", "hogwild_local", "classic_hogwild", "classic_hogwild_1t", "ps_sync", "ps_ssp2",
           "ps_async", "rpc_ps")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disttrain bench strategies", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", default="2,4", help="comma-separated process counts (default 2,4)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    p.add_argument("--model", default="small_cnn", choices=("small_cnn", "mlp"))
    p.add_argument("--epochs", type=int, default=15, help="passes over the data set, all processes together")
    p.add_argument("--batch-size", type=int, default=32, help="per process (per worker, per rank)")
    p.add_argument("--grid", default="0.1:0.9,0.05:0.9,0.1:0.5,0.2:0",
                   help="lr:momentum pairs (SGD) tried for every configuration; each is reported at the pair that "
                        "reached the target validation accuracy first (default 0.1:0.9,0.05:0.9,0.1:0.5,0.2:0)")
    p.add_argument("--lr", type=float, default=0.1, help=argparse.SUPPRESS)
    p.add_argument("--momentum", type=float, default=0.9, help=argparse.SUPPRESS)
    p.add_argument("--target", type=float, default=0.9, help="target validation accuracy for time-to-target")
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
    """(train, validation, test): the digits training split less a fixed 20% kept
    for validation (which the curves and the hyperparameter choice use), and
    the test split (used for nothing but the reported accuracy)."""
    from torch.utils.data import TensorDataset

    from disttrain import data

    x, y = data.digits(train=True).tensors
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(123))
    n_val = len(y) // 5
    val, train = order[:n_val], order[n_val:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), data.digits(train=False)


def _loaders(val, test):
    return (torch.utils.data.DataLoader(val, batch_size=256), torch.utils.data.DataLoader(test, batch_size=256))


def _time_to(epochs: list[dict[str, Any]], target: float) -> float | None:
    return next((e["seconds"] for e in epochs if e["test_accuracy"] >= target), None)


def _finish(model: torch.nn.Module, val_loader, test_loader) -> dict[str, float]:
    from disttrain.strategies.hogwild import evaluate

    return {"val_accuracy": evaluate(model, val_loader)[1], "test_accuracy": evaluate(model, test_loader)[1]}


# --- one configuration per process -----------------------------------------------------------


def _job_ddp(args: argparse.Namespace, n: int) -> dict[str, Any]:
    """A rank of a torchrun job: disttrain DDP, the data split by disttrain's sampler."""
    import torch.distributed as dist

    import disttrain
    from disttrain.ddp import DistributedDataParallel
    from disttrain.strategies.hogwild import evaluate

    torch.set_num_threads(1)
    rank, world = disttrain.init()
    train, val, test = _data()
    val_loader, test_loader = _loaders(val, test)
    model = DistributedDataParallel(_model(args))
    sampler = disttrain.DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    x_all, y_all = train.tensors
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
            val_loss, acc = evaluate(model.module, val_loader)
            epochs.append({"epoch": epoch + 1, "seconds": trained, "test_loss": val_loss, "test_accuracy": acc})
    dist.barrier()
    return {"seconds": trained, "updates": steps, "passes": args.epochs, "epochs": epochs, "losses": losses,
            **_finish(model.module, val_loader, test_loader), "error": ""}


def _job_hogwild(args: argparse.Namespace, n: int, state: str) -> dict[str, Any]:
    from disttrain.strategies import hogwild

    train, val, test = _data()
    val_loader, test_loader = _loaders(val, test)
    model = _model(args)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    torch.set_num_threads(1)
    out = hogwild.train_model(model, torch.utils.data.DataLoader(train, batch_size=args.batch_size), n,
                              args.epochs, opt, log_interval=-1, seed=args.seed, optimizer_state=state,
                              test_dataloader=val_loader, timeout=args.timeout)
    merged = sorted((t, loss) for p in out.per_process for t, loss in zip(p["times"], p["losses"]))
    return {"seconds": out.elapsed, "updates": out.updates, "passes": args.epochs, "epochs": out.epochs,
            "losses": merged, **_finish(model, val_loader, test_loader), "error": ""}


def _classic_worker(rank: int, model: torch.nn.Module, args: argparse.Namespace, threads: int | None, start: Any,
                    results: Any) -> None:
    """PyTorch's mnist_hogwild ``train``: a DataLoader over the whole data set, an
    optimizer of the process's own, a Python loop."""
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        torch.manual_seed(args.seed + rank)
        train, _, _ = _data()
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
    _, val, test = _data()
    seconds = max(r[1] for r in reports)
    return {"seconds": seconds, "updates": sum(len(r[2]) for r in reports), "passes": args.epochs * n,
            "epochs": [], "losses": sorted(x for r in reports for x in r[2]), **_finish(model, *_loaders(val, test)),
            "error": "; ".join(errors)}


def _job_ps(args: argparse.Namespace, n: int, mode: str) -> dict[str, Any]:
    from disttrain.strategies.parameter_server import launch_ps_and_workers

    train, val, test = _data()
    val_loader, test_loader = _loaders(val, test)
    model, stats = launch_ps_and_workers(
        n, args.epochs, torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True),
        val_loader, model=_model(args), mode=mode, staleness=2,
        optimizer=lambda params: torch.optim.SGD(params, lr=args.lr, momentum=args.momentum),
        timeout=min(args.timeout, 120.0), seed=args.seed, log_interval=-1)
    epochs = [{"seconds": t, "test_accuracy": acc} for t, _, acc in stats.accuracy_history]
    return {"seconds": stats.elapsed, "updates": stats.updates, "passes": args.epochs, "epochs": epochs,
            "losses": list(stats.losses), **_finish(model, val_loader, test_loader), "error": ""}


def _job_rpc_ps(args: argparse.Namespace, n: int) -> dict[str, Any]:
    from disttrain.bench.classic_ps import run_classic_ps

    r = run_classic_ps(n - 1, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       timeout=min(args.timeout, 120.0), seed=args.seed)
    return {"seconds": r.get("elapsed_s") or 0.0, "updates": r.get("steps") or 0, "passes": args.epochs,
            "epochs": [], "losses": [], "val_accuracy": None, "test_accuracy": r.get("final_accuracy"),
            "error": r.get("error") or ""}


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


def _launch(config: str, n: int, argv: list[str], timeout: float, lr: float, momentum: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = os.path.join(tmp, "row.json")
        job = ["-m", "disttrain.bench.strategies", *argv, "--job", config, "--job-processes", str(n),
               "--rows-file", rows_file, "--lr", str(lr), "--momentum", str(momentum)]
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


def _row(config: str, n: int, lr: float, momentum: float, r: dict[str, Any], target: float) -> dict[str, Any]:
    seconds = r.get("seconds") or 0.0
    ok = not r.get("error") and seconds > 0
    ttt = _time_to(r.get("epochs") or [], target) if ok else None

    def value(key: str) -> Any:
        return r[key] if ok and r.get(key) is not None else ""

    return {"config": config, "processes": n, "lr": lr, "momentum": momentum, "passes": r.get("passes", ""),
            "s_per_pass": seconds / r["passes"] if ok and r.get("passes") else "",
            "updates": value("updates"), "updates_per_s": r["updates"] / seconds if ok else "",
            "time_to_target_s": ttt if ttt is not None else "", "val_accuracy": value("val_accuracy"),
            "test_accuracy": value("test_accuracy"), "error": r.get("error", "")}


def select(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run a configuration is reported with: the fastest to the target on the
    validation set; when none reaches it, the best final validation accuracy;
    the test accuracy plays no part."""
    reached = [r for r in runs if r["time_to_target_s"] != ""]
    if reached:
        return min(reached, key=lambda r: r["time_to_target_s"])
    scored = [r for r in runs if r["val_accuracy"] != ""]
    return max(scored, key=lambda r: r["val_accuracy"]) if scored else runs[0]


def _grid(text: str) -> list[tuple[float, float]]:
    try:
        points = [(float(a), float(b)) for a, b in (item.split(":") for item in text.split(",") if item)]
    except ValueError:
        raise SystemExit(f"disttrain bench strategies: --grid {text!r}: expected lr:momentum pairs, "
                         "e.g. 0.1:0.9,0.05:0.5") from None
    if not points or any(lr <= 0 or not 0 <= m < 1 for lr, m in points):
        raise SystemExit(f"disttrain bench strategies: --grid {text!r}: lr > 0 and 0 <= momentum < 1")
    return points


def report(rows: list[dict[str, Any]], target: float, out: str) -> None:
    by = {(r["config"], r["processes"]): r for r in rows}
    for r in rows:
        base = by.get(("ddp", r["processes"]))
        for key, col in (("s_per_pass", "pass_time_vs_ddp"), ("time_to_target_s", "time_to_target_vs_ddp"),
                         ("updates_per_s", "updates_per_s_vs_ddp")):
            ok = base is not None and r[key] != "" and base[key] not in ("", 0)
            r[col] = r[key] / base[key] if ok and base is not None else ""
    print(f"\n# strategies: same model and data; each at the (lr, momentum) of the grid that reached {target:.0%} "
          "validation accuracy first;\n# t->target: seconds of training to that (validation, post-selection); "
          "test acc: held-out test split; ratios to DDP at the same N")
    print(f"{'config':<20} {'N':>2} {'lr':>5} {'mom':>4} {'s/pass':>7} {'upd/s':>6} {'t->target':>9} {'test acc':>8} "
          f"{'pass x':>6} {'target x':>8}  note")
    for r in rows:
        print(f"{r['config']:<20} {r['processes']:>2} {r['lr']:>5.3g} {r['momentum']:>4.2g} "
              f"{format_or_dash(r['s_per_pass'], '7.3f')} "
              f"{format_or_dash(r['updates_per_s'], '6.0f')} {format_or_dash(r['time_to_target_s'], '9.2f')} "
              f"{format_or_dash(r['test_accuracy'], '8.3f')} {format_or_dash(r['pass_time_vs_ddp'], '6.2f')} "
              f"{format_or_dash(r['time_to_target_vs_ddp'], '8.2f')}  {r['error'][:70]}")
    for n in sorted({r["processes"] for r in rows}):
        ours, classic = by.get(("hogwild", n)), by.get(("classic_hogwild", n))
        classic1 = by.get(("classic_hogwild_1t", n))
        for peer, name in ((classic, "classic_hogwild"), (classic1, "classic_hogwild_1t")):
            if ours and peer and ours["updates_per_s"] != "" and peer["updates_per_s"] not in ("", 0):
                print(f"# {n} processes: hogwild updates/s = {ours['updates_per_s'] / peer['updates_per_s']:.2f}x "
                      f"{name}'s")
    write_csv(rows, out)


def main(argv: list[str] | None = None) -> int:
    argv = arguments("strategies", argv)
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
    grid = _grid(args.grid)
    rows, every = [], []
    curves: dict[str, list[Any]] = {}
    for n in counts:
        for config in configs:
            # The RPC pattern has no validation curve to choose by: one grid point (its plain SGD lr).
            points = grid[:1] if config == "rpc_ps" else grid
            runs: list[dict[str, Any]] = []
            losses: dict[tuple[float, float], list[Any]] = {}
            for lr, momentum in points:
                print(f"# {config}, {n} processes, lr {lr}, momentum {momentum} ...", flush=True)
                result = _launch(config, n, argv, args.timeout, lr, momentum)
                runs.append(_row(config, n, lr, momentum, result, args.target))
                losses[(lr, momentum)] = result.get("losses") or []
            every += runs
            chosen = select(runs)
            rows.append(chosen)
            if losses.get((chosen["lr"], chosen["momentum"])):
                curves[f"{config} x{n}"] = losses[(chosen["lr"], chosen["momentum"])]
    write_csv(every, os.path.splitext(args.out)[0] + "_grid.csv")
    report(rows, args.target, args.out)
    if curves:
        from disttrain.strategies.hogwild import chart_losses

        for n in counts:
            mine = {name: c for name, c in curves.items() if name.endswith(f" x{n}")}
            if not mine:
                continue
            path = f"{os.path.splitext(args.out)[0]}_losses_{n}.png"
            window = max(1, min(len(c) for c in mine.values()) // 40)
            chart_losses({name.rsplit(" x", 1)[0]: c for name, c in mine.items()},
                         f"Training loss against training time, {n} processes", path=path, smooth=window,
                         log_scale=True, log_time=True)
            print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
