"""Launches the exit cases of tests/exit_worker.py under torchrun and judges
how every rank ended: used by tests/test_exit.py (a few runs per case) and by
scripts/soak_exit.sh (many runs, a table).

Topologies: ``one-host`` (2 ranks, one torchrun) and ``two-hosts`` (two
network namespaces joined by a veth pair, 2 ranks in each, one torchrun per
host; needs root and iproute2, as tests/test_multihost.py). Each rank runs
under ``sh -c`` so its own exit status is recorded (torchrun reports only
failures); a SIGABRT is status 134.

    python3 tests/exit_matrix.py soak --runs 50 --topology two-hosts --default disttrain --teardown none
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from disttrain.netns import NamespaceHosts, can_make_hosts

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "exit_worker.py")
HOSTS = NamespaceHosts(namespaces=("dtexit-h0", "dtexit-h1"), veths=("dtexit-veth0", "dtexit-veth1"),
                       addresses=("10.231.79.1", "10.231.79.2"))
NAMESPACES, VETHS, ADDRESSES = HOSTS.namespaces, HOSTS.veths, HOSTS.addresses
NPROC = 2
# A rank's status when it records one: sh reports a signal as 128 + its number.
SIGABRT_STATUS = 128 + signal.SIGABRT

# Runs the rank, then records its exit status next to its results.
_RANK_WRAPPER = 'rank="${RANK:-x}"; "$EXIT_MATRIX_PYTHON" "$@"; rc=$?; echo "$rc" > "$2/exit_$rank"; exit "$rc"'


@dataclass
class Case:
    topology: str = "two-hosts"   # or "one-host"
    default: str = "disttrain"    # the default group's backend; the subgroup has the other one
    teardown: str = "none"        # none | destroy | sub-first
    pending: bool = False         # rank 0 leaves an op pending at exit
    hold: bool = False            # the subgroup stays referenced until the interpreter exits

    @property
    def world(self) -> int:
        return NPROC * (2 if self.topology == "two-hosts" else 1)

    def label(self) -> str:
        extra = ("+pending" if self.pending else "") + ("+hold" if self.hold else "")
        return f"{self.topology} default={self.default} teardown={self.teardown}{extra}"

    def worker_args(self, out_dir: str) -> list[str]:
        args = [WORKER, out_dir, "--default", self.default, "--teardown", self.teardown]
        return args + (["--pending"] if self.pending else []) + (["--hold"] if self.hold else [])


@dataclass
class Outcome:
    case: Case
    statuses: dict[int, int | None]  # rank -> exit status (None: never recorded)
    exit_after_teardown: dict[int, float]  # rank -> seconds from the start of its teardown to its exit
    results: dict[int, dict]
    pending: dict[int, dict]
    seconds: float
    hung: bool
    log: str
    aborted_ranks: list[int] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Every rank did its work and exited with status 0, nothing hung or aborted."""
        ranks = range(self.case.world)
        return (not self.hung and not self.aborted_ranks and all(self.statuses.get(r) == 0 for r in ranks)
                and all(self.results.get(r, {}).get("correct") for r in ranks))

    @property
    def aborted(self) -> bool:
        return bool(self.aborted_ranks)

    def describe(self) -> str:
        after = {r: round(s, 2) for r, s in self.exit_after_teardown.items()}
        return (f"{self.case.label()}: statuses={self.statuses} hung={self.hung} aborted={self.aborted_ranks} "
                f"results={sorted(self.results)} pending={self.pending} exit_after_teardown={after} "
                f"{self.seconds:.1f} s")


# --- hosts -----------------------------------------------------------------------------

def make_hosts() -> None:
    HOSTS.make()


def remove_hosts() -> None:
    HOSTS.remove()


# --- one run -------------------------------------------------------------------------------

def _torchrun(case: Case, node: int, port: int, out_dir: str) -> list[str]:
    nnodes = 2 if case.topology == "two-hosts" else 1
    master = ADDRESSES[0] if case.topology == "two-hosts" else "127.0.0.1"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node-rank={node}",
           f"--nproc-per-node={NPROC}", f"--master-addr={master}", f"--master-port={port}",
           "--no-python", "sh", "-c", _RANK_WRAPPER, "exit-rank", *case.worker_args(out_dir)]
    if case.topology == "two-hosts":
        cmd = ["ip", "netns", "exec", NAMESPACES[node], *cmd]
    return cmd


def run_case(case: Case, limit: float = 90.0, keep_dir: str | None = None) -> Outcome:
    """One run of `case`: every rank's exit status, results, whether it hung (past `limit` s) or aborted."""
    out_dir = keep_dir or tempfile.mkdtemp(prefix="dt-exit-")
    os.makedirs(out_dir, exist_ok=True)
    port = random.randint(20000, 29000)
    nodes = 2 if case.topology == "two-hosts" else 1
    env = dict(os.environ, OMP_NUM_THREADS="1", EXIT_MATRIX_PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    procs, logs = [], []
    start = time.monotonic()
    for node in range(nodes):
        node_env = dict(env)
        if case.topology == "two-hosts":
            node_env["GLOO_SOCKET_IFNAME"] = VETHS[node]  # gloo picks its interface from the host name otherwise
        log = open(os.path.join(out_dir, f"node{node}.log"), "w+")
        logs.append(log)
        procs.append(subprocess.Popen(_torchrun(case, node, port, out_dir), env=node_env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    hung = False
    deadline = start + limit
    failed_at = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = now
        # A failed host's launcher leaves the other one waiting at its exit barrier
        # (until its own timeout): once one failed, the others get a short grace.
        if now > deadline or (failed_at is not None and now > failed_at + 10):
            hung = failed_at is None
            break
        time.sleep(0.1)
    seconds = time.monotonic() - start
    if hung or any(p.returncode != 0 for p in procs):
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if case.topology == "two-hosts":
            for node in range(len(NAMESPACES)):
                HOSTS.kill(node)
    text = ""
    for log in logs:
        log.seek(0)
        text += log.read()
        log.close()
    statuses: dict[int, int | None] = {}
    exit_after_teardown: dict[int, float] = {}
    results: dict[int, dict] = {}
    pending: dict[int, dict] = {}
    for r in range(case.world):
        statuses[r] = _read_int(os.path.join(out_dir, f"exit_{r}"))
        began = _read_json(os.path.join(out_dir, f"teardown_{r}.json"))
        if began is not None and statuses[r] is not None:
            exit_after_teardown[r] = os.path.getmtime(os.path.join(out_dir, f"exit_{r}")) - began["time"]
        res = _read_json(os.path.join(out_dir, f"rank_{r}.json"))
        if res is not None:
            results[r] = res
        pen = _read_json(os.path.join(out_dir, f"pending_{r}.json"))
        if pen is not None:
            pending[r] = pen
    aborted = sorted(r for r, s in statuses.items() if s == SIGABRT_STATUS)
    if not aborted and "terminate called" in text:
        aborted = [-1]  # aborted, rank unknown
    if keep_dir is None:
        shutil.rmtree(out_dir, ignore_errors=True)
    return Outcome(case, statuses, exit_after_teardown, results, pending, seconds, hung, text, aborted)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --- soak ------------------------------------------------------------------------------------

def soak(cases: list[Case], runs: int, limit: float, stream=sys.stdout) -> list[dict]:
    """Runs each case `runs` times; prints one table row per case (and a line per bad run)."""
    rows = []
    for case in cases:
        clean = aborts = hangs = other = 0
        durations = []
        for i in range(runs):
            o = run_case(case, limit)
            durations.append(o.seconds)
            if o.clean:
                clean += 1
            elif o.aborted:
                aborts += 1
            elif o.hung:
                hangs += 1
            else:
                other += 1
            if not o.clean:
                print(f"  run {i + 1}: {o.describe()}", file=stream, flush=True)
        rows.append({"case": case.label(), "runs": runs, "exit0_every_rank": clean, "aborts": aborts,
                     "hangs": hangs, "other_failures": other, "mean_s": sum(durations) / len(durations)})
        r = rows[-1]
        print(f"{r['case']:<60} {r['runs']:>5} {r['exit0_every_rank']:>9} {r['aborts']:>7} {r['hangs']:>6} "
              f"{r['other_failures']:>6} {r['mean_s']:>7.1f}", file=stream, flush=True)
    return rows


def _cases_from_args(a: argparse.Namespace) -> list[Case]:
    return [Case(topology=t, default=d, teardown=td, pending=p, hold=a.hold)
            for t, d, td, p in itertools.product(a.topology, a.default, a.teardown, a.pending)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("soak", help="run cases many times and print a table")
    s.add_argument("--runs", type=int, default=50)
    s.add_argument("--topology", nargs="+", default=["two-hosts"], choices=["one-host", "two-hosts"])
    s.add_argument("--default", nargs="+", default=["disttrain"], choices=["disttrain", "gloo"])
    s.add_argument("--teardown", nargs="+", default=["none"], choices=["none", "destroy", "sub-first"])
    s.add_argument("--pending", nargs="+", default=["off"], choices=["off", "on"])
    s.add_argument("--hold", action="store_true")
    s.add_argument("--limit", type=float, default=90.0, help="seconds before a run counts as hung")
    s.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)
    a.pending = [p == "on" for p in a.pending]
    cases = _cases_from_args(a)
    if any(c.topology == "two-hosts" for c in cases):
        why = can_make_hosts()
        if why:
            print(f"exit_matrix: two-hosts {why}", file=sys.stderr)
            return 2
        make_hosts()
    try:
        print(f"{'case':<60} {'runs':>5} {'exit 0':>9} {'aborts':>7} {'hangs':>6} {'other':>6} {'mean s':>7}")
        rows = soak(cases, a.runs, a.limit)
    finally:
        if any(c.topology == "two-hosts" for c in cases):
            remove_hosts()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["exit0_every_rank"] == r["runs"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
