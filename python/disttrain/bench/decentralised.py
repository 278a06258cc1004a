"""Training over a slow network (issue 16): the same model and data on an
emulated network of ``--peers`` hosts (``disttrain.netem``: ``--delay-ms`` one
way, ``--rate-mbit`` per link), one system after another on the same network in
the same run:

    ddp            DDP over the disttrain backend, one rank per host, rendezvous on
                   host 0's address: the reference; its final test accuracy is the target
    hivemind       hivemind.Optimizer (its PyPI wheel, in the benchmark-only venv of
                   scripts/bench_env.sh) with DDP's global batch as target batch size
    hivemind_local hivemind.Optimizer with use_local_updates=True (each host steps on its
                   own batches, parameters averaged once per target batch) and a target batch
                   --hivemind-local-factor times DDP's global batch: hivemind's closest mode
                   to DiLoCo's H local steps, shown beside the issue's comparison
    local          the control: every host trains alone on its shard, nothing sent (what
                   the data set allows without any collaboration)
    decentralised  disttrain's decentralised strategy (disttrain.strategies.decentralised,
                   the Peer that `disttrain train --strategy decentralised` runs), DiLoCo
                   mode: --local-steps H, SGD inside, Nesterov outer step

Every system trains an MLP on the embedded digits data, each host on its
shard of every pass (``--batch-size`` per step), SGD with the same lr and
momentum. DDP's run is as many samples as ``--epochs``; its final test accuracy
is the target. Every other system may take up to ``--steps-factor`` times as
many steps as a DDP rank (hivemind: as many global updates of its target batch,
its own notion of a run), so that one needing more samples than DDP can still
show its time to the target; its accuracy at DDP's sample count is reported
too (``acc_at_ddp_samples``). Host 0 evaluates on the test split every
``--eval-every`` seconds (in its wall time). Bytes are the IPv4 bytes each host sent onto the wire,
counted by the wire for every system alike. Reported per system: time from the
common start to DDP's final accuracy and the bytes per host sent by then,
with ratios to DDP and to hivemind (all measured in this run); curves of
accuracy against time and bytes. The churn scenario runs hivemind and the
decentralised strategy again and kills one host with SIGKILL mid-training: do
the others go on, and do they stop on their own?

    disttrain bench decentralised                      # needs root; hivemind: scripts/bench_env.sh
    disttrain bench decentralised --systems ddp --epochs 2 --no-churn

Writes ``--out`` (default benchmarks/results/decentralised.csv), the curves to
``*_curves.csv`` and the churn scenario to ``*_churn.csv`` beside it.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from disttrain.bench import arguments, format_or_dash, write_csv

SYSTEMS = ("ddp", "hivemind", "hivemind_local", "decentralised", "local")
HIVEMIND_PORT = 31337
PEER_PORT = 29541  # the decentralised strategy's control port on every host
DDP_PORT = 29531
DEFAULT_BENCH_PYTHON = "/opt/disttrain-bench-venv/bin/python"


def check_args(args: argparse.Namespace, backends: list[str]) -> None:
    """The command line's check before anything starts (ValueError, one line): what the emulated
    network and the data set allow."""
    from disttrain import data

    if not 1 <= args.peers <= 250:
        raise ValueError(f"--peers {args.peers}: expected 1 to 250 hosts (the emulated network's /24)")
    if args.churn and args.peers < 2:
        raise ValueError(f"--peers {args.peers}: the churn scenario kills one host and watches the others; "
                         "give at least 2 hosts or --no-churn")
    shard = len(data.digits(True, seed=args.seed)) // args.peers
    if shard < args.batch_size:
        raise ValueError(f"--peers {args.peers} with --batch-size {args.batch_size}: each host's shard of the "
                         f"digits training split is {shard} samples, less than one batch; use fewer hosts or "
                         "a smaller --batch-size")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disttrain bench decentralised", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    p.add_argument("--peers", type=int, default=4, help="hosts on the emulated network (default 4)")
    p.add_argument("--delay-ms", type=float, default=50.0, help="one-way delay between hosts (default 50)")
    p.add_argument("--rate-mbit", type=float, default=10.0, help="each host's link, Mbit/s each way (default 10)")
    p.add_argument("--epochs", type=int, default=10,
                   help="passes over the training split: every host of every system takes as many steps as a "
                        "DDP rank does in this many passes")
    p.add_argument("--batch-size", type=int, default=32, help="per host and step (global batch: peers x this)")
    p.add_argument("--hidden", type=int, default=128, help="the MLP's hidden width (2 layers)")
    p.add_argument("--steps-factor", type=float, default=3.0,
                   help="the other systems may take up to this many times DDP's steps (default 3), "
                        "within --budget")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=float, default=0.5, help="seconds between host 0's evaluations")
    p.add_argument("--budget", type=float, default=120.0, help="seconds of training per system before it is stopped")
    p.add_argument("--matchmaking-time", type=float, default=3.0,
                   help="hivemind's matchmaking_time (3 s, with averaging_timeout 10 s, as in its quickstart)")
    p.add_argument("--local-steps", type=int, default=20, help="H of the decentralised strategy")
    p.add_argument("--compression", choices=("none", "bf16", "int8"), default="none",
                   help="what the decentralised strategy's averaging sends (default none: float32)")
    p.add_argument("--hivemind-local-factor", type=int, default=20,
                   help="hivemind_local's target batch size over DDP's global batch (default 20)")
    p.add_argument("--bench-python", default=os.environ.get("DISTTRAIN_BENCH_PYTHON", DEFAULT_BENCH_PYTHON),
                   help="python of the benchmark venv with hivemind (scripts/bench_env.sh)")
    p.add_argument("--churn", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the churn scenario (hivemind and the decentralised strategy, when run, each "
                        "with one host killed with SIGKILL)")
    p.add_argument("--out", default="benchmarks/results/decentralised.csv")
    p.add_argument("--keep-logs", help="keep every host's output and progress log in this folder")
    # A host's process (started by the benchmark inside a namespace).
    p.add_argument("--worker", choices=("ddp", "hivemind", "decentralised", "local"), help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--master", help=argparse.SUPPRESS)
    p.add_argument("--initial-peers", default="", help=argparse.SUPPRESS)
    p.add_argument("--max-steps", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ddp-steps", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--target-batch-size", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--local-updates", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stop-on-updates", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--log", help=argparse.SUPPRESS)
    p.add_argument("--start-file", help=argparse.SUPPRESS)
    return p


# --- one host's process ----------------------------------------------------------------------------

class _Log:
    """JSON lines a host writes for the benchmark: maddrs, ready, progress, done."""

    def __init__(self, path: str) -> None:
        self.file = open(path, "a", buffering=1)

    def __call__(self, event: str, **fields: Any) -> None:
        self.file.write(json.dumps({"e": event, "t": time.monotonic(), **fields}) + "\n")


def _sgd_stepper(forward: Any, model: Any, args: argparse.Namespace) -> tuple[Callable, Callable[[], int]]:
    """A plain SGD step through ``forward`` (the model, or DDP around it) and its update count."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    updates = [0]

    def step(x: Any, y: Any) -> None:
        opt.zero_grad()
        F.cross_entropy(forward(x), y).backward()
        opt.step()
        updates[0] += 1

    return step, lambda: updates[0]


def _local_stepper(args: argparse.Namespace, model: Any, log: _Log) -> tuple[Callable, Callable[[], int], Callable]:
    return (*_sgd_stepper(model, model, args), lambda: None)


def _ddp_stepper(args: argparse.Namespace, model: Any, log: _Log) -> tuple[Callable, Callable[[], int], Callable]:
    import torch.distributed as dist

    import disttrain

    os.environ.update(RANK=str(args.rank), WORLD_SIZE=str(args.peers), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR=args.master, MASTER_PORT=str(DDP_PORT))
    disttrain.init(timeout=60)
    return (*_sgd_stepper(disttrain.DistributedDataParallel(model), model, args), dist.destroy_process_group)


def _hivemind_stepper(args: argparse.Namespace, model: Any, log: _Log) -> tuple[Callable, Callable[[], int], Callable]:
    import hivemind  # type: ignore[import-not-found]  # the benchmark venv's, never a disttrain dependency
    import torch
    import torch.nn.functional as F

    maddr = f"/ip4/{args.address}/tcp/{HIVEMIND_PORT}"
    dht = hivemind.DHT(initial_peers=[p for p in args.initial_peers.split(",") if p], host_maddrs=[maddr],
                       announce_maddrs=[maddr], start=True)
    log("maddrs", maddrs=[str(m) for m in dht.get_visible_maddrs()])
    opt = hivemind.Optimizer(
        dht=dht, run_id="disttrain_bench_digits", params=model.parameters(),
        optimizer=functools.partial(torch.optim.SGD, lr=args.lr, momentum=args.momentum),
        batch_size_per_step=args.batch_size, target_batch_size=args.target_batch_size,
        use_local_updates=args.local_updates, matchmaking_time=args.matchmaking_time, averaging_timeout=10.0,
        verbose=False)
    peers_seen = [0]  # a host is seen by the others once it has reported a step (hivemind's progress tracker)

    def step(x: Any, y: Any) -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        peers_seen[0] = max(peers_seen[0], opt.tracker.global_progress.num_peers)

    def close() -> None:
        log("swarm", max_peers_seen=peers_seen[0])
        opt.shutdown()
        dht.shutdown()

    return step, lambda: int(opt.local_epoch), close


def _decentralised_stepper(args: argparse.Namespace, model: Any,
                           log: _Log) -> tuple[Callable, Callable[[], int], Callable]:
    import torch
    import torch.nn.functional as F

    strategy = importlib.import_module("disttrain.strategies.decentralised")

    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    peer = strategy.Peer(model, opt, initial_peers=args.initial_peers or None, host=args.address, port=PEER_PORT,
                         secret=b"disttrain-bench-decentralised",
                         config=strategy.DecentralisedConfig(
                             local_steps=args.local_steps,
                             compression=None if args.compression == "none" else args.compression))
    peer.start()
    log("maddrs", maddrs=[peer.address])
    peer.wait_for_peers(args.peers - 1, timeout=120)  # the group forms before the clock starts, as DDP's does

    def step(x: Any, y: Any) -> None:
        peer.train_step(x, y, F.cross_entropy)

    def close() -> None:
        log("swarm", max_peers_seen=len(peer.stats.peers_seen), rounds=peer.stats.rounds,
            group_sizes=peer.stats.group_sizes)
        peer.close()

    return step, lambda: peer.stats.rounds, close


def _worker(args: argparse.Namespace) -> int:
    import torch

    from disttrain import data, models
    from disttrain.strategies._common import evaluate, split_epoch

    torch.set_num_threads(1)
    log = _Log(args.log)
    train, test = data.digits(True, seed=args.seed), data.digits(False, seed=args.seed)
    images, labels = train.tensors
    torch.manual_seed(args.seed)
    model = models.mlp(hidden=args.hidden)
    stepper = {"ddp": _ddp_stepper, "hivemind": _hivemind_stepper, "decentralised": _decentralised_stepper,
               "local": _local_stepper}[args.worker]
    step, updates, close = stepper(args, model, log)
    log("ready")
    while not os.path.exists(args.start_file):
        time.sleep(0.02)
    start = time.monotonic()
    samples, steps, epoch, last_report = 0, 0, 0, -math.inf
    # A host stops after --max-steps of its steps (hivemind's: of its global updates, --stop-on-updates).
    # DDP's ranks must all take the same steps, so only that count stops them (the benchmark kills a job
    # past its budget); a host of the other systems also stops at the budget on its own.
    out_of_time = (lambda: False) if args.worker == "ddp" else (lambda: time.monotonic() - start > args.budget)

    def report() -> None:
        acc = evaluate(model, [test.tensors])[1] if args.rank == 0 else None
        log("progress", steps=steps, updates=updates(), samples=samples, acc=acc)

    def done() -> bool:
        return (updates() if args.stop_on_updates else steps) >= args.max_steps or out_of_time()

    while not done():
        shard = split_epoch(len(labels), args.peers, args.rank, epoch, args.seed)
        for first in range(0, len(shard) - args.batch_size + 1, args.batch_size):
            batch = shard[first:first + args.batch_size]
            step(images[batch], labels[batch])
            samples, steps = samples + len(batch), steps + 1
            # an evaluation exactly at DDP's sample count too (acc_at_ddp_samples)
            if time.monotonic() - last_report >= args.eval_every or steps == args.ddp_steps:
                report()
                last_report = time.monotonic()
            if done():
                break
        epoch += 1
    report()
    log("done", steps=steps, updates=updates())
    close()
    return 0


# --- the benchmark: systems on one emulated network ------------------------------------------------

def _read_log(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _wait_for(logs: list[str], event: str, procs: list[subprocess.Popen], timeout: float) -> list[dict]:
    """Each log's first ``event``, waiting up to ``timeout`` s; raises if a process exits first."""
    deadline = time.monotonic() + timeout
    while True:
        found = [next((r for r in _read_log(p) if r["e"] == event), None) for p in logs]
        if all(found):
            return [r for r in found if r]
        dead = [i for i, p in enumerate(procs) if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"host {dead[0]} exited ({procs[dead[0]].returncode})" if dead else f"{timeout:.0f} s passed"
            raise RuntimeError(f"no '{event}' from every host: {why}")
        time.sleep(0.1)


class _Run:
    """One system's processes on the network, with the wire's counters
    sampled every 0.25 s from the common start."""

    def __init__(self, net: Any, args: argparse.Namespace, system: str, folder: str) -> None:
        self.net, self.args, self.system = net, args, system
        self.folder = os.path.join(folder, system)
        os.makedirs(self.folder, exist_ok=True)
        self.logs = [os.path.join(self.folder, f"host{i}.jsonl") for i in range(args.peers)]
        self.outputs = [os.path.join(self.folder, f"host{i}.out") for i in range(args.peers)]
        self.procs: list[subprocess.Popen] = []
        self.samples: list[tuple[float, list[int]]] = []
        self.start = 0.0
        self.launched = time.monotonic()

    def launch(self, i: int, argv: list[str]) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        with open(self.outputs[i], "w") as out:
            self.procs.append(self.net.popen(i, argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True))

    def sample(self) -> None:
        self.samples.append((time.monotonic(), self.net.stats()["sent"]))

    def go(self, ready_timeout: float) -> None:
        _wait_for(self.logs, "ready", self.procs, ready_timeout)
        self.sample()
        self.start = time.monotonic()
        open(os.path.join(self.folder, "start"), "w").close()

    def wait(self, deadline_s: float, on_tick: Callable[[], None] | None = None) -> bool:
        """Samples the counters until every process exits or ``deadline_s`` after the start; returns
        whether all exited on their own (the rest are killed)."""
        while any(p.poll() is None for p in self.procs) and time.monotonic() - self.start < deadline_s:
            self.sample()
            if on_tick:
                on_tick()
            time.sleep(0.25)
        self.sample()
        finished = all(p.poll() is not None for p in self.procs)
        for i in range(len(self.procs)):
            self.net.kill_host(i)
        for p in self.procs:
            p.wait()
        return finished

    def bytes_at(self, t: float) -> list[int]:
        """Bytes each host had sent since the start, at the first counter sample at or after ``t``."""
        base = self.samples[0][1]
        sent = next((s for ts, s in self.samples if ts >= t), self.samples[-1][1])
        return [a - b for a, b in zip(sent, base)]

    def progress(self, host: int) -> list[dict]:
        return [r for r in _read_log(self.logs[host]) if r["e"] == "progress"]

    def tail(self, host: int, lines: int = 3) -> str:
        with open(self.outputs[host], errors="replace") as f:
            return " | ".join(line.strip() for line in f.read().splitlines()[-lines:])


def _worker_argv(python: str, args: argparse.Namespace, system: str, run: _Run, i: int, max_steps: int,
                 extra: list[str]) -> list[str]:
    return [python, "-m", "disttrain.bench.decentralised", "--worker", system, "--rank", str(i),
            "--peers", str(args.peers), "--address", run.net.hosts[i].address, "--batch-size", str(args.batch_size),
            "--hidden", str(args.hidden), "--lr", str(args.lr), "--momentum", str(args.momentum),
            "--seed", str(args.seed), "--eval-every", str(args.eval_every), "--budget", str(args.budget),
            "--matchmaking-time", str(args.matchmaking_time), "--max-steps", str(max_steps),
            "--ddp-steps", str(args.ddp_steps),
            "--local-steps", str(args.local_steps), "--compression", args.compression,
            "--log", run.logs[i], "--start-file", os.path.join(run.folder, "start"), *extra]


def _start_ddp(run: _Run, args: argparse.Namespace, max_steps: int) -> None:
    for i in range(args.peers):
        run.launch(i, _worker_argv(sys.executable, args, "ddp", run, i, max_steps,
                                   ["--master", run.net.hosts[0].address]))


def _start_hivemind(run: _Run, args: argparse.Namespace, max_steps: int) -> None:
    # A hivemind run is as many global updates (epochs: target batches) as DDP's with as many samples in all,
    # as its users count a run; host steps would stop a host that started alone (it counts only its own
    # samples until its progress tracker sees the others: seconds) before the swarm has formed.
    factor = args.hivemind_local_factor if run.system == "hivemind_local" else 1
    extra = ["--target-batch-size", str(factor * args.peers * args.batch_size), "--stop-on-updates"]
    extra += ["--local-updates"] if run.system == "hivemind_local" else []
    max_steps = math.ceil(max_steps / factor)
    # Host 0 first: the others join through its multiaddr (/ip4/10.77.0.1/tcp/PORT/p2p/ID).
    run.launch(0, _worker_argv(args.bench_python, args, "hivemind", run, 0, max_steps, extra))
    maddrs = _wait_for(run.logs[:1], "maddrs", run.procs, 120)[0]["maddrs"]
    initial = [m for m in maddrs if f"/ip4/{run.net.hosts[0].address}/" in m]
    for i in range(1, args.peers):
        run.launch(i, _worker_argv(args.bench_python, args, "hivemind", run, i, max_steps,
                                   [*extra, "--initial-peers", ",".join(initial)]))


def _decentralised_available() -> bool:
    return importlib.util.find_spec("disttrain.strategies.decentralised") is not None


def _start_decentralised(run: _Run, args: argparse.Namespace, max_steps: int) -> None:
    # Host 0 first (no initial peers: it is the first); the others meet it at host0:PEER_PORT.
    run.launch(0, _worker_argv(sys.executable, args, "decentralised", run, 0, max_steps, []))
    _wait_for(run.logs[:1], "maddrs", run.procs, 120)
    for i in range(1, args.peers):
        run.launch(i, _worker_argv(sys.executable, args, "decentralised", run, i, max_steps,
                                   ["--initial-peers", f"{run.net.hosts[0].address}:{PEER_PORT}"]))


def _start_local(run: _Run, args: argparse.Namespace, max_steps: int) -> None:
    for i in range(args.peers):
        run.launch(i, _worker_argv(sys.executable, args, "local", run, i, max_steps, []))


STARTERS = {"local": _start_local, "ddp": _start_ddp, "hivemind": _start_hivemind, "hivemind_local": _start_hivemind,
            "decentralised": _start_decentralised}


def _run_system(net: Any, args: argparse.Namespace, system: str, folder: str, max_steps: int,
                kill: tuple[int, int] | None = None) -> dict[str, Any]:
    """Runs ``system`` on ``net`` until its hosts finish or the budget passes. With ``kill``
    (host, count), that host is SIGKILLed once it has taken that many steps (hivemind: global updates).
    Returns the run and what was seen."""
    run = _Run(net, args, system, folder)
    load_before = os.getloadavg()[0]
    STARTERS[system](run, args, max_steps)
    run.go(ready_timeout=180)
    startup_s = run.start - run.launched
    killed: dict[str, Any] = {}

    def maybe_kill() -> None:
        if kill and not killed:
            # hivemind's run is counted in global updates, the others' in steps (see _start_hivemind).
            key = "updates" if system.startswith("hivemind") else "steps"
            seen = run.progress(kill[0])
            if seen and seen[-1][key] >= kill[1]:
                net.kill_host(kill[0])
                killed.update(t=time.monotonic() - run.start, at=seen[-1][key])
                print(f"#   killed host {kill[0]} (SIGKILL) at {killed['t']:.1f} s, at its {key} {killed['at']}",
                      flush=True)

    finished = run.wait(args.budget + 20, maybe_kill)
    return {"run": run, "finished": finished, "startup_s": startup_s, "killed": killed,
            "load": (load_before, os.getloadavg()[0])}


def _curve(result: dict[str, Any]) -> list[dict]:
    run = result["run"]
    rows = []
    for r in run.progress(0):
        sent = run.bytes_at(r["t"])
        rows.append({"system": run.system, "time_s": round(r["t"] - run.start, 3), "updates": r["updates"],
                     "samples_host0": r["samples"], "test_acc": r["acc"],
                     "bytes_per_host": round(sum(sent) / len(sent))})
    return rows


def _summary(system: str, result: dict[str, Any] | None, curve: list[dict], target: float,
             ddp_samples: int, args: argparse.Namespace, why_not: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {"system": system, "peers": args.peers, "delay_ms": args.delay_ms,
                           "rate_mbit": args.rate_mbit, "target_acc": round(target, 4)}
    if result is None:
        return {**row, "status": why_not}
    run = result["run"]
    reached = next((c for c in curve if c["test_acc"] is not None and c["test_acc"] >= target - 1e-9), None)
    total = run.bytes_at(math.inf)
    at_ddp = [c for c in curve if c["samples_host0"] <= ddp_samples]
    row.update(final_acc=curve[-1]["test_acc"] if curve else "",
               acc_at_ddp_samples=at_ddp[-1]["test_acc"] if at_ddp else "",
               updates=curve[-1]["updates"] if curve else "",
               time_s=curve[-1]["time_s"] if curve else "",
               time_to_target_s=reached["time_s"] if reached else "",
               bytes_per_host_to_target=reached["bytes_per_host"] if reached else "",
               bytes_per_host_total=round(sum(total) / len(total)), bytes_max_host_total=max(total),
               startup_s=round(result["startup_s"], 2), load_before=result["load"][0], load_after=result["load"][1],
               status="finished" if result["finished"] else f"stopped at the budget ({args.budget:.0f} s)")
    return row


def _ratios(rows: list[dict]) -> None:
    """Adds, to each row, DDP's and hivemind's time and bytes to the target over its own
    (above 1: this system needs less)."""
    by = {r["system"]: r for r in rows}
    for row in rows:
        for ref in ("ddp", "hivemind"):
            for what, col in (("time_to_target_s", "time"), ("bytes_per_host_to_target", "bytes")):
                theirs, ours = by.get(ref, {}).get(what, ""), row.get(what, "")
                row[f"{col}_{ref}_over_this"] = round(theirs / ours, 3) if theirs != "" and ours not in ("", 0) else ""


FIELDS = ["system", "peers", "delay_ms", "rate_mbit", "target_acc", "final_acc", "acc_at_ddp_samples", "updates",
          "time_s",
          "time_to_target_s", "bytes_per_host_to_target", "bytes_per_host_total", "bytes_max_host_total",
          "time_ddp_over_this", "bytes_ddp_over_this", "time_hivemind_over_this", "bytes_hivemind_over_this",
          "startup_s", "load_before", "load_after", "status"]


def _churn(net: Any, args: argparse.Namespace, system: str, folder: str, max_steps: int) -> list[dict]:
    """``system`` with the last host killed (SIGKILL) a third into its run: do the
    others go on (their global updates, hivemind's epochs or the strategy's rounds, still advance)?"""
    victim = args.peers - 1
    result = _run_system(net, args, system, os.path.join(folder, "churn"), max_steps,
                         kill=(victim, max(2, max_steps // 3)))
    run, killed = result["run"], result["killed"]
    rows = []
    for host in range(args.peers):
        seen = run.progress(host)
        if host == victim or not seen:
            continue
        before = max((r["updates"] for r in seen if killed and r["t"] - run.start <= killed["t"]), default=0)
        done = next((r for r in _read_log(run.logs[host]) if r["e"] == "done"), None)
        last = seen[-1]
        rows.append({"system": system, "killed_host": victim, "kill_time_s": round(killed.get("t", math.nan), 2),
                     "host": host, "updates_at_kill": before, "updates_at_end": last["updates"],
                     "time_s": round(last["t"] - run.start, 2), "exited_on_its_own": done is not None,
                     "continued": bool(killed) and last["updates"] > before + 1,
                     "test_acc": last["acc"] if host == 0 else "", "last_output": run.tail(host, 1)})
    return rows


def _report(rows: list[dict]) -> None:
    print(f"{'system':<14} {'final acc':>9} {'to target s':>11} {'MB/host to tgt':>14} {'MB/host total':>13} "
          f"{'DDP/this t':>10} {'DDP/this B':>10} {'hm/this t':>9} {'hm/this B':>9}  status")
    for r in rows:
        mb = {k: r.get(k, "") for k in ("bytes_per_host_to_target", "bytes_per_host_total")}
        mb = {k: v / 1e6 if v != "" else "" for k, v in mb.items()}
        print(f"{r['system']:<14} {format_or_dash(r.get('final_acc', ''), '9.4f')} "
              f"{format_or_dash(r.get('time_to_target_s', ''), '11.1f')} "
              f"{format_or_dash(mb['bytes_per_host_to_target'], '14.2f')} "
              f"{format_or_dash(mb['bytes_per_host_total'], '13.2f')} "
              f"{format_or_dash(r.get('time_ddp_over_this', ''), '10.2f')} "
              f"{format_or_dash(r.get('bytes_ddp_over_this', ''), '10.1f')} "
              f"{format_or_dash(r.get('time_hivemind_over_this', ''), '9.2f')} "
              f"{format_or_dash(r.get('bytes_hivemind_over_this', ''), '9.1f')}  {r['status']}")


def _hivemind_missing(python: str) -> str:
    if not os.path.exists(python):
        return f"no benchmark venv at {python} (run scripts/bench_env.sh)"
    res = subprocess.run([python, "-c", "import hivemind"], capture_output=True, text=True)
    return "" if res.returncode == 0 else f"hivemind does not import in {python}: {res.stderr.strip()[-200:]}"


def _bench(args: argparse.Namespace) -> int:
    from disttrain import data, netem

    systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or "ddp" not in systems:
        print(f"disttrain bench decentralised: --systems {args.systems}: choose from {', '.join(SYSTEMS)}; "
              "ddp is required (its final accuracy is the target)", file=sys.stderr)
        return 2
    try:  # also when run as `python -m disttrain.bench.decentralised`, without the command line's check
        check_args(args, [])
    except ValueError as e:
        print(f"disttrain bench decentralised: error: {e}", file=sys.stderr)
        return 2
    train_size = len(data.digits(True, seed=args.seed))
    max_steps = args.epochs * ((train_size // args.peers) // args.batch_size)
    args.ddp_steps = max_steps
    skipped = {}
    if {"hivemind", "hivemind_local"} & set(systems):
        skipped["hivemind"] = skipped["hivemind_local"] = _hivemind_missing(args.bench_python)
    if "decentralised" in systems and not _decentralised_available():
        skipped["decentralised"] = "not run: disttrain.strategies.decentralised is not installed"
    print(f"# {args.peers} hosts, {args.delay_ms:g} ms one way, {args.rate_mbit:g} Mbit/s per link; MLP "
          f"(hidden {args.hidden}) on digits, {args.batch_size}/host/step, {max_steps} steps per host "
          f"({args.epochs} passes; the others up to {args.steps_factor:g}x); load {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    curves: dict[str, list[dict]] = {}
    churn_rows: list[dict] = []
    folder = args.keep_logs or tempfile.mkdtemp(prefix="dt-bench-decentralised-")
    try:
        with netem.Network(n=args.peers, delay_ms=args.delay_ms, rate_mbit=args.rate_mbit) as net:
            for system in systems:
                if skipped.get(system):
                    print(f"# {system}: {skipped[system]}", flush=True)
                    continue
                print(f"# {system} ...", flush=True)
                steps = max_steps if system == "ddp" else math.ceil(max_steps * args.steps_factor)
                results[system] = _run_system(net, args, system, folder, steps)
                curves[system] = _curve(results[system])
                if not curves[system]:
                    tails = "; ".join(f"host {i}: {results[system]['run'].tail(i)}" for i in range(args.peers))
                    raise RuntimeError(f"{system} reported no progress ({tails})")
            for system in ("hivemind", "decentralised") if args.churn else ():
                if system in results:  # each system that ran above
                    print(f"# churn: {system}, one host killed mid-training ...", flush=True)
                    churn_rows += _churn(net, args, system, folder, max_steps)
    finally:
        if not args.keep_logs:
            shutil.rmtree(folder, ignore_errors=True)
    target = curves["ddp"][-1]["test_acc"]
    ddp_samples = max_steps * args.batch_size  # per host
    rows = [_summary(s, results.get(s), curves.get(s, []), target, ddp_samples, args, skipped.get(s, ""))
            for s in systems]
    _ratios(rows)
    _report(rows)
    stem = os.path.splitext(args.out)[0]
    write_csv(rows, args.out, FIELDS)
    write_csv([c for s in systems for c in curves.get(s, [])], f"{stem}_curves.csv")
    if churn_rows:
        for r in churn_rows:
            print(f"# churn: {r['system']} host {r['host']}: updates {r['updates_at_kill']} at the kill -> {r['updates_at_end']} "
                  f"at {r['time_s']} s; continued: {r['continued']}; exited on its own: {r['exited_on_its_own']}")
        write_csv(churn_rows, f"{stem}_churn.csv")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = arguments("decentralised", argv)
    args = build_parser().parse_args(argv)
    if args.worker:
        return _worker(args)
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
