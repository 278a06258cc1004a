"""``disttrain bench scaling``: the scaling study, disttrain against PyTorch in one run.

The same training (``disttrain train``: the trainer, its run folders, snapshots
and metrics.csv) at 1, 2 and 4 ranks on this host and at 2 x 2 ranks on two
network-namespace "nodes", each configuration twice, interleaved:

    disttrain  disttrain's DistributedDataParallel on the disttrain backend
    pytorch    PyTorch's DistributedDataParallel on gloo

Everything else is the same (model, data, sampler, seed, per-rank batch, the
learning rate scaled with the world size, the time budget or epoch count).
Also, at one rank, the serial baseline (``--serial``, on by default): plain
non-distributed training, the model unwrapped (``--strategy none``).
Every rank runs one thread (OMP_NUM_THREADS=1). Reported per configuration:
learning rate, global batch, steps per epoch, the epoch time T(N) (training
only: per round the mean of the round's epochs but its first, a fresh process's
warm-up; T(N) the median over the rounds), epochs reached, two efficiencies:

    scaling_efficiency    E(N) = T(1) / (N x T(N)), T(1) the same implementation's
                          1-rank run (relative: how the implementation scales)
    efficiency_vs_serial  T_serial / (N x T(N)), T_serial the serial baseline's
                          (absolute: against the best sequential time, the same for both)

disttrain's epoch time over PyTorch's, the best validation loss, the last
epoch's test loss and top-1 accuracy, backend and strategy.

Each row is a run folder ``RUNS/IMPL_CONFIG`` (``-s``/``--save-name`` of
``disttrain train``). The configurations run in ``--rounds`` rounds (3 with a
time budget): round r trains each to r/R of its budget, resuming from its
snapshot, the order reversed every other round, so every configuration samples
the machine's load over the whole study, not one stretch of it. Each records
its progress in ``RUN/study.json``. Run again, the command skips what finished
and resumes an interrupted configuration from its newest snapshot (the time
budget counts the run time before the interruption). ``--fresh`` starts over.

On a cluster every node runs the same command (``srun`` starts one per node;
Slurm's variables, or ``--nnodes --node-rank --master-addr``): node 0 runs the
one-host rows, each ``NODESxRANKS`` row (``--two-hosts``) runs one torchrun per
node of the row, the nodes kept in step through a TCPStore on node 0, and node
0 writes the same table (``scripts/slurm_scaling.sbatch``).

Also a memory-offload study (``--offload``, on by default): time per step and
peak memory of a model kept resident against one moved to another memory and
back every step (pageable against page-locked "pinned" memory; a CUDA device
when there is one), and disttrain FSDP with its parameters resident (stage 1)
against sharded and gathered for every use (stage 3).

Writes ``OUT`` (the table), ``OUT_curves.csv`` (losses per epoch),
``OUT_offload.csv`` and the plots ``OUT_losses``, ``OUT_efficiency`` and
``OUT_offload`` as PNG and SVG, beside the CSV.

    disttrain bench scaling --time-budget 60 --slow-link 1,100   # the published study
    disttrain bench scaling --ranks 1,2 --two-hosts "" --epochs 2 --out /tmp/s.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from disttrain.bench import arguments, format_or_dash, write_csv

#: implementation -> (backend, trainer strategy)
IMPLS = {"disttrain": ("disttrain", "ddp"), "pytorch": ("gloo", "torch_ddp")}
#: the serial baseline: plain non-distributed training (the model unwrapped), one rank
SERIAL = "serial"
_IMPL_RUN = {**IMPLS, SERIAL: ("disttrain", "none")}

COLUMNS = ["impl", "config", "nodes", "ranks_per_node", "ranks", "backend", "strategy", "lr", "global_batch",
           "steps_per_epoch", "epoch_s", "epoch_s_rounds", "epochs", "budget_s", "run_time_s",
           "scaling_efficiency", "efficiency_vs_serial", "epoch_time_vs_pytorch", "best_val_loss", "test_loss",
           "test_acc", "status", "run_dir"]
CURVE_COLUMNS = ["impl", "config", "ranks", "epoch", "wall_s", "train_loss", "val_loss", "val_acc"]
OFFLOAD_COLUMNS = ["row", "memory", "where", "ranks", "params_mb", "step_ms", "step_ms_vs_resident",
                   "peak_rss_mb", "peak_device_mb", "note"]
_MASTER_PORT = 29581  # inside the namespaces: their own port space


@dataclass(frozen=True)
class Config:
    impl: str
    nodes: int
    per_node: int
    slow: bool = False  # the nodes joined by the emulated slow link (--slow-link)

    @property
    def label(self) -> str:
        return str(self.per_node) if self.nodes == 1 else f"{self.nodes}x{self.per_node}{'slow' if self.slow else ''}"

    @property
    def ranks(self) -> int:
        return self.nodes * self.per_node

    @property
    def name(self) -> str:
        return f"{self.impl}_{self.label}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disttrain bench scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="1,2,4", help="rank counts on this host (default 1,2,4; 1 is the baseline)")
    p.add_argument("--two-hosts", default="2x2", help="NODESxRANKS on two network-namespace nodes, comma separated "
                   "(default 2x2; needs root and iproute2; \"\" for none); on a cluster (--nnodes) 2 to NNODES "
                   "of its nodes")
    p.add_argument("--slow-link", default="", metavar="DELAY_MS,RATE_MBIT",
                   help="also each --two-hosts layout with its nodes joined by an emulated link of this one-way "
                        "delay and rate (disttrain.netem; e.g. 1,100); default none")
    p.add_argument("--impls", default="disttrain,pytorch", help="disttrain, pytorch or both (default)")
    p.add_argument("--serial", action=argparse.BooleanOptionalAction, default=True,
                   help="also the serial baseline: plain non-distributed training on one rank (the model unwrapped), "
                        "for the efficiency against one shared baseline (default on)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="training time per configuration (default 120 s without --epochs)")
    p.add_argument("-e", "--epochs", type=int, default=None, help="epochs per configuration")
    p.add_argument("-m", "--model", default="small_cnn", help="as disttrain train (default small_cnn)")
    p.add_argument("--dataset", default="digits", help="as disttrain train (default digits, embedded)")
    p.add_argument("-d", "--data", default=None, help="data folder for cifar10 and imagefolder")
    p.add_argument("-b", "--batch-size", type=int, default=32, help="per rank (default 32)")
    p.add_argument("-lr", "--learning-rate", type=float, default=0.05, help="1-rank learning rate (default 0.05)")
    p.add_argument("--lr-scaling", choices=("linear", "sqrt", "none"), default="linear")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=None,
                   help="run the configurations in R rounds, each to r/R of the budget (resuming from its snapshot), "
                        "so every one samples the machine's load over the whole study (default 3 with a time budget, "
                        "1 with --epochs)")
    p.add_argument("--runs", default="runs/scaling", help="parent of the run folders (default runs/scaling)")
    p.add_argument("--fresh", action="store_true", help="delete the study's run folders and start over")
    p.add_argument("--out", default="benchmarks/results/scaling.csv")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True,
                   help="also the memory-offload study (default on)")
    p.add_argument("--offload-mb", type=float, default=64.0, help="offload study: parameter megabytes (default 64)")
    p.add_argument("--offload-steps", type=int, default=20, help="offload study: timed steps per row (default 20)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per configuration before it is stopped "
                   "(default: 4 x the budget + 120)")
    c = p.add_argument_group("on a cluster (every node runs the same command; default: from Slurm's environment "
                             "under srun, else this host alone)")
    c.add_argument("--nnodes", type=int, default=None, help="nodes of the study (SLURM_NNODES under srun)")
    c.add_argument("--node-rank", type=int, default=None, help="this node's index, 0 to NNODES-1 (SLURM_NODEID); "
                   "node 0 runs the one-host rows and writes the table")
    c.add_argument("--master-addr", default=None, help="node 0's address (MASTER_ADDR, else the first host of "
                   "SLURM_JOB_NODELIST)")
    c.add_argument("--master-port", type=int, default=None, help="node 0's port for the study's coordination; "
                   "the rows' rendezvous uses the next one (MASTER_PORT, default 29580)")
    p.add_argument("--offload-job", help=argparse.SUPPRESS)
    p.add_argument("--rows-file", help=argparse.SUPPRESS)
    return p


def _two_host_layouts(spec: str) -> list[tuple[int, int]]:
    """``--two-hosts`` as (nodes, ranks per node) pairs; ValueError naming the bad entry."""
    layouts = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(x.strip().isdigit() and int(x) >= 1 for x in parts):
            raise ValueError(f"--two-hosts {spec!r}: expected NODESxRANKS with whole numbers >= 1, comma separated "
                             "(e.g. 2x2,2x4), or \"\" for none")
        layouts.append((int(parts[0]), int(parts[1])))
    return layouts


def _slow_link(spec: str) -> tuple[float, float]:
    """``--slow-link DELAY_MS,RATE_MBIT``; ValueError unless a delay >= 0 and a rate > 0."""
    try:
        delay_ms, rate_mbit = (float(x) for x in spec.split(","))
    except ValueError:
        delay_ms = rate_mbit = math.nan
    if not (math.isfinite(delay_ms) and math.isfinite(rate_mbit) and delay_ms >= 0 and rate_mbit > 0):
        raise ValueError(f"--slow-link {spec!r}: expected DELAY_MS,RATE_MBIT with a delay >= 0 and a rate > 0 "
                         "(e.g. 1,100)")
    return delay_ms, rate_mbit


def check_args(args: argparse.Namespace, backends: list[str]) -> None:
    """What ``disttrain bench scaling`` checks before a configuration starts (ValueError, one line):
    the layouts, the emulated link, and every option it hands to ``disttrain train`` (model, data
    set and folder, ...), which would otherwise fail each row in turn, minutes into the study."""
    from disttrain.cli import check_ranks
    from disttrain.train_cli import ConfigError, _checked_runs

    for nodes, per_node in _two_host_layouts(args.two_hosts):
        if args.nnodes in (None, 1) and nodes != 2:
            raise ValueError(f"--two-hosts {args.two_hosts}: two nodes only (NODES must be 2) on network namespaces; "
                             "more with --nnodes on a cluster")
        if args.nnodes in (None, 1):  # both namespace nodes run on this host
            check_ranks(f"--two-hosts {nodes}x{per_node} =", nodes * per_node)
    if args.slow_link:
        _slow_link(args.slow_link)
    if args.master_port is not None and not 1 <= args.master_port <= 65534:
        raise ValueError(f"--master-port {args.master_port}: expected 1 to 65534 (the rows use the next port too)")
    if args.node_rank is not None and args.nnodes is not None and not 0 <= args.node_rank < args.nnodes:
        raise ValueError(f"--node-rank {args.node_rank}: expected 0 to {args.nnodes - 1}")
    existing = os.path.abspath(args.runs)  # RUNS, or the folder it would be made in
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:  # a file written there is the only sure test (root passes access())
        if not os.path.isdir(existing):
            raise NotADirectoryError(20, "not a folder")
        probe_fd, probe = tempfile.mkstemp(prefix=".disttrain-write-test-", dir=existing)
        os.close(probe_fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--runs '{args.runs}': cannot write in '{existing}' ({e.strerror}); "
                         "expected a writable folder") from None
    with tempfile.TemporaryDirectory() as scratch:  # train's own check, its run folder made in scratch, not in RUNS
        argv = _train_argv(args, Config(SERIAL, 1, 1, False))[3:]
        argv[argv.index("-s") + 1] = scratch
        try:  # as the serial row's one rank sees it under its torchrun, whatever launched this process
            _checked_runs(argv, environ={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
        except ConfigError as e:
            raise ValueError(str(e)) from None


def configs(args: argparse.Namespace) -> list[Config]:
    """Every configuration, in run order: for each rank layout, both
    implementations one after the other (alternating which goes first)."""
    layouts = [(1, int(r), False) for r in args.ranks.split(",") if r.strip()]
    nnodes = getattr(args, "nnodes", None) or 1
    try:
        two_hosts = _two_host_layouts(args.two_hosts)
    except ValueError as e:
        raise SystemExit(f"disttrain bench scaling: {e}") from None
    for nodes, per_node in two_hosts:
        spec = f"{nodes}x{per_node}"
        if nnodes > 1 and not 2 <= nodes <= nnodes:
            raise SystemExit(f"disttrain bench scaling: --two-hosts {spec}: 2 to {nnodes} nodes on this cluster")
        if nnodes == 1 and nodes != 2:
            raise SystemExit(f"disttrain bench scaling: --two-hosts {spec}: two nodes only (NODES must be 2) on "
                             f"network namespaces; more with --nnodes on a cluster")
        layouts.append((nodes, per_node, False))
        if args.slow_link:
            layouts.append((nodes, per_node, True))
    if (1, 1, False) not in layouts:
        layouts.insert(0, (1, 1, False))  # the baseline of the scaling efficiency
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown or not impls:
        raise SystemExit(f"disttrain bench scaling: --impls {args.impls}: choose from {', '.join(IMPLS)}")
    out = []
    for k, (nodes, per_node, slow) in enumerate(layouts):
        order = impls if k % 2 == 0 else impls[::-1]
        if (nodes, per_node, slow) == (1, 1, False) and getattr(args, "serial", False):
            order = [SERIAL, *order]
        for impl in order:
            out.append(Config(impl, nodes, per_node, slow))
    return out


# --- on a cluster ---------------------------------------------------------------------------------

def cluster_settings(args: argparse.Namespace, environ: dict[str, str] | None = None) -> None:
    """Fills ``args.nnodes``, ``node_rank``, ``master_addr``, ``master_port``: the
    flags, else Slurm's variables (``srun``: SLURM_NNODES, SLURM_NODEID; node 0's
    address from MASTER_ADDR or the first host of SLURM_JOB_NODELIST), else one node."""
    env = os.environ if environ is None else environ
    slurm = env.get("SLURM_NNODES", "") != "" and env.get("SLURM_NODEID", "") != ""
    if args.nnodes is None:
        args.nnodes = int(env["SLURM_NNODES"]) if slurm else 1
    if args.nnodes < 1:
        raise SystemExit(f"disttrain bench scaling: --nnodes {args.nnodes}: expected at least 1")
    if args.nnodes == 1:
        args.node_rank = 0
        return
    if args.node_rank is None:
        if not slurm:
            raise SystemExit("disttrain bench scaling: --nnodes given without --node-rank (or SLURM_NODEID)")
        args.node_rank = int(env["SLURM_NODEID"])
    if not 0 <= args.node_rank < args.nnodes:
        raise SystemExit(f"disttrain bench scaling: --node-rank {args.node_rank}: expected 0 to {args.nnodes - 1}")
    if args.master_addr is None:
        args.master_addr = env.get("MASTER_ADDR") or None
    if args.master_addr is None and env.get("SLURM_JOB_NODELIST"):
        hosts = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True,
                               text=True).stdout.split()
        args.master_addr = hosts[0] if hosts else None
    if args.master_addr is None:
        raise SystemExit("disttrain bench scaling: a cluster study needs node 0's address: --master-addr or "
                         "MASTER_ADDR")
    if args.master_port is None:
        args.master_port = int(env.get("MASTER_PORT") or 29580)
    if args.slow_link:
        raise SystemExit("disttrain bench scaling: --slow-link emulates a link between namespace nodes on one host; "
                         "on a cluster the nodes' own network is the link")


class _Cluster:
    """The nodes of a cluster study kept in step through a TCPStore on node 0
    (``--master-addr``:``--master-port``). Every node walks the same
    configurations in the same order; node 0 decides for each multi-node row
    whether it runs this round (``go/ROUND/NAME``: run or skip) and runs the
    one-host rows alone; each other node in the row starts its part of the
    row's torchrun (``--nnodes``, ``--node-rank``, node 0's address and the next
    port) and reports how it ended (``rc/ROUND/NAME/NODE``)."""

    def __init__(self, args: argparse.Namespace, wait_s: float):
        from datetime import timedelta

        from torch.distributed import TCPStore
        self.node, self.nnodes, self.wait = args.node_rank, args.nnodes, timedelta(seconds=wait_s)
        self.store = TCPStore(args.master_addr, args.master_port, is_master=self.node == 0, timeout=self.wait,
                              wait_for_workers=False)

    def set(self, key: str, value: str) -> None:
        self.store.set(key, value)

    def get(self, key: str) -> str:
        self.store.wait([key], self.wait)
        return self.store.get(key).decode()

    def finish(self) -> None:
        """The other nodes say goodbye; node 0 keeps the store up until all have."""
        if self.node == 0:
            for n in range(1, self.nnodes):
                self.get(f"bye/{n}")
        else:
            self.set(f"bye/{self.node}", "1")


# --- running one configuration ------------------------------------------------------------------

def _study_key(args: argparse.Namespace) -> dict[str, Any]:
    """What makes two runs of the study the same study (a resumed one must match)."""
    return {k: getattr(args, k) for k in ("time_budget", "epochs", "model", "dataset", "data", "batch_size",
                                          "learning_rate", "lr_scaling", "seed", "slow_link")}


class _SlowHosts:
    """Two hosts of disttrain.netem (TUN devices and a user-space wire with a
    delay and a rate) behind NamespaceHosts' interface."""

    def __init__(self, spec: str):
        from disttrain import netem
        try:
            delay_ms, rate_mbit = _slow_link(spec)
        except ValueError as e:
            raise SystemExit(f"disttrain bench scaling: {e}") from None
        self.network = netem.Network(2, delay_ms=delay_ms, rate_mbit=rate_mbit)
        self.network.__enter__()
        self.addresses = tuple(h.address for h in self.network.hosts)

    def command(self, node: int, argv: list[str]) -> list[str]:
        return self.network.command(node, argv)

    def env(self, node: int) -> dict[str, str]:
        from disttrain import netem
        return {"GLOO_SOCKET_IFNAME": netem.DEVICE}

    def kill(self, node: int) -> None:
        self.network.kill_host(node)

    def remove(self) -> None:
        self.network.close()


def _train_argv(args: argparse.Namespace, cfg: Config, fraction: float = 1.0) -> list[str]:
    backend, strategy = _IMPL_RUN[cfg.impl]
    argv = ["-m", "disttrain.cli", "train", "-m", args.model, "--dataset", args.dataset, "-b", str(args.batch_size),
            "-lr", repr(args.learning_rate), "--lr-scaling", args.lr_scaling, "--seed", str(args.seed),
            "--backend", backend, "--strategy", strategy, "-s", os.path.abspath(args.runs), "--save-name", cfg.name,
            "--no-progress", "--timeout", "120"]
    if args.data:
        argv += ["-d", os.path.abspath(args.data)]
    if args.time_budget is not None:
        argv += ["--time-budget", repr(args.time_budget * fraction / 3600)]
    if args.epochs is not None:
        argv += ["-e", str(math.ceil(args.epochs * fraction))]
    return argv


def _torchrun(nodes: int, node: int, per_node: int, master: str | None, port: int = _MASTER_PORT) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={per_node}", "--max-restarts=0"]
    if nodes == 1:
        return cmd + ["--standalone"]
    return cmd + [f"--nnodes={nodes}", f"--node-rank={node}", f"--master-addr={master}", f"--master-port={port}"]


def _row_commands(args: argparse.Namespace, cfg: Config, hosts: Any, env: dict[str, str],
                  fraction: float = 1.0) -> list[tuple[list[str], dict[str, str]]]:
    """The commands (and environments) this process starts for a row: one torchrun on
    this host; one per namespace node; on a cluster, this node's part of the row."""
    train = _train_argv(args, cfg, fraction)
    if cfg.nodes == 1:
        return [(_torchrun(1, 0, cfg.per_node, None) + train, env)]
    if (getattr(args, "nnodes", None) or 1) > 1:
        return [(_torchrun(cfg.nodes, args.node_rank, cfg.per_node, args.master_addr, args.master_port + 1) + train,
                 env)]
    return [(hosts.command(n, _torchrun(2, n, cfg.per_node, hosts.addresses[0]) + train), {**env, **hosts.env(n)})
            for n in range(cfg.nodes)]


def _run_config(args: argparse.Namespace, cfg: Config, hosts: Any, log_path: str,
                fraction: float = 1.0) -> str | None:
    """Runs (or resumes) one configuration to ``fraction`` of its budget; None when it got there, else why not.
    On a cluster (``args.nnodes`` > 1) this node's part of it only."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID"):
        env.pop(var, None)
    budget = args.time_budget if args.time_budget is not None else 60.0 * (args.epochs or 1)
    timeout = args.timeout if args.timeout is not None else 4 * budget + 120
    cmds = _row_commands(args, cfg, hosts, env, fraction)
    with open(log_path, "a") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmds[0][0])}\n")
        log.flush()
        procs = [subprocess.Popen(cmd, env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                 for cmd, e in cmds]
        deadline = time.monotonic() + timeout
        failed = None
        for p in procs:
            try:
                rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                failed = f"stopped after {timeout:.0f} s"
                break
            if rc != 0 and failed is None:
                failed = f"exit status {rc}"
        if failed:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, 9)
                    p.wait()
            if hosts is not None:
                for n in range(cfg.nodes):
                    hosts.kill(n)
            return f"{failed} (log: {log_path})"
    return None


# --- the table ----------------------------------------------------------------------------------

def read_metrics(run_dir: str) -> list[dict[str, float]]:
    """A run folder's metrics.csv as rows of floats (epoch, epoch/test times, losses, accuracies)."""
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [{"epoch": float(r[""]), "epoch_time": float(r["epoch_timings"]), "test_time": float(r["test_timings"]),
                 "train_loss": float(r["train_loss"]), "val_loss": float(r["test_error"]),
                 "val_acc": float(r["test_acc"])} for r in csv.DictReader(f)]


def mean_epoch_time(epoch_times: list[float]) -> float:
    """The mean epoch time; the first epoch (warm-up) is left out when there are more."""
    times = epoch_times[1:] if len(epoch_times) > 1 else epoch_times
    return sum(times) / len(times) if times else math.nan


def round_epoch_times(epoch_times: list[float], bounds: list[int]) -> list[float]:
    """The mean epoch time of each round: ``bounds`` are the epochs done at the end of
    each round (cumulative); a round's first epoch (a fresh process's warm-up) is left
    out when the round has more."""
    means, start = [], 0
    for end in bounds:
        times = epoch_times[start:end]
        start = max(start, end)
        times = times[1:] if len(times) > 1 else times
        if times:
            means.append(sum(times) / len(times))
    return means


def study_epoch_time(epoch_times: list[float], bounds: list[int]) -> tuple[float, list[float]]:
    """T(N) of a row: the median over its rounds of the round's mean epoch time (a round
    run under a burst of load moves the median little), and the rounds' means; without
    a record of the rounds, the mean of all epochs but the first."""
    means = round_epoch_times(epoch_times, bounds)
    if not means:
        return mean_epoch_time(epoch_times), []
    means_sorted, k = sorted(means), len(means)
    median = means_sorted[k // 2] if k % 2 else (means_sorted[k // 2 - 1] + means_sorted[k // 2]) / 2
    return median, means


def scaling_efficiency(t1: float, ranks: int, tn: float) -> float:
    """E(N) = T(1) / (N x T(N)): 1 when N ranks take 1/N of one rank's epoch time."""
    return t1 / (ranks * tn) if tn > 0 and t1 > 0 else math.nan


def _train_size(args: argparse.Namespace) -> int:
    from disttrain import data
    return len(data.get_dataset(args.dataset, args.data, True)[0])


def summarize(args: argparse.Namespace, cfgs: list[Config], failures: dict[str, str]) -> tuple[list[dict],
                                                                                                  list[dict]]:
    """The table's rows and the loss curves, from the run folders."""
    n_train = _train_size(args)
    rows, curves, epoch_s = [], [], {}
    factor = {"linear": lambda n: n, "sqrt": math.sqrt, "none": lambda n: 1}[args.lr_scaling]
    for cfg in cfgs:
        run_dir = os.path.join(args.runs, cfg.name)
        metrics = read_metrics(run_dir)
        backend, strategy = _IMPL_RUN[cfg.impl]
        done = _rounds_done(run_dir)
        t, by_round = study_epoch_time([m["epoch_time"] for m in metrics], done.get("epochs_by_round", []))
        epoch_s[(cfg.impl, cfg.label)] = t
        status = failures.get(cfg.name) or ("ok" if done.get("finished") else "not run" if not done
                                            else f"unfinished (round {done['round']} of {done['rounds']})")
        rows.append({
            "impl": cfg.impl, "config": cfg.label, "nodes": cfg.nodes, "ranks_per_node": cfg.per_node,
            "ranks": cfg.ranks, "backend": backend, "strategy": strategy,
            "lr": args.learning_rate * factor(cfg.ranks), "global_batch": args.batch_size * cfg.ranks,
            "steps_per_epoch": math.ceil(math.ceil(n_train / cfg.ranks) / args.batch_size),
            "epoch_s": t, "epoch_s_rounds": " ".join(f"{x:.4f}" for x in by_round), "epochs": len(metrics),
            "budget_s": args.time_budget if args.time_budget else "",
            "run_time_s": sum(m["epoch_time"] + m["test_time"] for m in metrics),
            "best_val_loss": min((m["val_loss"] for m in metrics), default=math.nan),
            "test_loss": metrics[-1]["val_loss"] if metrics else math.nan,
            "test_acc": metrics[-1]["val_acc"] if metrics else math.nan,
            "status": status, "run_dir": run_dir})
        wall = 0.0
        for m in metrics:
            wall += m["epoch_time"] + m["test_time"]
            curves.append({"impl": cfg.impl, "config": cfg.label, "ranks": cfg.ranks, "epoch": int(m["epoch"]) + 1,
                           "wall_s": wall, "train_loss": m["train_loss"], "val_loss": m["val_loss"],
                           "val_acc": m["val_acc"]})
    serial = epoch_s.get((SERIAL, "1"), math.nan)
    for row in rows:
        row["scaling_efficiency"] = scaling_efficiency(epoch_s.get((row["impl"], "1"), math.nan), row["ranks"],
                                                       row["epoch_s"])
        row["efficiency_vs_serial"] = scaling_efficiency(serial, row["ranks"], row["epoch_s"])
        ref = epoch_s.get(("pytorch", row["config"]))
        row["epoch_time_vs_pytorch"] = row["epoch_s"] / ref if ref and row["impl"] == "disttrain" else ""
    return rows, curves


def _fmt(value: Any, spec: str) -> str:
    if isinstance(value, str) and value and spec:  # a CSV cell
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return format_or_dash(value, spec)


def _print_table(rows: list[dict], columns: list[tuple[str, str, str, int]]) -> None:
    """One line per row: ``(header, key, format, width)`` per column."""
    print(" ".join(f"{header:>{width}}" for header, _, _, width in columns))
    for r in rows:
        print(" ".join(f"{_fmt(r[key], spec):>{width}}" for _, key, spec, width in columns))


def report(rows: list[dict]) -> None:
    _print_table(rows, [("impl", "impl", "", 9), ("config", "config", "", 7), ("lr", "lr", ".3g", 5),
                        ("gbatch", "global_batch", "", 6), ("steps", "steps_per_epoch", "", 5),
                        ("epoch s", "epoch_s", ".3f", 7), ("epochs", "epochs", "", 6),
                        ("eff", "scaling_efficiency", ".3f", 5), ("eff/ser", "efficiency_vs_serial", ".3f", 7),
                        ("vs pt", "epoch_time_vs_pytorch", ".3f", 5),
                        ("best val", "best_val_loss", ".4f", 8), ("test", "test_loss", ".4f", 6),
                        ("acc", "test_acc", ".4f", 6), ("backend", "backend", "", 9), ("strategy", "strategy", "", 9),
                        ("status", "status", "", 6)])


# --- plots ------------------------------------------------------------------------------------------

def _save(fig: Any, base: str | None) -> None:
    if base:
        for ext in ("png", "svg"):
            fig.savefig(f"{base}.{ext}", bbox_inches="tight")
            print(f"# wrote {base}.{ext}")


def plot_losses(curves: list[dict], base: str | None = None) -> Any:
    """Train and validation loss against wall time and against epochs, one line per configuration."""
    from matplotlib.figure import Figure  # no pyplot: no global state, works headless and in notebooks

    fig = Figure(figsize=(12, 8))
    axes = fig.subplots(2, 2)
    lines: dict[tuple[str, str], list[dict]] = {}
    for c in curves:
        lines.setdefault((c["impl"], str(c["config"])), []).append(c)
    colors = {config: f"C{i}" for i, config in enumerate(dict.fromkeys(config for _, config in lines))}
    for (impl, config), points in lines.items():
        style = {"disttrain": "-", SERIAL: ":"}.get(impl, "--")
        label = f"{impl} {config}"
        for row, key in enumerate(("train_loss", "val_loss")):
            for col, x in enumerate(("wall_s", "epoch")):
                axes[row][col].plot([float(p[x]) for p in points], [float(p[key]) for p in points], style,
                                    color=colors[config], marker=".", label=label)
    for row, key in enumerate(("training loss", "validation loss")):
        for col, x in enumerate(("wall time, s (training + evaluation)", "epoch")):
            ax = axes[row][col]
            ax.set_xlabel(x)
            ax.set_ylabel(key)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=8, ncol=2)
    fig.suptitle("disttrain bench scaling: loss curves (solid: disttrain DDP, dashed: PyTorch DDP over gloo, "
                 "dotted: serial)")
    _save(fig, base)
    return fig


def _layout_kind(row: dict) -> str:
    """one (one host), two (two namespace nodes) or slow (two nodes over the emulated link)."""
    if int(row["nodes"]) == 1:
        return "one"
    return "slow" if str(row["config"]).endswith("slow") else "two"


def plot_scaling(rows: list[dict], base: str | None = None) -> Any:
    """Epoch time, scaling efficiency (each implementation against its own 1-rank run) and
    efficiency against the shared serial baseline, against ranks, with the ideal lines."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.5), layout="constrained")
    ax_t, ax_e, ax_s = fig.subplots(1, 3)
    ranks_seen: set[int] = set()
    has_serial = any(r["impl"] == SERIAL for r in rows)
    colors = {"disttrain": "C0", "pytorch": "C1", SERIAL: "C2"}

    def value(r: dict, key: str) -> float:
        try:
            return float(r.get(key, ""))
        except (TypeError, ValueError):
            return math.nan
    for impl in dict.fromkeys(r["impl"] for r in rows):
        for kind, suffix, marker in (("one", "", "o"), ("two", " (2 namespace nodes)", "s"),
                                     ("slow", " (2 nodes, emulated slow link)", "^")):
            pts = sorted((int(r["ranks"]), value(r, "epoch_s"), value(r, "scaling_efficiency"),
                          value(r, "efficiency_vs_serial")) for r in rows
                         if r["impl"] == impl and _layout_kind(r) == kind and not math.isnan(value(r, "epoch_s")))
            if kind != "one":  # the two-host points beside the one-host line
                pts = [p for p in pts if p[0] > 1]
            if not pts:
                continue
            ranks_seen.update(p[0] for p in pts)
            label = impl + suffix
            style = dict(marker=marker, linestyle="-" if kind == "one" else "none", color=colors.get(impl, "C3"))
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
            if impl != SERIAL:
                ax_e.plot([p[0] for p in pts], [p[2] for p in pts], label=label, **style)
            ax_s.plot([p[0] for p in pts], [p[3] for p in pts], label=label, **style)
    ranks = sorted(ranks_seen)
    for impl in dict.fromkeys(r["impl"] for r in rows):
        if has_serial and impl != SERIAL:
            continue  # one ideal line: the serial time over N
        t1 = [value(r, "epoch_s") for r in rows if r["impl"] == impl and str(r["config"]) == "1"]
        if t1 and ranks:
            ax_t.plot(ranks, [t1[0] / n for n in ranks], ":", color=colors.get(impl, "C3"),
                      label=f"ideal ({impl}: T(1)/N)")
    for ax in (ax_e, ax_s):
        if ranks:
            ax.plot(ranks, [1.0] * len(ranks), ":", color="gray", label="ideal (1)")
    ax_t.set_ylabel("epoch time T(N), s (median of the rounds)")
    ax_e.set_ylabel("scaling efficiency T(1) / (N T(N)),\nT(1) the same implementation's 1-rank run")
    ax_s.set_ylabel("efficiency against the serial baseline\nT_serial / (N T(N))")
    for ax in (ax_t, ax_e, ax_s):
        ax.set_xlabel("ranks N")
        ax.set_xticks(ranks)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_e.set_ylim(bottom=0)
    ax_s.set_ylim(bottom=0)
    _save(fig, base)
    return fig


def plot_offload(rows: list[dict], base: str | None = None) -> Any:
    """Time per step and peak memory of each offload row."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4))
    ax_t, ax_m = fig.subplots(1, 2)
    names = [f"{str(r['row']).split()[0]}\n{str(r['memory']).replace(' (', chr(10) + '(')}" for r in rows]
    ax_t.bar(names, [float(r["step_ms"]) for r in rows], color="tab:blue")
    ax_t.set_ylabel("time per step, ms")
    peak = [float(r["peak_device_mb"]) if r["peak_device_mb"] not in ("", None) else float(r["peak_rss_mb"])
            for r in rows]
    ax_m.bar(names, peak, color="tab:orange")
    ax_m.set_ylabel("peak memory of the row, MB\n(device when there is one, else process RSS)")
    for ax in (ax_t, ax_m):
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("memory-offload study")
    _save(fig, base)
    return fig


def load_results(out: str) -> tuple[list[dict], list[dict], list[dict]]:
    """The table, the curves and the offload rows a run wrote (``out`` is its ``--out``)."""
    base = os.path.splitext(out)[0]

    def read(path: str) -> list[dict]:
        if not os.path.exists(path):
            return []
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    return read(out), read(base + "_curves.csv"), read(base + "_offload.csv")


# --- the memory-offload study -----------------------------------------------------------------------

def _rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return math.nan


def _reset_peak_rss() -> None:
    """The peak RSS starts again from the current RSS (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _offload_model(mb: float):
    import torch
    from torch import nn

    # Four square layers of width h hold ~4 h^2 floats: h from the wanted size.
    h = max(64, int(math.sqrt(mb * 1e6 / 4 / 4)))
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                         nn.Linear(h, h)), h


def _page_locked(t):
    """``t``'s memory locked in RAM (mlock): the host side of what CUDA's pinned
    allocator gives; a CPU-only torch has no pinned allocator."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlock(ctypes.c_void_p(t.data_ptr()), ctypes.c_size_t(t.numel() * t.element_size())) != 0:
        raise OSError(ctypes.get_errno(), "mlock failed")
    return t


class _ModelRow:
    """The model trained with its parameters resident, or moved out to
    ``memory`` (pageable or pinned host memory) after every step and back before the next."""

    def __init__(self, memory: str, mb: float):
        import torch

        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        model, h = _offload_model(mb)
        self.model = model.to(self.device)
        self.params = list(model.parameters())
        self.params_mb = sum(p.numel() * p.element_size() for p in self.params) / 1e6
        self.opt = torch.optim.SGD(self.params, lr=1e-3, momentum=0.9)
        self.x, self.y = torch.randn(32, h, device=self.device), torch.randn(32, h, device=self.device)
        self.store = None
        if memory != "resident":
            pin = memory == "pinned"
            self.store = [torch.empty(p.shape, dtype=p.dtype, pin_memory=pin and self.cuda) for p in self.params]
            if pin and not self.cuda:
                self.store = [_page_locked(t) for t in self.store]
            self._out()

    def _out(self) -> None:  # device -> host, the device copy freed
        import torch
        assert self.store is not None
        with torch.no_grad():
            for p, t in zip(self.params, self.store):
                t.copy_(p.data, non_blocking=True)
                p.data = torch.empty(0, device=self.device)

    def step(self) -> float:
        import torch
        start = time.perf_counter()
        if self.store is not None:  # host -> device
            with torch.no_grad():
                for p, t in zip(self.params, self.store):
                    p.data = t.to(self.device, non_blocking=True) if self.cuda else t.clone()
        loss = torch.nn.functional.mse_loss(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.store is not None:
            self._out()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


class _FsdpRow:
    """disttrain FSDP over the same model, each Linear a unit, at ``stage`` (collective)."""

    def __init__(self, stage: int, mb: float):
        import torch
        from torch import nn

        import disttrain
        model, h = _offload_model(mb)
        self.cuda, self.params_mb = False, sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
        self.model = disttrain.FullyShardedDataParallel(model, stage=stage, auto_wrap={nn.Linear})
        self.opt = disttrain.ShardedOptimizer(torch.optim.SGD, self.model, lr=1e-3, momentum=0.9)
        self.x, self.y = torch.randn(32, h), torch.randn(32, h)

    def step(self) -> float:
        import torch
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - start


def _measure_rows(kinds: list[str], make, steps: int) -> dict[str, dict]:
    """Builds each row in turn (after a throw-away one) and takes its peak memory
    over 3 warm-up steps, above what the process held before its set-up; then times the rows
    interleaved (one step of each per round, the order rotating), median per row."""
    import torch

    rows, runners = {}, {}
    warm = make(kinds[0])  # what the first step of any row allocates once per process (libraries, autograd)
    for _ in range(3):
        warm.step()
    del warm
    for kind in kinds:
        cuda = torch.cuda.is_available() and not kind.startswith("fsdp")
        before_rss = _rss_mb("VmRSS")
        if cuda:
            torch.cuda.synchronize()
            before_dev = torch.cuda.memory_allocated()
        runner = make(kind)
        _reset_peak_rss()  # after the set-up: its transient copies (the unwrapped model) are not the row's
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            runner.step()
        rows[kind] = {"peak_rss_mb": _rss_mb("VmHWM") - before_rss, "where": "cuda" if cuda else "cpu",
                      "peak_device_mb": (torch.cuda.max_memory_allocated() - before_dev) / 1e6 if cuda else "",
                      "params_mb": runner.params_mb}
        runners[kind] = runner
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(steps):
        order = kinds[i % len(kinds):] + kinds[:i % len(kinds)]
        for kind in order:
            times[kind].append(runners[kind].step())
    for kind, t in times.items():
        t.sort()
        rows[kind]["step_ms"] = 1e3 * t[len(t) // 2]
    return rows


def _offload_job(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    if args.offload_job == "fsdp":
        import torch.distributed as dist

        import disttrain
        disttrain.init()
        rows = _measure_rows(["fsdp1", "fsdp3"], lambda k: _FsdpRow(int(k[-1]), args.offload_mb),
                             args.offload_steps)
        for row in rows.values():  # the largest rank's
            peak = torch.tensor([row["peak_rss_mb"]])
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            row["peak_rss_mb"] = float(peak[0])
        dist.destroy_process_group()
    else:
        rows = _measure_rows(["resident", "pageable", "pinned"], lambda k: _ModelRow(k, args.offload_mb),
                             args.offload_steps)
    if os.environ.get("RANK", "0") == "0":
        with open(args.rows_file, "w") as f:
            json.dump(rows, f)


_OFFLOAD_ROWS = {  # kind -> (row, memory, note)
    "resident": ("model", "resident", "parameters stay where they compute"),
    "pageable": ("model", "pageable", "moved out to ordinary (pageable) host memory after every step, back before "
                 "the next"),
    "pinned": ("model", "pinned", "the same through page-locked host memory (mlock without CUDA)"),
    "fsdp1": ("fsdp ranks=2", "stage 1 (resident)", "parameters whole on every rank"),
    "fsdp3": ("fsdp ranks=2", "stage 3 (gathered per use)", "parameters sharded, all-gathered before each use, "
              "freed after"),
}


def offload_study(args: argparse.Namespace) -> list[dict]:
    """The model rows in one process, the FSDP rows in one 2-rank torchrun job.
    Large allocations always mmapped (a fixed glibc threshold), so memory a
    row frees leaves the RSS and the next row's peak is its own."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    common = ["--offload-mb", str(args.offload_mb), "--offload-steps", str(args.offload_steps)]
    measured: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for job, ranks in (("model", 1), ("fsdp", 2)):
            rows_file = os.path.join(tmp, f"{job}.json")
            argv = ["-m", "disttrain.bench.scaling", "--offload-job", job, "--rows-file", rows_file, *common]
            cmd = [sys.executable, *argv] if ranks == 1 else \
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *argv]
            print(f"# offload study: {job}", flush=True)
            subprocess.run(cmd, env=env, check=True)
            with open(rows_file) as f:
                measured.update(json.load(f))
    rows = []
    for kind, (name, memory, note) in _OFFLOAD_ROWS.items():
        ref = measured["resident" if name == "model" else "fsdp1"]
        rows.append({"row": name, "memory": memory, "ranks": 1 if name == "model" else 2, "note": note,
                     **measured[kind], "step_ms_vs_resident": measured[kind]["step_ms"] / ref["step_ms"]})
    return rows


def report_offload(rows: list[dict]) -> None:
    _print_table(rows, [("row", "row", "", 12), ("memory", "memory", "", 26), ("where", "where", "", 5),
                        ("MB", "params_mb", ".1f", 5), ("ms/step", "step_ms", ".2f", 8),
                        ("vs resident", "step_ms_vs_resident", ".2f", 11), ("peak RSS MB", "peak_rss_mb", ".0f", 11),
                        ("peak dev MB", "peak_device_mb", ".0f", 11)])


# --- the study --------------------------------------------------------------------------------------

def _write_json(path: str, value: Any) -> None:
    """The study's progress files, replaced atomically: an interruption while one is written (the
    case resuming is for) leaves the previous one, never a torn file the next run cannot read."""
    from disttrain._atomic import umask, write_atomically

    write_atomically(path, lambda f: json.dump(value, f), mode=0o666 & ~umask(), durable=False)


def _prepare(args: argparse.Namespace) -> None:
    """The study folder: fresh, or the same study as the one already there."""
    key_path = os.path.join(args.runs, "study.json")
    if args.fresh and os.path.isdir(args.runs):
        shutil.rmtree(args.runs)
    os.makedirs(args.runs, exist_ok=True)
    key = _study_key(args)
    if os.path.exists(key_path):
        with open(key_path) as f:
            old = json.load(f)
        if old != key:
            changed = {k: (old.get(k), v) for k, v in key.items() if old.get(k) != v}
            raise SystemExit(f"disttrain bench scaling: '{args.runs}' holds a study with other settings "
                             f"{changed} (old, new); --fresh starts over, or give another --runs")
    else:
        _write_json(key_path, key)


def _rounds_done(run_dir: str) -> dict[str, Any]:
    """A configuration's progress in the study (``RUN/study.json``): {} before its first round."""
    try:
        with open(os.path.join(run_dir, "study.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def run_study(args: argparse.Namespace) -> tuple[list[dict], list[dict]] | None:
    """Runs every configuration in ``args.rounds`` rounds (the order reversed
    every other round), each round to r/R of the budget; skips what an earlier,
    interrupted invocation finished. On a cluster every node calls this; node 0
    returns the table, the others None."""
    cfgs = configs(args)
    cluster = None
    if args.nnodes > 1:
        budget = args.time_budget if args.time_budget is not None else 60.0 * (args.epochs or 1)
        per_config = args.timeout if args.timeout is not None else 4 * budget + 120
        cluster = _Cluster(args, per_config * len(cfgs) + 600)  # the longest another node may wait for node 0
    if args.node_rank == 0:
        _prepare(args)
    made: dict[bool, Any] = {}  # slow? -> the two hosts
    failures: dict[str, str] = {}
    rounds = args.rounds
    try:
        for r in range(1, rounds + 1):
            for cfg in (cfgs if r % 2 else cfgs[::-1]):
                run_dir = os.path.join(args.runs, cfg.name)
                go = f"go/{r}/{cfg.name}"
                if args.node_rank > 0:  # another node of a cluster: its part of node 0's multi-node rows
                    assert cluster is not None  # a node other than 0 is always part of a cluster
                    if cfg.nodes == 1 or args.node_rank >= cfg.nodes or cluster.get(go) != "run":
                        continue
                    print(f"# {cfg.name}: node {args.node_rank} of {cfg.nodes}, round {r} of {rounds}", flush=True)
                    error = _run_config(args, cfg, None, os.path.join(run_dir, f"study.node{args.node_rank}.log"),
                                        r / rounds)
                    cluster.set(f"rc/{r}/{cfg.name}/{args.node_rank}", error or "")
                    continue
                shared = cluster if cfg.nodes > 1 else None  # the cluster, for a multi-node row
                done = _rounds_done(run_dir)
                if done.get("finished") or done.get("round", 0) >= r or cfg.name in failures:
                    if done.get("finished") and r == 1:
                        print(f"# {cfg.name}: finished earlier, kept", flush=True)
                    if shared is not None:
                        shared.set(go, "skip")
                    continue
                hosts = made.get(cfg.slow)
                if cfg.nodes > 1 and cluster is None and hosts is None:
                    from disttrain.netns import NamespaceHosts, can_make_hosts
                    why = can_make_hosts()
                    if why:
                        failures[cfg.name] = f"skipped: two namespace hosts {why}"
                        print(f"# {cfg.name}: {failures[cfg.name]}", flush=True)
                        continue
                    if cfg.slow:
                        hosts = _SlowHosts(args.slow_link)
                    else:
                        hosts = NamespaceHosts("dtscale", 80)
                        hosts.make()
                    made[cfg.slow] = hosts
                resumed = os.path.isdir(os.path.join(run_dir, "snapshots"))
                print(f"# {cfg.name}: {cfg.ranks} rank(s){', resuming' if resumed else ''}, round {r} of {rounds}",
                      flush=True)
                os.makedirs(run_dir, exist_ok=True)
                if shared is not None:
                    shared.set(go, "run")
                error = _run_config(args, cfg, hosts, os.path.join(run_dir, "study.log"), r / rounds)
                if shared is not None:
                    others = [(n, shared.get(f"rc/{r}/{cfg.name}/{n}")) for n in range(1, cfg.nodes)]
                    error = error or "; ".join(f"node {n}: {e}" for n, e in others if e) or None
                if error:
                    failures[cfg.name] = f"failed: {error}"
                    print(f"# {cfg.name}: {failures[cfg.name]}", flush=True)
                    continue
                bounds = list(done.get("epochs_by_round", []))[:r - 1] + [len(read_metrics(run_dir))]
                _write_json(os.path.join(run_dir, "study.json"),
                            {"round": r, "rounds": rounds, "finished": r == rounds, "impl": cfg.impl,
                             "config": cfg.label, "at": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "epochs_by_round": bounds, "argv": _train_argv(args, cfg, r / rounds)})
        if cluster is not None:
            cluster.finish()
    finally:
        for hosts in made.values():
            hosts.remove()
    if args.node_rank > 0:
        return None
    return summarize(args, cfgs, failures)


def main(argv: list[str] | None = None) -> int:
    argv = arguments("scaling", argv)
    args = build_parser().parse_args(argv)
    if args.offload_job:
        _offload_job(args)
        return 0
    if args.time_budget is None and args.epochs is None:
        args.time_budget = 120.0
    if args.rounds is None:
        args.rounds = 3 if args.time_budget is not None else 1
    if args.rounds < 1:
        raise SystemExit(f"disttrain bench scaling: --rounds {args.rounds}: expected at least 1")
    cluster_settings(args)
    base = os.path.splitext(args.out)[0]
    result = run_study(args)
    if result is None:  # another node of a cluster study: node 0 writes the table
        print(f"# node {args.node_rank}: done; node 0 writes the table", flush=True)
        return 0
    rows, curves = result
    write_csv(rows, args.out, COLUMNS)
    write_csv(curves, base + "_curves.csv", CURVE_COLUMNS)
    report(rows)
    plot_losses(curves, base + "_losses")
    plot_scaling(rows, base + "_efficiency")
    if args.offload:
        off = offload_study(args)
        write_csv(off, base + "_offload.csv", OFFLOAD_COLUMNS)
        report_offload(off)
        plot_offload(off, base + "_offload")
    bad = [r for r in rows if r["status"] != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
