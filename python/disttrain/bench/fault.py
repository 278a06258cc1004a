"""``disttrain bench fault``: time lost when one rank is killed (kill -9) mid-training.

    disttrain bench fault                       # disttrain's trainer under torchrun
    disttrain bench fault --peers torchft       # and torchft, the same workload, the same run

Two ways to survive a lost rank, on the same workload (an MLP of ``--hidden``
x ``--depth`` on synthetic data, ``--batch`` per rank, SGD with momentum, 2 ranks):

* ``disttrain``: ``disttrain.Trainer`` (disttrain DDP over the disttrain backend,
  a snapshot every ``--snapshot-every`` steps) under ``torchrun --max-restarts 1``.
  After the kill torchrun stops the other rank and starts the whole group again;
  the trainer resumes from its newest snapshot, so the steps since it are redone.
* ``torchft`` (``--peers torchft``; from the benchmark venv, ``scripts/bench_env.sh``):
  two replica groups of one rank each, ``torchft.Manager`` over ``ProcessGroupGloo``
  (``min_replica_size=1``), the gradients averaged by ``Manager.allreduce`` (one
  flattened buffer per step) and ``torchft.Optimizer``; the lighthouse is the Rust
  ``torchft_lighthouse`` of its wheel, in a process of its own.
  (``torchft.DistributedDataParallel`` of torchft 0.2.0 does not survive the kill
  here: with the MLP's two buckets its comm hook first failed an assertion on the
  manager's dummy work after the error, and with that assertion relaxed the
  survivor hung in backward; the manager's own all-reduce, as above, survives.)
  After the kill the survivor goes on alone once the lighthouse gives it a quorum
  without the dead replica (after that replica's heartbeat timeout), and a
  replacement replica is started at once, as its group's torchrun would; it
  joins a later quorum and takes the survivor's state (torchft's live recovery
  over HTTP). Lighthouse and manager settings are torchft's defaults except
  ``min_replicas=1``, ``join_timeout_ms`` (``--join-timeout-ms``, 1000; torchft's
  default of 60000 would hold the survivor for the replacement) and the heartbeat
  timeout (``--heartbeat-timeout-ms``, torchft's 5000 by default).

Each rank logs the wall-clock time of every completed optimizer step. Rank 1
is killed (SIGKILL) once rank 0 has completed step ``--kill-at``. Measured, per
system and per repeat (``--repeats``, the systems taking turns):

* ``step_s``: median step time before the kill;
* ``resume_s``: from the kill to the first step completed after it (by any rank:
  for torchft the survivor, for disttrain the restarted group);
* ``redone``: steps completed before the kill that were done again after it
  (disttrain: since the snapshot; torchft: 0, the survivor keeps its state);
  ``discarded`` (torchft): steps the survivor computed after the kill whose
  all-reduce failed, so that the manager did not commit them;
* ``lost_s``: from the kill until the run is again one step past where it was
  at the kill (step L+1, L the last step completed before it), less one step
  time: the wall-clock time the failure cost;
* ``rejoin_s``: from the kill until both ranks train together again (torchft:
  the replacement's first committed step in a quorum of 2; until then the
  survivor trains alone, at half the global batch: ``steps_alone``);
* disttrain's restart, from the kill: ``up_s`` new processes with torch and
  disttrain imported, ``init_s`` process group up, ``optimizer_s`` the first
  optimizer built (torch imports ``torch._dynamo`` there), ``trainer_s`` the
  trainer built; ``up_s`` for torchft: the replacement with torch imported.

Writes ``benchmarks/results/fault.csv``. torchft not importable and no bench venv:
its rows are skipped with the reason printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from disttrain.bench import arguments, import_failure, rerun_in_bench_venv, write_csv

PEERS = ("torchft",)
SYSTEMS = ("disttrain",) + PEERS


def check_args(args: argparse.Namespace, backends: list[str]) -> None:
    """The command line's check before a run starts (ValueError, one line)."""
    if args.kill_at >= args.steps - 2:
        raise ValueError(f"--kill-at {args.kill_at}: must be at least 2 below --steps {args.steps}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disttrain bench fault", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", default="", help="torchft: also measure torchft (its Manager and lighthouse)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of a run (default 200)")
    p.add_argument("--kill-at", type=int, default=35, help="kill rank 1 once rank 0 completed this step (default 35)")
    p.add_argument("--snapshot-every", type=int, default=10, help="disttrain: snapshot every N steps (default 10)")
    p.add_argument("--hidden", type=int, default=1024, help="MLP hidden size (default 1024)")
    p.add_argument("--depth", type=int, default=2, help="MLP hidden layers (default 2)")
    p.add_argument("--batch", type=int, default=32, help="per-rank batch (default 32)")
    p.add_argument("--repeats", type=int, default=2, help="runs per system, taking turns (default 2)")
    p.add_argument("--join-timeout-ms", type=int, default=1000, help="torchft lighthouse join timeout (default 1000)")
    p.add_argument("--heartbeat-timeout-ms", type=int, default=5000,
                   help="torchft lighthouse heartbeat timeout (default 5000, torchft's)")
    p.add_argument("--run-limit", type=float, default=300.0, help="seconds before a run counts as hung (default 300)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "fault.csv"), help="CSV path")
    p.add_argument("--keep", default=None, metavar="DIR", help="keep each run's logs in DIR (default: deleted)")
    # internal: one rank of one system
    p.add_argument("--worker", choices=SYSTEMS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--step-log", default=None, help=argparse.SUPPRESS)
    p.add_argument("--snapshot-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--replica", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--lighthouse", default=None, help=argparse.SUPPRESS)
    p.add_argument("--go-file", default=None, help=argparse.SUPPRESS)
    return p


def torchft_unavailable() -> str | None:
    return import_failure("torchft", "torchft.coordination")


# --- workers -------------------------------------------------------------------------------------

def _data(args, rank: int):
    import torch

    g = torch.Generator().manual_seed(1000 + rank)
    n = args.batch * args.steps
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _model(args):
    import torch

    from disttrain import models

    torch.manual_seed(0)
    return models.mlp(num_classes=10, in_features=3 * 32 * 32, hidden=args.hidden, depth=args.depth)


class _StepLog:
    """Appends one JSON line per completed step: time, step, rank, pid, restart."""

    def __init__(self, path: str, rank: int, started: float | None = None):
        self.f = open(path, "a", buffering=1)
        self.rank, self.pid = rank, os.getpid()
        self.restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.write(-1, event="start", imported=started or time.time())

    def write(self, step: int, **extra) -> None:
        self.f.write(json.dumps({"t": time.time(), "step": step, "rank": self.rank, "pid": self.pid,
                                 "restart": self.restart, **extra}) + "\n")
        self.f.flush()


def _disttrain_worker(args) -> None:
    import torch
    from torch.utils.data import TensorDataset

    import disttrain
    import disttrain.models  # noqa: F401 - imported here, so that up_s below counts every import
    from disttrain.trainer import TrainerConfig

    torch.set_num_threads(1)
    started = time.time()  # imports done
    disttrain.init()
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    log = _StepLog(f"{args.step_log}.rank{rank}", rank, started)
    log.write(-1, event="initialised")
    x, y = _data(args, 0)  # one data set, the sampler shards it
    x = x.repeat(world, 1, 1, 1)
    y = y.repeat(world)
    model = _model(args)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    log.write(-1, event="optimizer")  # the first optimizer imports torch._dynamo (torch's lazy import)
    cfg = TrainerConfig(epochs=1, batch_size=args.batch, save_location=args.snapshot_dir, save_name="run",
                        snapshot_every_steps=args.snapshot_every, progress=False, timeout_seconds=60.0,
                        deterministic=False, lr_scaling="none")
    trainer = disttrain.Trainer(model, opt, TensorDataset(x, y), None, cfg)
    log.write(-1, event="trainer")
    opt.register_step_post_hook(lambda *_: log.write(trainer.global_step + 1))
    trainer.fit()
    log.write(trainer.global_step, event="done")


def _torchft_worker(args) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hung replica's stacks, for its .out
    import disttrain.models  # noqa: F401
    from torchft import Manager, Optimizer, ProcessGroupGloo  # type: ignore[import-not-found]  # the bench venv's

    torch.set_num_threads(1)
    log = _StepLog(args.step_log, args.replica)
    model = _model(args)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def state_dict():
        return {"model": model.state_dict(), "optim": opt.state_dict()}

    def load_state_dict(state):
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])

    store = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
    manager = Manager(pg=ProcessGroupGloo(timeout=timedelta(seconds=60)), min_replica_size=1,
                      load_state_dict=load_state_dict, state_dict=state_dict, replica_id=f"replica{args.replica}",
                      store_addr="localhost", store_port=store.port, rank=0, world_size=1,
                      lighthouse_addr=args.lighthouse, hostname="localhost", timeout=timedelta(seconds=60))
    optimizer = Optimizer(manager, opt)
    params = list(model.parameters())
    optimizer = Optimizer(manager, opt)
    x, y = _data(args, args.replica)
    log.write(-1, event="ready")  # heartbeating: both replicas start their first quorum together
    while args.go_file and not os.path.exists(args.go_file):
        time.sleep(0.01)
    while manager.current_step() < args.steps:
        i = manager.current_step() % args.steps * args.batch
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x[i:i + args.batch]), y[i:i + args.batch])
        loss.backward()
        # The gradients averaged by the manager in one all-reduce (after an error in it, the
        # manager refuses to commit the step: optimizer.step() skips it).
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        manager.allreduce(flat).wait()
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()
        before = manager.current_step()
        optimizer.step()
        if manager.current_step() > before:
            log.write(manager.current_step(), participants=manager.num_participants())
        else:  # the manager did not commit it (an error in its all-reduce): the step's work is lost
            log.write(before, event="discarded")
    log.write(manager.current_step(), event="done")
    manager.shutdown()


# --- the launcher --------------------------------------------------------------------------------

def _read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line being written
    return rows


def _worker_cmd(args, system: str, extra: list[str]) -> list[str]:
    return ["-m", "disttrain.bench.fault", "--worker", system, "--steps", str(args.steps), "--hidden",
            str(args.hidden), "--depth", str(args.depth), "--batch", str(args.batch), "--snapshot-every",
            str(args.snapshot_every), *extra]


def _tail(folder: str, lines: int = 15) -> str:
    """The last lines of every .out file in ``folder`` (why a run failed)."""
    text = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".out"):
            with open(os.path.join(folder, name), errors="replace") as f:
                text.append(f"--- {name}\n" + "".join(f.readlines()[-lines:]))
    return "\n".join(text)


def _kill_when(paths: list[str], victim_path: str, kill_at: int, procs, limit: float) -> float:
    """Waits until the first log reaches step ``kill_at``, SIGKILLs the pid of
    ``victim_path``'s latest start line; returns the kill's time."""
    deadline = time.time() + limit
    while time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a process ended before the kill: " + ", ".join(str(p.args) for p in procs))
        done = [r["step"] for r in _read(paths[0]) if "event" not in r]
        starts = [r for r in _read(victim_path) if r.get("event") == "start"]
        if done and max(done) >= kill_at and starts:
            pid = starts[-1]["pid"]
            os.kill(pid, signal.SIGKILL)
            return time.time()
        time.sleep(0.005)
    raise RuntimeError(f"no step {kill_at} within {limit:.0f} s")


def _measure(rows: list[dict], t_kill: float, step_key_rank: int | None = None) -> dict:
    steps = [r for r in rows if "event" not in r]
    before = [r for r in steps if r["t"] < t_kill]
    after = [r for r in steps if r["t"] >= t_kill]
    last = max(r["step"] for r in before)
    times = sorted({r["step"]: r["t"] for r in before if r["rank"] == 0}.items())
    step_s = statistics.median(b[1] - a[1] for a, b in zip(times, times[1:]))
    first = min(after, key=lambda r: r["t"])
    past = min((r["t"] for r in after if r["step"] >= last + 1), default=float("nan"))
    return {"step_s": step_s, "last_step_before_kill": last, "first_step_after": first["step"],
            "resume_s": first["t"] - t_kill, "redone": max(0, last - first["step"] + 1),
            "lost_s": past - t_kill - step_s}


def _run_disttrain(args, folder: str) -> dict:
    log = os.path.join(folder, "steps")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "--monitor-interval=0.1", *_worker_cmd(args, "disttrain", ["--step-log", log, "--snapshot-dir", folder])]
    with open(os.path.join(folder, "torchrun.out"), "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            t_kill = _kill_when([log + ".rank0", log + ".rank1"], log + ".rank1", args.kill_at, [proc], args.run_limit)
            proc.wait(timeout=args.run_limit)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{_tail(folder)}") from None
        finally:
            if proc.poll() is None:
                proc.kill()
    if proc.returncode != 0:
        raise RuntimeError(f"disttrain run failed ({proc.returncode})\n{_tail(folder)}")
    rows = _read(log + ".rank0") + _read(log + ".rank1")
    m = _measure(rows, t_kill)
    # Where the restart's time goes: kill -> new processes with torch imported (torchrun noticed,
    # stopped the survivor, started both again) -> process group up -> first optimizer built
    # (torch imports torch._dynamo there) -> trainer built (the snapshot is read in fit()) ->
    # first step.
    after = [r for r in rows if r["restart"] >= 1]
    for key, event, field in (("up_s", "start", "imported"), ("init_s", "start", "t"),
                              ("optimizer_s", "optimizer", "t"), ("trainer_s", "trainer", "t")):
        m[key] = max((r[field] for r in after if r.get("event") == event), default=float("nan")) - t_kill
    m["rejoin_s"] = m["resume_s"]  # the whole group restarts: both ranks are back together
    m["discarded"] = 0
    m["steps_alone"] = 0
    return m


def _run_torchft(args, folder: str) -> dict:
    import torchft

    # The lighthouse: torchft's Rust server (the torchft_lighthouse binary of its wheel), its own process.
    binary = os.path.join(os.path.dirname(sys.executable), "torchft_lighthouse")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"http://localhost:{port}"
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHFT_LIGHTHOUSE=address)
    logs = [os.path.join(folder, f"replica{i}") for i in range(2)]
    go = os.path.join(folder, "go")
    outs = [open(os.path.join(folder, "lighthouse.out"), "w")]
    procs: list[subprocess.Popen] = []
    lighthouse = subprocess.Popen([binary, "--bind", f"[::]:{port}", "--min_replicas", "1", "--join_timeout_ms",
                                   str(args.join_timeout_ms), "--heartbeat_timeout_ms", str(args.heartbeat_timeout_ms)],
                                  stdout=outs[0], stderr=subprocess.STDOUT)
    assert torchft.__file__

    def start(i: int, tag: str) -> subprocess.Popen:
        out = open(os.path.join(folder, f"replica{i}{tag}.out"), "w")
        outs.append(out)
        cmd = [sys.executable, *_worker_cmd(args, "torchft", ["--step-log", logs[i], "--replica", str(i),
                                                             "--lighthouse", address, "--go-file", go])]
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

    try:
        procs = [start(0, ""), start(1, "")]
        deadline = time.time() + args.run_limit
        while not all(any(r.get("event") == "ready" for r in _read(log)) for log in logs):
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"torchft replicas not ready\n{_tail(folder)}")
            time.sleep(0.02)
        open(go, "w").close()
        try:
            t_kill = _kill_when(logs, logs[1], args.kill_at, procs, args.run_limit)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{_tail(folder)}") from None
        procs[1].wait(timeout=10)
        procs.append(start(1, "-replacement"))  # as the replica group's torchrun would restart it
        for i in (0, 2):
            procs[i].wait(timeout=args.run_limit)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        lighthouse.kill()
        lighthouse.wait()
        for out in outs:
            out.close()
    if procs[0].returncode != 0 or procs[2].returncode != 0:
        raise RuntimeError(f"torchft run failed ({procs[0].returncode}, {procs[2].returncode})\n{_tail(folder)}")
    survivor = _read(logs[0])
    m = _measure(survivor, t_kill)
    replacement = [r for r in _read(logs[1]) if "event" not in r and r["t"] >= t_kill]
    new = [r for r in _read(logs[1]) if r.get("event") == "start" and r["t"] >= t_kill]
    m["up_s"] = new[0]["imported"] - t_kill  # the replacement with torch imported
    m["init_s"] = m["optimizer_s"] = m["trainer_s"] = ""
    rejoin = min((r["t"] for r in replacement if r.get("participants", 0) >= 2), default=float("nan"))
    m["rejoin_s"] = rejoin - t_kill
    m["discarded"] = len([r for r in survivor if r.get("event") == "discarded" and r["t"] >= t_kill])
    m["steps_alone"] = len([r for r in survivor if "event" not in r and r["t"] >= t_kill
                            and not r["t"] >= rejoin])  # all of them when the replacement never joined (nan)
    return m


def main(argv: list[str] | None = None) -> int:
    argv = arguments("fault", argv)
    args = build_parser().parse_args(argv)
    if args.worker == "disttrain":
        _disttrain_worker(args)
        return 0
    if args.worker == "torchft":
        _torchft_worker(args)
        return 0
    if args.kill_at >= args.steps - 2:
        raise SystemExit("disttrain bench fault: --kill-at must be at least 2 below --steps")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    for p in peers:
        if p not in PEERS:
            raise SystemExit(f"disttrain bench fault: unknown peer {p!r}; choose from {', '.join(PEERS)}")
    if "torchft" in peers and torchft_unavailable():
        rerun_in_bench_venv("disttrain.bench.fault", ["fault", *argv], ["torchft"])
        print(f"# torchft skipped: {torchft_unavailable()}", flush=True)
        peers.remove("torchft")
    systems = ["disttrain", *peers]
    print(f"# kill -9 of rank 1 after step {args.kill_at} of {args.steps}; MLP {args.hidden}x{args.depth}, "
          f"batch {args.batch}/rank, 2 ranks; disttrain snapshots every {args.snapshot_every} steps; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for repeat in range(args.repeats):
        for system in systems:
            with tempfile.TemporaryDirectory(prefix=f"fault-{system}-") as folder:
                run = _run_disttrain if system == "disttrain" else _run_torchft
                try:
                    m = run(args, folder)
                finally:
                    if args.keep:
                        shutil.copytree(folder, os.path.join(args.keep, f"{system}-{repeat}"), dirs_exist_ok=True)
            rows.append({"system": system, "repeat": repeat, "kill_at": args.kill_at, "steps": args.steps,
                         "snapshot_every": args.snapshot_every if system == "disttrain" else "",
                         "heartbeat_timeout_ms": args.heartbeat_timeout_ms if system == "torchft" else "",
                         **m, "load": round(os.getloadavg()[0], 1)})
            r = rows[-1]
            print(f"{system:<10} repeat {repeat}: step {r['step_s'] * 1e3:.0f} ms, killed after step "
                  f"{r['last_step_before_kill']}, first step after: {r['first_step_after']} at "
                  f"+{r['resume_s']:.2f} s, redone {r['redone']}, discarded {r['discarded']}, lost {r['lost_s']:.2f} s, both ranks "
                  f"training again +{r['rejoin_s']:.2f} s (steps alone {r['steps_alone']})", flush=True)
    print(f"{'system':<10} {'step ms':>8} {'resume s':>9} {'redone':>7} {'discarded':>9} {'lost s':>7} "
          f"{'rejoin s':>9} {'alone':>6}   (medians of {args.repeats})")
    for system in systems:
        mine = [r for r in rows if r["system"] == system]
        med = {k: statistics.median(r[k] for r in mine) for k in
               ("step_s", "resume_s", "redone", "discarded", "lost_s", "rejoin_s", "steps_alone")}
        print(f"{system:<10} {med['step_s'] * 1e3:>8.0f} {med['resume_s']:>9.2f} {med['redone']:>7.1f} "
              f"{med['discarded']:>9.1f} "
              f"{med['lost_s']:>7.2f} {med['rejoin_s']:>9.2f} {med['steps_alone']:>6.1f}")
    write_csv(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
