"""Multi-process test harness: a test names its world size, the harness starts
the ranks as processes (each with the launcher environment torchrun would give
it and a free port), runs the test function in every rank and reports the
failing rank's traceback.

    def _check(rank, world_size, n):
        t = torch.ones(n); dist.all_reduce(t); assert t[0] == world_size
        return t.sum().item()

    def test_allreduce():
        results = run_ranks(_check, world_size=3, args=(10,))

The function must live at module level (it is pickled by name).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import glob
import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Any, Callable, Iterator, Sequence

from disttrain._processes import free_port, stop


# Ranks are forked from one server process that has imported these once per
# test session (``forkserver``), instead of each importing torch afresh as a
# spawned process would: 2-3 s of CPU per rank on these cores, most of the
# multi-process tests' cost. Forking after importing torch is what its own
# DataLoader workers do.
_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "disttrain"]


def shared_memory_segments() -> set[str]:
    """The disttrain segments in /dev/shm now."""
    return set(glob.glob("/dev/shm/disttrain-*"))


@contextlib.contextmanager
def no_leftover_shared_memory() -> Iterator[None]:
    """Fails if what runs inside leaves a disttrain segment behind in /dev/shm, crash or not
    (conftest applies it to every test; a module fixture whose launches run before any test's
    own check applies it itself)."""
    before = shared_memory_segments()
    yield
    leftover = shared_memory_segments() - before
    assert not leftover, f"shared-memory segments left behind: {sorted(leftover)}"


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _rank_main(fn, rank, world_size, args, env, backend, pg_timeout, results, store_port):
    try:
        # The environment a spawned rank would have had: the test's own at
        # run_ranks time (the server's is the one it started with), plus env.
        os.environ.clear()
        os.environ.update(env)
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                           "LOCAL_WORLD_SIZE": str(world_size)})
        import torch
        torch.set_num_threads(1)
        import torch.distributed as dist
        import disttrain  # noqa: F401  (registers the backend)
        if backend is not None:
            timeout = datetime.timedelta(seconds=pg_timeout)
            store = dist.TCPStore("127.0.0.1", store_port, world_size, is_master=False, timeout=timeout)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        value = fn(rank, world_size, *args)
        if backend is not None and dist.is_initialized():
            dist.destroy_process_group()
        results.put(("ok", rank, value))
    except BaseException:  # report everything, including SystemExit
        results.put(("error", rank, traceback.format_exc()))
    finally:
        # A forked process ends with os._exit, which skips the atexit handlers a
        # spawned rank (and a torchrun one) runs: DISTTRAIN_TRACE writes its file in one.
        atexit._run_exitfuncs()


def transport_env(transport: str) -> dict[str, Any]:
    """``run_ranks`` keyword arguments that put a job on a disttrain transport:
    ``"shm"``, ``"tcp"``, or ``"mixed"`` (ranks 2k and 2k+1 share a "host", told
    apart by ``DISTTRAIN_HOST_ID``: shared memory within, TCP between)."""
    if transport == "mixed":
        return {"env": {"DISTTRAIN_TRANSPORT": "auto"}, "rank_env": lambda r: {"DISTTRAIN_HOST_ID": f"host{r // 2}"}}
    return {"env": {"DISTTRAIN_TRANSPORT": transport}}


class RankFailure(AssertionError):
    pass


def run_ranks(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), *,
              backend: str | None = "disttrain", timeout: float = 120.0, pg_timeout: float = 60.0,
              env: dict[str, str] | None = None, rank_env: Callable[[int], dict[str, str]] | None = None,
              expect_exit: Sequence[int] = ()) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` processes.

    Args:
        fn: module-level function; its return value must be picklable.
        backend: process-group backend to initialise, or None for none.
        timeout: seconds for the whole job before it is killed and reported.
        pg_timeout: the process group's own timeout (seconds).
        env: extra environment variables for every rank.
        rank_env: ``rank -> dict`` of further variables for one rank (called here,
            in the parent, so it may be a lambda).
        expect_exit: ranks that are allowed to die without a result (fault tests).

    Returns:
        The return values, indexed by rank (None for ranks in ``expect_exit``).
    """
    import torch.distributed as dist

    ctx = _context()
    results = ctx.Queue()
    # The store lives in this process, as torchrun's lives in its agent: it
    # outlasts any rank, so fault tests see what a real job would.
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=pg_timeout),
                          wait_for_workers=False)
    base_env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    base_env.update(env or {})
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, tuple(args),
                                                   {**base_env, **(rank_env(r) if rank_env else {})}, backend,
                                                   pg_timeout, results, store.port), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcome: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < world_size:
            try:
                status, rank, value = results.get(timeout=0.2)
                outcome[rank] = (status, value)
                continue
            except queue.Empty:
                pass
            dead_without_result = [r for r, p in enumerate(procs)
                                   if not p.is_alive() and r not in outcome]
            if dead_without_result:
                # Give its queue message a moment to arrive before judging.
                time.sleep(0.5)
                while not results.empty():
                    status, rank, value = results.get()
                    outcome[rank] = (status, value)
                for r in dead_without_result:
                    if r not in outcome:
                        if r in expect_exit:
                            outcome[r] = ("ok", None)
                        else:
                            outcome[r] = ("error", f"rank {r} exited with code {procs[r].exitcode} "
                                                   f"without reporting")
            if time.monotonic() > deadline:
                missing = [r for r in range(world_size) if r not in outcome]
                raise RankFailure(f"ranks {missing} did not finish within {timeout:.0f} s")
    finally:
        stop(procs, grace=5)
        del store
    failures = {r: v for r, (s, v) in outcome.items() if s == "error"}
    if failures:
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
        raise RankFailure(f"{len(failures)} of {world_size} ranks failed:\n{text}")
    return [outcome[r][1] for r in range(world_size)]


class Boom(Exception):
    """A failure raised midway through a backward (``on_backward(x, boom)``)."""


def boom() -> None:
    raise Boom("a NaN check in backward")


def on_backward(x: Any, callback: Callable[[], None]) -> Any:
    """``x`` unchanged; when backward reaches it, ``callback()`` runs before the gradient goes on: a
    marker that records when backward gets there, or a failure raised midway through a backward."""
    import torch

    class _Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, grad):
            callback()
            return grad

    return _Identity.apply(x)


def package_pythonpath() -> str:
    """PYTHONPATH for a subprocess that must import the same disttrain as the tests (installed, or
    the checkout's python/): the package's parent folder first, then this process's PYTHONPATH."""
    import disttrain

    parent = os.path.dirname(os.path.dirname(os.path.abspath(disttrain.__file__)))
    return os.pathsep.join(p for p in (parent, os.environ.get("PYTHONPATH")) if p)


def package_env(threads: int = 1) -> dict[str, str]:
    """The environment of a process of its own running this package: no rank variables of a
    surrounding job, package_pythonpath(), ``threads`` OpenMP threads."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = package_pythonpath()
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def train_two_ranks(folder) -> None:
    """The README's main job as a real process: `disttrain train --nproc-per-node 2` on the digits
    (4 epochs, batch 32, one thread a rank), its run in ``<folder>/two`` (metrics.csv there). The
    advisor's tests read it as a user's run and predict it (conftest's ``two_rank_cpu_run``)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "disttrain", "train", "--nproc-per-node", "2", "-e", "4", "-b", "32",
                          "-s", str(folder), "--save-name", "two", "--no-progress"], capture_output=True, text=True,
                         env=package_env(), cwd=os.path.dirname(os.path.abspath(folder)), timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
