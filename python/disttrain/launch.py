"""Run a function on several ranks from a notebook or a script.

``launch(fn, nproc=2)`` pickles ``fn`` (with cloudpickle, so functions defined
in a notebook work), starts ``nproc`` ranks on this machine, initialises the
process group in each, calls ``fn(*args)`` and returns every rank's return value.

The ranks are started by torchrun's own process layer
(``torch.distributed.elastic.multiprocessing``), with the environment torchrun
gives its workers (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``/``MASTER_PORT``, ``TORCHELASTIC_*``), and their rendezvous
store (a ``TCPStore``, as torchrun's agent hosts it) lives in this process. What
is left out is torchrun's launcher process: one more interpreter that imports
torch before any rank starts, then runs an elastic rendezvous, for restarts and
several nodes, which a launch from a notebook does not use (``disttrain train``
keeps torchrun for those). A 2-rank launch of a function that returns at once
took 7 s through it, 3.3 s this way (2 cores; ``disttrain bench launch``,
docs/launch.md).
"""

from __future__ import annotations

import operator
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Sequence


class LaunchError(RuntimeError):
    """A rank failed; the message holds its traceback."""


def launch(fn: Callable[..., Any], nproc: int = 2, args: Sequence[Any] = (), *, backend: str = "disttrain",
           timeout: float = 600.0, env: dict[str, str] | None = None, quiet: bool = False) -> list[Any]:
    """Runs ``fn(*args)`` on ``nproc`` local ranks and returns their results.

    Args:
        fn: any picklable-by-cloudpickle callable; inside it, ``torch.distributed``
            is initialised (``dist.get_rank()``, collectives, DDP all work). A
            function written for torchrun may call ``dist.init_process_group``
            itself: its group replaces the one made for it.
        nproc: number of ranks (processes) on this machine.
        args: positional arguments passed to ``fn`` in every rank.
        backend: process-group backend (``"disttrain"``, ``"gloo"``).
        timeout: seconds before the whole job is stopped (its ranks ended, then
            :class:`LaunchError`).
        env: extra environment variables for the ranks.
        quiet: do not show the ranks' output (shown as it comes otherwise,
            each line led by ``[rank N]``); it is kept for the error message.

    Returns:
        A list with one return value per rank, indexed by rank.

    Raises:
        LaunchError: a rank raised (the message holds its traceback), ended
            without a result, or the job ran past ``timeout``.

    Example:
        >>> def total():
        ...     t = torch.ones(1) * (dist.get_rank() + 1)
        ...     dist.all_reduce(t)
        ...     return t.item()
        >>> disttrain.launch(total, nproc=2)
        [3.0, 3.0]
    """
    try:
        count = None if isinstance(nproc, bool) else operator.index(nproc)  # int, numpy's integers
    except TypeError:
        count = None
    if count is None or count < 1:
        raise ValueError(f"launch: nproc must be a whole number >= 1, got {nproc!r}")
    nproc = count
    import torch.distributed as dist

    with tempfile.TemporaryDirectory(prefix="disttrain-launch-") as workdir:
        write_payload(workdir, fn, args, backend)
        output = _RankOutput(workdir, nproc, echo=not quiet)
        # The rendezvous store, as torchrun's agent hosts it: bound to a free port by the OS here
        # (no port chosen, then lost to another job, before a rank binds it), every rank a client.
        store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
        try:
            ranks = _start_ranks(workdir, nproc, store.port, env)
            try:
                timed_out, stopped = _wait(ranks, timeout, output.poll)
            except BaseException:  # Ctrl-C (a notebook's interrupt reaches this process only), ...
                _stop(ranks)
                raise
        finally:
            del store
            output.close()  # the lines not shown yet, the last one even without its newline
        # Shown as they came unless quiet; then kept for the error, if there is one.
        shown_in_error = f"\n--- output ---\n{output.text()}" if output.lines else ""
        if timed_out:
            raise LaunchError(f"launch: the job ran past timeout={timeout:g}s; its ranks were stopped{shown_in_error}")
        results, failures = collect_results(workdir, [p.returncode for p in ranks], stopped)
        if failures:
            raise LaunchError("\n".join(failures) + shown_in_error)
        return results


def write_payload(workdir: str, fn: Callable[..., Any], args: Sequence[Any], backend: str) -> None:
    """What every rank runs (disttrain._launch_worker reads it): this process's import path, then
    ``(fn, args, backend)`` pickled with cloudpickle."""
    import cloudpickle

    with open(os.path.join(workdir, "payload.pkl"), "wb") as f:
        # This process's import path first (as multiprocessing's spawn does): a function of a
        # module found through a sys.path entry added here (a notebook's, pytest's) is pickled by
        # reference, and the ranks must find that module too.
        pickle.dump([os.path.abspath(p) if p else os.getcwd() for p in sys.path], f)
        cloudpickle.dump((fn, tuple(args), backend), f)


def rank_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with ``env`` for the ranks: one thread unless set, and this very
    package importable, wherever it was imported from."""
    base = dict(os.environ, **(env or {}))
    base.setdefault("OMP_NUM_THREADS", "1")
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, base.get("PYTHONPATH")]))
    return base


def collect_results(workdir: str, exit_codes: list[int | None], stopped: list[int]) -> tuple[list[Any], list[str]]:
    """Each rank's return value (None where it has none) and a line per rank that failed, naming
    how it ended (``exit_codes``; ``stopped``: the ranks stopped after another failed)."""
    results: list[Any] = []
    failures: list[str] = []
    for rank, code in enumerate(exit_codes):
        path = os.path.join(workdir, f"result_{rank}.pkl")
        if not os.path.exists(path):
            failures.append(f"rank {rank} produced no result: it {_ended(code)} before returning"
                            + (" (stopped after another rank failed)" if rank in stopped else ""))
            results.append(None)
            continue
        try:
            with open(path, "rb") as f:
                ok, value = pickle.load(f)
        except Exception as e:  # the rank died while writing it
            failures.append(f"rank {rank} left an unreadable result ({type(e).__name__}: {e}; it {_ended(code)})")
            results.append(None)
            continue
        if not ok:
            failures.append(f"rank {rank} failed:\n{value}")
        results.append(value if ok else None)
    return results, failures


def _start_ranks(workdir: str, nproc: int, port: int, env: dict[str, str] | None) -> list[subprocess.Popen]:
    """The ranks, each ``python -m disttrain._launch_worker`` started by torchrun's own process
    layer (torch.distributed.elastic.multiprocessing), in a session of its own (a terminal's Ctrl-C
    reaches this process, which stops them); each writes its stdout and stderr to
    ``workdir``/output_<rank>.log itself (files opened here would stay open in this process)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std, start_processes

    base = rank_environment(env)
    base["PYTHONUNBUFFERED"] = "1"  # a rank killed mid-job has written what it printed
    run_id = uuid.uuid4().hex
    # torchrun's names and values for a one-node job (what its agent gives each worker).
    envs = {rank: dict(base, RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", ROLE_RANK=str(rank),
                       ROLE_NAME="default", WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_WORLD_SIZE="1",
                       ROLE_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RUN_ID=run_id,
                       TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0")
            for rank in range(nproc)}
    # It registers handlers for SIGINT, SIGTERM, SIGHUP and SIGQUIT in this process (torchrun's
    # agent is a process of its own): a notebook's or a script's are put back.
    signals = [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, n)]
    main_thread = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.getsignal(sig) for sig in signals} if main_thread else {}
    try:
        context = start_processes(name="disttrain-launch", entrypoint=sys.executable,
                                  args={rank: ("-m", "disttrain._launch_worker", workdir) for rank in range(nproc)},
                                  envs=envs, logs_specs=DefaultLogsSpecs(log_dir=os.path.join(workdir, "logs"),
                                                                         redirects=Std.NONE, tee=Std.NONE))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return [context.subprocess_handlers[rank].proc for rank in range(nproc)]  # type: ignore[attr-defined]


class _RankOutput:
    """The ranks' output files (each rank writes its own, _launch_worker._output_to), read as
    they grow: each complete line, led by ``[rank N]``, printed here as it comes (``echo``), or
    else kept for an error message. Read on the launch's own poll (_wait), at most 0.1 s late."""

    def __init__(self, workdir: str, nproc: int, echo: bool):
        self.paths = [os.path.join(workdir, f"output_{rank}.log") for rank in range(nproc)]
        self.files: list[Any] = [None] * nproc
        self.partial = [b""] * nproc  # each rank's line so far, its newline not written yet
        self.lines: list[str] = []
        self.echo = echo

    def poll(self, final: bool = False) -> None:
        for rank, path in enumerate(self.paths):
            if self.files[rank] is None:
                try:
                    self.files[rank] = open(path, "rb")
                except FileNotFoundError:  # not started writing yet (or it never will)
                    continue
            *complete, self.partial[rank] = (self.partial[rank] + self.files[rank].read()).split(b"\n")
            if final and self.partial[rank]:
                complete.append(self.partial[rank])
                self.partial[rank] = b""
            for line in complete:
                text = f"[rank {rank}] {line.decode(errors='replace').rstrip(chr(13))}"
                if self.echo:
                    print(text, flush=True)
                else:  # kept for the error message; shown, it is not kept (a long job's output)
                    self.lines.append(text)

    def close(self) -> None:
        try:
            self.poll(final=True)
        finally:
            for f in self.files:
                if f is not None:
                    f.close()

    def text(self) -> str:
        return "\n".join(self.lines)


def _wait(ranks: list[subprocess.Popen], timeout: float, tick: Callable[[], None]) -> tuple[bool, list[int]]:
    """Waits for every rank, calling ``tick`` (the output's poll) at least every 0.1 s; once one
    fails, the others are stopped (as torchrun does: a rank still in a collective with it would
    wait for the group timeout). -> (whether the job ran past ``timeout``, the ranks stopped here)."""
    deadline = time.monotonic() + timeout
    while True:
        tick()
        codes = [p.poll() for p in ranks]
        if all(c is not None for c in codes):
            return False, []
        if any(c not in (None, 0) for c in codes):
            return False, _stop(ranks)
        if time.monotonic() > deadline:
            return True, _stop(ranks)
        try:  # sleeps until the first unfinished rank ends, at most 0.1 s: no busy wait
            next(p for p in ranks if p.returncode is None).wait(0.1)
        except subprocess.TimeoutExpired:
            pass


def _stop(ranks: list[subprocess.Popen], grace: float = 10.0) -> list[int]:
    """Ends the ranks still running: SIGTERM to each one's session, SIGKILL to those still there
    after ``grace`` seconds (or at a second Ctrl-C). -> the ranks it stopped."""
    stopped = [rank for rank, p in enumerate(ranks) if p.poll() is None]
    running = [ranks[rank] for rank in stopped]
    for p in running:
        _signal(p, signal.SIGTERM)
    try:
        deadline = time.monotonic() + grace
        for p in running:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for p in running:
            if p.poll() is None:
                _signal(p, signal.SIGKILL)
                p.wait()
    return stopped


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the rank and anything it started
    except ProcessLookupError:
        pass


def _ended(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
