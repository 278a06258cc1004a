"""``disttrain bench snapshot --peers dcp,torchsnapshot``: disttrain's snapshot
format and async writer against PyTorch Distributed Checkpoint
(``torch.distributed.checkpoint.save``/``async_save``/``load``, its default
``FileSystemWriter``/``FileSystemReader``) and torchsnapshot
(``Snapshot.take``/``async_take``/``restore``), in the same run, interleaved.

Rows per state size (best of ``--repeats``):

- ``save``: a synchronous save with each system's defaults (disttrain and DCP
  fsync their files, torchsnapshot does not: the ``durable`` column says which);
- ``load``: files in the page cache; DCP and torchsnapshot load in place into
  a state of the same structure (allocated before the timer: a resuming job has
  its model), disttrain returns new tensors (their allocation is timed);
- ``async blocked``: how long the async call holds the caller (disttrain
  ``AsyncSnapshotter.save``, DCP ``async_save``, torchsnapshot ``async_take``);
- ``async total``: from that call until the checkpoint is committed.

Every target is removed before the timer (no system pays for deleting an old
checkpoint). With torchsnapshot, which does not fsync, ``disttrain-nofsync``
(``fsync=False``) gives disttrain's like-for-like rows.

And the kill test (``--kill-mb``): a child process saves a good checkpoint
(step 1), then starts the next (step 2) and is SIGKILLed once the step-2 files
hold a given fraction of the state's bytes (``--kill-at``). A fresh loader then does what a resuming job
does, in two layouts: ``one per step`` (a file/folder per step, the newest
loaded: disttrain's ``load_latest``; for DCP and torchsnapshot the newest
folder) and ``same path`` (each save overwrites one checkpoint). The outcome
is ``previous`` (step 1's values), ``new``, ``error: ...`` or ``garbage``
(loaded without an error, values of neither step).

torchsnapshot is not in the system's Python: the bench re-runs itself under the
benchmark venv's Python (``scripts/bench_env.sh``) where it is, else skips it
with the reason printed.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from typing import Any, Callable

import torch

from .. import snapshot
from . import import_failure

PEERS = ("dcp", "torchsnapshot")


def peer_unavailable(name: str) -> str | None:
    """Why the peer cannot run in this interpreter, or None."""
    # torchsnapshot: the bench venv's
    modules = {"dcp": "torch.distributed.checkpoint", "torchsnapshot": "torchsnapshot"}
    if name not in modules:
        return f"unknown peer (choose from {', '.join(PEERS)})"
    return import_failure(modules[name])


def _quiet() -> None:
    # DCP warns on every call that it runs without a process group (one process saving its state).
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
    logging.getLogger("torch.distributed.checkpoint").setLevel(logging.CRITICAL)  # its tracebacks of a torn load


def _zeros_like(state: Any) -> Any:
    return {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}, "step": 0}


# --- one system's operations ----------------------------------------------------------------------

class _System:
    """save / load / async save of one checkpoint system, on folder-or-file targets."""

    name = ""
    durable = False

    def __init__(self, folder: str):
        self.folder = folder

    def target(self, step: int) -> str:
        return os.path.join(self.folder, f"{self.name}_{step:09d}")

    def save(self, state: Any, step: int) -> None:
        raise NotImplementedError

    def load(self, state: Any, step: int) -> Any:
        raise NotImplementedError

    def async_save(self, state: Any, step: int) -> Callable[[], None]:
        """Starts a save; returns the wait for its commit."""
        raise NotImplementedError


class _Disttrain(_System):
    name, durable = "disttrain", True

    def __init__(self, folder: str):
        super().__init__(folder)
        # keep=None: deleting old snapshots is left to the caller, as for the peers.
        self.writer = snapshot.AsyncSnapshotter(folder, keep=None, fsync=self.durable)

    def target(self, step: int) -> str:
        return self.writer.path_for(step)

    def save(self, state: Any, step: int) -> None:
        snapshot.save(self.target(step), state, fsync=self.durable)

    def load(self, state: Any, step: int) -> Any:
        return snapshot.load(self.target(step))

    def async_save(self, state: Any, step: int) -> Callable[[], None]:
        self.writer.save(state, step=step)
        return lambda: None if self.writer.wait() else None


class _DisttrainPageCache(_Disttrain):
    """disttrain without fsync (``fsync=False``): torchsnapshot's durability, for the like-for-like row."""

    name, durable = "disttrain-nofsync", False


class _DCP(_System):
    name, durable = "dcp", True  # FileSystemWriter(sync_files=True) by default

    def save(self, state: Any, step: int) -> None:
        import torch.distributed.checkpoint as dcp
        dcp.save(state, checkpoint_id=self.target(step))

    def load(self, state: Any, step: int) -> Any:
        import torch.distributed.checkpoint as dcp
        dcp.load(state, checkpoint_id=self.target(step))
        return state

    def async_save(self, state: Any, step: int) -> Callable[[], None]:
        import torch.distributed.checkpoint as dcp
        future: Any = dcp.async_save(state, checkpoint_id=self.target(step))  # a Future without a staging option
        return lambda: None if future.result() else None


class _TorchSnapshot(_System):
    name, durable = "torchsnapshot", False  # its file-system plugin writes without fsync

    @staticmethod
    def _app(state: Any) -> dict:
        import torchsnapshot  # type: ignore[import-not-found]  # the bench venv's
        return {"state": torchsnapshot.StateDict(**state)}

    def save(self, state: Any, step: int) -> None:
        import torchsnapshot
        torchsnapshot.Snapshot.take(path=self.target(step), app_state=self._app(state))

    def load(self, state: Any, step: int) -> Any:
        import torchsnapshot
        app = self._app(state)
        torchsnapshot.Snapshot(path=self.target(step)).restore(app_state=app)
        return dict(app["state"])

    def async_save(self, state: Any, step: int) -> Callable[[], None]:
        import torchsnapshot
        pending = torchsnapshot.Snapshot.async_take(path=self.target(step), app_state=self._app(state))
        return lambda: None if pending.wait() else None


SYSTEMS: dict[str, type[_System]] = {"disttrain": _Disttrain, "disttrain-nofsync": _DisttrainPageCache,
                                     "dcp": _DCP, "torchsnapshot": _TorchSnapshot}


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


def measure(state: Any, folder: str, peers: list[str], repeats: int) -> list[dict]:
    """save / load / async rows of disttrain and ``peers`` for one state, interleaved."""
    _quiet()
    names = ["disttrain", *(["disttrain-nofsync"] if "torchsnapshot" in peers else []), *peers]
    systems = {n: SYSTEMS[n](os.path.join(folder, n)) for n in names}
    for s in systems.values():
        os.makedirs(s.folder, exist_ok=True)
    ops = ("save", "load", "async blocked", "async total")
    times: dict[tuple[str, str], list[float]] = {(n, op): [] for n in names for op in ops}
    for n in names:
        if n.startswith("disttrain"):
            systems[n].async_save(state, 0)()  # allocates the writer's staging memory once
            _remove(systems[n].target(0))
    for r in range(repeats + 1):  # round 0 warms every code path and is not counted
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            s = systems[n]
            _remove(s.target(1))
            template = _zeros_like(state)  # a training job has its model and optimizer: not timed
            start = time.perf_counter()
            s.save(state, 1)
            saved = time.perf_counter()
            s.load(template, 1)
            loaded = time.perf_counter()
            del template
            _remove(s.target(2))
            wait = s.async_save(state, 2)
            blocked = time.perf_counter()
            wait()
            done = time.perf_counter()
            if r:
                for op, seconds in zip(ops, (saved - start, loaded - saved, blocked - loaded, done - loaded)):
                    times[(n, op)].append(seconds)
    return [{"system": n, "operation": op, "seconds": min(times[(n, op)]), "durable": systems[n].durable}
            for n in names for op in ops]


# --- kill during a save ---------------------------------------------------------------------------

def _kill_state(nbytes: int, value: float) -> dict:
    n = max(1, nbytes // (8 << 20))
    return {"model": {f"w{i}": torch.full(((8 << 20) // 4,), value) for i in range(n)}, "step": int(value)}


def kill_child(system: str, folder: str, layout: str, nbytes: int) -> int:
    """The child of the kill test: saves step 1, says so, saves step 2 (killed by the parent)."""
    _quiet()
    s = SYSTEMS[system](folder)
    for step in (1, 2):
        state = _kill_state(nbytes, float(step))
        s.save(state, 1 if layout == "same path" else step)
        print(f"saved {step}", flush=True)
    return 0


def _bytes_under(paths: list[str]) -> int:
    total = 0
    for path in paths:
        if os.path.isfile(path):
            try:
                total += os.path.getsize(path)
            except FileNotFoundError:  # renamed or removed meanwhile
                pass
        for root, _, files in os.walk(path):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(root, f))
                except FileNotFoundError:
                    pass
    return total


def _step2_bytes(system: _System, layout: str, step1_bytes: int, truncated: list[bool]) -> int:
    """Bytes of step 2 on disk so far."""
    if system.name == "disttrain":  # the temporary file beside the snapshots
        return _bytes_under([os.path.join(system.folder, f) for f in os.listdir(system.folder) if ".tmp." in f])
    if layout == "one per step":
        return _bytes_under([system.target(2)])
    # Rewritten in place: files opened for writing are truncated first, new ones add to the total.
    now = _bytes_under([system.target(1)])
    truncated[0] = truncated[0] or now < step1_bytes
    return now if truncated[0] else max(0, now - step1_bytes)


def _outcome(system: _System, layout: str, nbytes: int) -> str:
    """What a resuming job loads after the kill."""
    _quiet()
    template = _kill_state(nbytes, 0.0)
    try:
        if system.name == "disttrain":
            path, state = snapshot.load_latest(system.folder)
            if path is None:
                return "error: no snapshot"
        else:
            step = 1 if layout == "same path" else max(
                int(name.rsplit("_", 1)[1]) for name in os.listdir(system.folder) if name.startswith(system.name))
            state = system.load(template, step)
    except BaseException as e:  # noqa: BLE001 - the outcome being measured (DCP's CheckpointException is a BaseException)
        if isinstance(e, KeyboardInterrupt):
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        message = lines[-1].replace(system.folder + os.sep, "") if lines else ""
        return f"error: {type(e).__name__}: {message[:160]}"
    values = {float(t.float().mean()) for t in state["model"].values()}
    exact = {v for v in values if v in (1.0, 2.0)} == values and all(
        bool((t == t.flatten()[0]).all()) for t in state["model"].values())
    if exact and values == {1.0}:
        return "previous"
    if exact and values == {2.0}:
        return "new"
    return "garbage (loaded without an error; values of neither step)"


def kill_test(system_name: str, layout: str, nbytes: int, folder: str, python: str, fraction: float) -> dict:
    """One kill during a save, once step 2 has ``fraction`` of the state's bytes on disk; returns the row."""
    folder = os.path.join(folder, f"kill-{system_name}-{layout.replace(' ', '-')}-{fraction}")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    system = SYSTEMS[system_name](folder)
    cmd = [python, "-m", "disttrain.bench.snapshot_peers", "--kill-child", system_name, folder, layout, str(nbytes)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert child.stdout is not None
    line = child.stdout.readline()
    if line.strip() != "saved 1":
        child.kill()
        child.wait()
        return {"system": system_name, "layout": layout, "kill_at": fraction, "killed": "", "outcome": f"child failed: {line!r}"}
    step1_bytes = _bytes_under([system.target(1)]) if system_name != "disttrain" else 0
    threshold = int(nbytes * fraction)
    written, truncated = 0, [False]
    while child.poll() is None:
        written = _step2_bytes(system, layout, step1_bytes, truncated)
        if written >= threshold:
            break
        time.sleep(0.002)
    if child.poll() is None:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        killed = f"{written / nbytes:.0%} of step 2"
    else:
        rest = child.stdout.read().strip().replace("\n", "; ")
        killed = f"not killed: the child exited {child.returncode} first ({rest})"
    return {"system": system_name, "layout": layout, "kill_at": fraction, "killed": killed,
            "outcome": _outcome(system, layout, nbytes)}


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--kill-child":
        sys.exit(kill_child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
    sys.exit("usage: python -m disttrain.bench.snapshot_peers --kill-child SYSTEM FOLDER LAYOUT BYTES")
