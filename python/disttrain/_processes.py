"""Small helpers shared by the code that starts processes of its own (the
strategies, the benchmarks, ``disttrain.init``, the test harness): a free port,
whether a pid is alive, a process's exit status in words, and ending a set of processes for sure."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterable
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now ("" for every interface)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this host, in this PID namespace)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def describe_exit(code: int | None) -> str:
    """A process's ``exitcode`` as the end of a sentence: "was killed by
    SIGKILL", "exited with status 3", "is still running"."""
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def stop(procs: Iterable[Any], grace: float = 5.0, terminate: bool = False) -> None:
    """Ends every ``multiprocessing`` process in ``procs``: SIGTERM first when
    ``terminate`` is set, then up to ``grace`` seconds each to exit, then SIGKILL.
    Returns when all have been reaped: nothing is left behind."""
    procs = list(procs)
    if terminate:
        for p in procs:
            if p.is_alive():
                p.terminate()
    for p in procs:
        p.join(timeout=grace)
        if p.is_alive():
            p.kill()
            p.join()


def start_single_threaded(procs: Iterable[Any]) -> None:
    """Starts ``procs`` with ``OMP_NUM_THREADS=1`` in their environment (a
    spawned process reads it when it loads torch, before any code of ours
    runs), leaving this process's environment as it was."""
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        for p in procs:
            p.start()
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
