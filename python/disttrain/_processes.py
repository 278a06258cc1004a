"""Small helpers shared by the code that starts processes of its own (the
strategies, the benchmarks, ``disttrain.init``): a free port, and a process's
exit status in words."""

from __future__ import annotations

import signal
import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now ("" for every interface)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
