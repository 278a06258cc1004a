"""Chaos soak of the snapshot trainer (issue 19): repeated ``disttrain train``
runs under torchrun (digits, 2 ranks, 2 epochs, a snapshot every 5 steps), each
with one fault, judged against an uninterrupted run of the same command. Used
by tests/test_chaos_soak.py (one run) and scripts/soak.sh (many, a table).

Faults (one per run, drawn from a seed that every message names):

- ``kill-random``: kill -9 of a random rank at a random instant of its life
  (half the draws inside the training window, mid-snapshot and mid-collective
  included by chance); torchrun restarts the group.
- ``kill-snapshot`` / ``kill-collective``: kill -9 at a chosen step while rank
  0 writes a snapshot / with an all-reduce in flight (disttrain.fault_injection).
- ``sigstop``: SIGSTOP of a random rank at a random instant for longer than
  the process-group timeout, then SIGCONT.
- ``full-disk``: the run folder on a tmpfs too small for the run; if the run
  fails, it must say so, and after the disk is enlarged the same command resumes.
- ``corrupt-newest``: kill -9 mid-training with no restart, a byte of the
  newest snapshot flipped, then the same command again.

A run passes when it ends with the reference's parameters, histories and best
validation loss bit for bit and one metrics row per epoch, or fails with a
clear error (full disk: the message names it, and the resumed command then
passes). Never a hang (a wall-clock limit per launch), never completed work
lost: after a kill, a SIGSTOP or a full disk, every resume starts at or after
the newest snapshot that was complete when the fault struck (the snapshot at
each epoch's end included), and the run's end is the reference's (so no epoch
is missing or logged twice). ``corrupt-newest`` destroys that snapshot on
purpose: there the resume falls back to the one before.

    python3 tests/chaos_soak.py --runs 30 --seed 7
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from disttrain import snapshot
from harness import package_pythonpath

EPOCHS, SNAPSHOT_EVERY, NPROC = 2, 5, 2
STEPS = 46  # digits: 1437 training images / 2 ranks / batch 32 = 23 steps per epoch
PG_TIMEOUT = 10.0  # seconds: the process-group timeout of every run (SIGSTOP exceeds it)
LAUNCH_LIMIT = 300.0  # seconds: a launch still running past this is a hang
FAULTS = ("kill-random", "kill-snapshot", "kill-collective", "sigstop", "full-disk", "corrupt-newest")
_RESUMED = re.compile(r"resumed from \S+ \(epoch (\d+), step (\d+)")


def train_command(save_location: str, name: str, max_restarts: int = 3, timeout: float = 60.0) -> list[str]:
    """The trainer run every fault test compares with its uninterrupted twin."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(NPROC),
            "--max-restarts", str(max_restarts), "-m", "disttrain.cli", "train", "-e", str(EPOCHS),
            "--snapshot-every", str(SNAPSHOT_EVERY), "-s", save_location, "--save-name", name, "--no-progress",
            "--timeout", f"{timeout:g}"]


def train_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=package_pythonpath(),
                **(extra or {}))


def final_state(run_dir: str):
    return snapshot.load_latest(os.path.join(run_dir, "snapshots"))[1]


def differences(reference, state, metric_rows: int) -> list[str]:
    """How a finished run differs from the uninterrupted one (empty: bit-identical)."""
    if state is None:
        return ["no snapshot verifies"]
    out = []
    if state["epochs_run"] != EPOCHS or state["global_step"] != STEPS:
        out.append(f"ended at epoch {state['epochs_run']}, step {state['global_step']} (want {EPOCHS}, {STEPS})")
    out += [f"parameter {k} differs" for k, t in reference["model"].items() if not torch.equal(t, state["model"][k])]
    out += [f"history {k} differs" for k in ("train_loss", "train_acc", "test_loss", "test_acc")
            if state["history"][k] != reference["history"][k]]
    if state["best_val_loss"] != reference["best_val_loss"]:
        out.append("best validation loss differs")
    if metric_rows != EPOCHS:
        out.append(f"metrics.csv has {metric_rows} epoch rows, want {EPOCHS}")
    return out


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _workers(launcher: int) -> list[int]:
    """The rank processes under a torchrun (its agent's children that have RANK set)."""
    out = []
    for pid in _children(launcher):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if b"\0RANK=" in b"\0" + f.read():
                    out.append(pid)
        except OSError:
            pass
    return out


@dataclass
class Launch:
    returncode: int | None
    output: str
    seconds: float
    hung: bool


def launch(cmd: list[str], env: dict[str, str], action=None) -> Launch:
    """Runs one torchrun; ``action(popen)``, if given, runs in a thread beside it (the fault).
    It runs in the run's parent folder: ``python -m`` puts the working directory first on
    sys.path, where a stray module (a ``/tmp/inspect.py``) would shadow the standard library's."""
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=cmd[cmd.index("-s") + 1])
        if action is not None:
            threading.Thread(target=action, args=(proc,), daemon=True).start()
        try:
            proc.wait(LAUNCH_LIMIT)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
            for pid in _workers(proc.pid):  # torchrun starts each rank in a session of its own
                os.kill(pid, signal.SIGKILL)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        return Launch(None if hung else proc.returncode, log.read(), time.monotonic() - start, hung)


@dataclass
class Timing:
    """When to strike: the ranks' start-up lasts about ``startup`` seconds (from both
    processes up to the run's snapshot folder, made just before training starts), the
    training about ``training`` (from there to the end)."""
    startup: float = 15.0
    training: float = 4.0


def _wait_for(predicate, proc: subprocess.Popen, deadline: float) -> bool:
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def reference_run(root: str) -> tuple[dict, Timing]:
    """The uninterrupted run: its final state and how long its phases took."""
    marks: dict[str, float] = {}
    run_dir = os.path.join(root, "reference")

    def watch(proc):
        if _wait_for(lambda: len(_workers(proc.pid)) == NPROC, proc, time.monotonic() + LAUNCH_LIMIT):
            marks["up"] = time.monotonic()
        if _wait_for(lambda: os.path.isdir(os.path.join(run_dir, "snapshots")), proc, time.monotonic() + LAUNCH_LIMIT):
            marks["training"] = time.monotonic()

    start = time.monotonic()
    result = launch(train_command(root, "reference"), train_env(), watch)
    if result.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{result.output}")
    end = start + result.seconds
    timing = Timing(marks.get("training", end) - marks.get("up", start), max(end - marks.get("training", end), 1.0))
    return final_state(run_dir), timing


@dataclass
class Outcome:
    fault: str
    detail: str
    run_dir: str = ""
    finished: bool = False  # the run (or its resumption) exited 0; judge() compares it
    state: dict | None = None
    metric_rows: int = 0
    equal: bool = False
    clear_failure: bool = False
    hung: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and (self.equal or self.clear_failure)

    def verdict(self) -> str:
        return "HANG" if self.hung else "BAD" if not self.ok else "equal" if self.equal else "clear failure"

    def record(self, run_dir: str) -> None:
        """Keeps what judge() compares (before a tmpfs under the run goes away)."""
        self.finished = True
        self.state = final_state(run_dir)
        self.metric_rows = _epochs_logged(run_dir)


def judge(outcome: Outcome, reference: dict) -> Outcome:
    if outcome.finished:
        outcome.problems += differences(reference, outcome.state, outcome.metric_rows)
        outcome.equal = not outcome.problems
    return outcome


def _epochs_logged(run_dir: str) -> int:
    metrics = os.path.join(run_dir, "metrics.csv")
    return len(open(metrics).read().splitlines()) - 1 if os.path.exists(metrics) else 0


def _newest_step(run_dir: str) -> int:
    """The step of the newest complete snapshot file (they appear by rename only): -1 if none."""
    snaps = snapshot.list_snapshots(os.path.join(run_dir, "snapshots"))
    return int(re.search(r"(\d+)\.dts$", snaps[-1]).group(1)) if snaps else -1


def _check_resume(outcome: Outcome, output: str, committed_step: int, relaunch: bool = False) -> None:
    """Completed work is never lost: every start after the fault (each restart, and the
    first start too for a relaunched command) resumes at or after the newest snapshot
    that was complete when the fault struck."""
    steps = [int(step) for _, step in _RESUMED.findall(output)]
    restarts = output.count("disttrain: run folder") - (0 if relaunch else 1)  # rank 0 says it at every start
    if committed_step >= 0 and len(steps) < restarts:
        outcome.problems.append(f"started over although step {committed_step} was saved")
    for step in steps:
        if step < committed_step:
            outcome.problems.append(f"resumed at step {step} although step {committed_step} was saved")


def _strike_random_rank(rng: random.Random, timing: Timing, run_dir: str, on_rank,
                        struck: dict[str, int]) -> tuple[str, Callable]:
    """A fault thread: waits for the ranks, then for a random instant (half the draws in
    start-up, half in training, snapshots and collectives included), then calls
    on_rank(pid) for a random rank; struck["committed"] is the newest complete snapshot's
    step at that instant."""
    in_training = rng.random() < 0.5
    delay = rng.uniform(0, timing.training if in_training else timing.startup)
    rank = rng.randrange(NPROC)
    detail = f"rank {rank}, {delay:.2f} s into {'training' if in_training else 'start-up'}"

    def action(proc):
        if not _wait_for(lambda: len(_workers(proc.pid)) == NPROC, proc, time.monotonic() + LAUNCH_LIMIT):
            return
        if in_training and not _wait_for(lambda: os.path.isdir(os.path.join(run_dir, "snapshots")), proc,
                                         time.monotonic() + LAUNCH_LIMIT):
            return
        time.sleep(delay)
        for pid in _workers(proc.pid):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if f"RANK={rank}".encode() in f.read().split(b"\0"):
                        struck["committed"] = _newest_step(run_dir)
                        on_rank(pid)
                        return
            except OSError:
                pass

    return detail, action


def _launched(outcome: Outcome, result: Launch, run_dir: str) -> Outcome:
    if result.hung:
        outcome.hung = True
        outcome.problems.append(f"hung past {LAUNCH_LIMIT:g} s")
    elif result.returncode != 0:
        outcome.problems.append(f"failed (status {result.returncode}):\n{result.output[-3000:]}")
    else:
        outcome.record(run_dir)
    return outcome


def run_one(fault: str, rng: random.Random, timing: Timing, root: str, index: int) -> Outcome:
    """One faulty run in ``root``; judge() then compares it with the reference."""
    name = f"run{index:03d}-{fault}"
    run_dir = os.path.join(root, name)
    step = rng.randint(SNAPSHOT_EVERY + 1, STEPS - 2)
    struck: dict[str, int] = {}
    if fault == "kill-random":
        detail, action = _strike_random_rank(rng, timing, run_dir, lambda pid: os.kill(pid, signal.SIGKILL), struck)
        outcome = Outcome(fault, detail, run_dir)
        result = launch(train_command(root, name), train_env(), action)
        _check_resume(outcome, result.output, struck.get("committed", -1))
        return _launched(outcome, result, run_dir)
    if fault in ("kill-snapshot", "kill-collective"):
        where = fault.split("-")[1]
        rank = 0 if where == "snapshot" else rng.randrange(NPROC)
        env = train_env({"DISTTRAIN_FAULT_INJECT": f"{rank}:{step}:{where}"})
        return _launched(Outcome(fault, f"rank {rank} at step {step}", run_dir),
                         launch(train_command(root, name), env), run_dir)
    if fault == "sigstop":
        stop_for = PG_TIMEOUT + 5

        def stop(pid):
            os.kill(pid, signal.SIGSTOP)
            time.sleep(stop_for)
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

        detail, action = _strike_random_rank(rng, timing, run_dir, stop, struck)
        outcome = Outcome(fault, f"{detail}, stopped {stop_for:g} s (timeout {PG_TIMEOUT:g} s)", run_dir)
        result = launch(train_command(root, name, timeout=PG_TIMEOUT), train_env(), action)
        _check_resume(outcome, result.output, struck.get("committed", -1))
        return _launched(outcome, result, run_dir)
    if fault == "full-disk":
        return _full_disk(rng, root, name, index)
    if fault == "corrupt-newest":
        outcome = Outcome(fault, f"kill at step {step}, no restart, then the newest snapshot damaged", run_dir)
        first = launch(train_command(root, name, max_restarts=0), train_env(
            {"DISTTRAIN_FAULT_INJECT": f"{rng.randrange(NPROC)}:{step}:forward"}))
        if first.hung:
            return _launched(outcome, first, run_dir)
        snaps = snapshot.list_snapshots(os.path.join(run_dir, "snapshots"))
        if snaps:
            size = os.path.getsize(snaps[-1])
            with open(snaps[-1], "r+b") as f:
                f.seek(rng.randrange(size))
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0xFF]))
            outcome.detail += f" ({os.path.basename(snaps[-1])})"
        return _launched(outcome, launch(train_command(root, name), train_env()), run_dir)
    raise ValueError(f"unknown fault {fault!r}; choose from {FAULTS}")


def _full_disk(rng: random.Random, root: str, name: str, index: int) -> Outcome:
    """The run folder on a small tmpfs; a failure must name the full disk, and after the disk
    is enlarged the same command must finish like the uninterrupted run."""
    kib = rng.randint(150, 330)  # a snapshot is ~85 KiB; the run keeps 3 and a best model (~340 KiB at the end)
    mount = os.path.join(root, f"disk{index:03d}")
    os.makedirs(mount)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", mount], check=True)
    run_dir = os.path.join(mount, name)
    outcome = Outcome("full-disk", f"{kib} KiB tmpfs", run_dir)
    try:
        first = launch(train_command(mount, name, max_restarts=1), train_env())
        if first.hung or first.returncode == 0:  # a hang, or the run fit
            return _launched(outcome, first, run_dir)
        if "No space left on device" not in first.output:
            outcome.problems.append(f"failed on a full disk without saying so:\n{first.output[-3000:]}")
            return outcome
        outcome.clear_failure = True
        committed = _newest_step(run_dir)
        subprocess.run(["mount", "-o", "remount,size=8m", mount], check=True)
        second = launch(train_command(mount, name), train_env())
        _check_resume(outcome, second.output, committed, relaunch=True)
        outcome.detail += f", failed cleanly after step {committed} was saved, resumed on 8 MiB"
        return _launched(outcome, second, run_dir)
    finally:
        subprocess.run(["umount", "-l", mount], check=False)


def soak(runs: int, seed: int, faults=FAULTS, stream=sys.stdout) -> list[Outcome]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="disttrain-soak-") as folder:
        reference, timing = reference_run(folder)
        print(f"soak seed {seed}: reference run: start-up {timing.startup:.1f} s, training {timing.training:.1f} s",
              file=stream, flush=True)
        outcomes = []
        for i in range(runs):
            fault = faults[i % len(faults)] if runs >= len(faults) else rng.choice(faults)
            o = judge(run_one(fault, rng, timing, folder, i), reference)
            outcomes.append(o)
            print(f"run {i + 1:3d} {o.fault:<16} {o.verdict():<14} {o.detail}", file=stream, flush=True)
            for p in o.problems:
                print(f"    {p}", file=stream, flush=True)
    return outcomes


def summary(outcomes: list[Outcome]) -> str:
    lines = [f"{'fault':<16} {'runs':>5} {'equal':>6} {'clear failure':>14} {'hangs':>6} {'bad':>4}"]
    for fault in FAULTS + ("all",):
        mine = [o for o in outcomes if fault in ("all", o.fault)]
        if mine:
            lines.append(f"{fault:<16} {len(mine):>5} {sum(o.equal for o in mine):>6} "
                         f"{sum(o.clear_failure and o.ok for o in mine):>14} {sum(o.hung for o in mine):>6} "
                         f"{sum(not o.ok for o in mine):>4}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=len(FAULTS) * 5)
    ap.add_argument("--seed", type=int, default=None, help="default: drawn and printed")
    ap.add_argument("--faults", nargs="+", default=list(FAULTS), choices=FAULTS)
    a = ap.parse_args(argv)
    seed = a.seed if a.seed is not None else random.randrange(10**6)
    outcomes = soak(a.runs, seed, tuple(a.faults))
    print(summary(outcomes))
    print(f"replay: python3 tests/chaos_soak.py --runs {a.runs} --seed {seed} --faults {' '.join(a.faults)}")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
