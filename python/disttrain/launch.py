"""Run a function on several ranks from a notebook or a script.

``launch(fn, nproc=2)`` pickles ``fn`` (with cloudpickle, so functions defined
in a notebook work), starts ``nproc`` ranks through PyTorch's elastic launcher
(the engine behind torchrun), initialises the process group in each, calls
``fn(*args)`` and returns every rank's return value.
"""

from __future__ import annotations

import operator
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from typing import Any, Callable, Sequence


class LaunchError(RuntimeError):
    """A rank failed; the message holds its traceback."""


def launch(fn: Callable[..., Any], nproc: int = 2, args: Sequence[Any] = (), *, backend: str = "disttrain",
           timeout: float = 600.0, env: dict[str, str] | None = None, quiet: bool = False) -> list[Any]:
    """Runs ``fn(*args)`` on ``nproc`` local ranks and returns their results.

    Args:
        fn: any picklable-by-cloudpickle callable; inside it, ``torch.distributed``
            is initialised (``dist.get_rank()``, collectives, DDP all work).
        nproc: number of ranks (processes) on this machine.
        args: positional arguments passed to ``fn`` in every rank.
        backend: process-group backend (``"disttrain"``, ``"gloo"``).
        timeout: seconds before the whole job is stopped (its ranks ended, then
            :class:`LaunchError`).
        env: extra environment variables for the ranks.
        quiet: do not echo the ranks' output.

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
    import cloudpickle

    try:
        count = None if isinstance(nproc, bool) else operator.index(nproc)  # int, numpy's integers
    except TypeError:
        count = None
    if count is None or count < 1:
        raise ValueError(f"launch: nproc must be a whole number >= 1, got {nproc!r}")
    nproc = count
    with tempfile.TemporaryDirectory(prefix="disttrain-launch-") as workdir:
        with open(os.path.join(workdir, "payload.pkl"), "wb") as f:
            # This process's import path first (as multiprocessing's spawn does): a function of a
            # module found through a sys.path entry added here (a notebook's, pytest's) is pickled by
            # reference, and the ranks must find that module too.
            pickle.dump([os.path.abspath(p) if p else os.getcwd() for p in sys.path], f)
            cloudpickle.dump((fn, tuple(args), backend), f)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "disttrain._launch_worker", workdir]
        child_env = dict(os.environ, **(env or {}))
        child_env.setdefault("OMP_NUM_THREADS", "1")
        # The ranks must import this very package, wherever it was imported from.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, child_env.get("PYTHONPATH")]))
        proc = subprocess.Popen(cmd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        timed_out = False
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            stdout = _stop(proc)
        except BaseException:  # Ctrl-C (a notebook's interrupt reaches this process only), ...
            _stop(proc)
            raise
        output = "\n".join(line for line in stdout.splitlines()
                           if "OMP_NUM_THREADS" not in line and not line.strip().startswith(("W1", "*****")))
        if timed_out:
            raise LaunchError(f"launch: the job ran past timeout={timeout:g}s; its ranks were stopped"
                              + (f"\n--- output ---\n{output}" if output.strip() else ""))
        if not quiet and output.strip():
            print(output)
        results: list[Any] = []
        failures: list[str] = []
        for rank in range(nproc):
            path = os.path.join(workdir, f"result_{rank}.pkl")
            if not os.path.exists(path):
                failures.append(f"rank {rank} produced no result: it exited or was killed before returning "
                                f"(launcher exit code {proc.returncode}; the launcher's report says how)")
                results.append(None)
                continue
            try:
                with open(path, "rb") as f:
                    ok, value = pickle.load(f)
            except Exception as e:  # the rank died while writing it
                failures.append(f"rank {rank} left an unreadable result ({type(e).__name__}: {e}; "
                                f"exit code {proc.returncode})")
                results.append(None)
                continue
            if not ok:
                failures.append(f"rank {rank} failed:\n{value}")
            results.append(value if ok else None)
        if failures:
            raise LaunchError("\n".join(failures) + (f"\n--- output ---\n{output}" if quiet else ""))
        return results


def _stop(proc: subprocess.Popen) -> str:
    """Ends the elastic launcher and its ranks (each in a session of its own, so
    only the launcher can reach them): SIGTERM, which it forwards to the ranks and
    waits for, then SIGKILL. Returns what it printed."""
    proc.send_signal(signal.SIGTERM)
    try:
        stdout, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()  # the ranks then die with their parent (PR_SET_PDEATHSIG, set in _launch_worker)
        stdout, _ = proc.communicate()
    except BaseException:  # a second Ctrl-C
        proc.kill()
        proc.wait()
        raise
    return stdout or ""
