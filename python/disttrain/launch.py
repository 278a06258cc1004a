"""Run a function on several ranks from a notebook or a script.

``launch(fn, nproc=2)`` pickles ``fn`` (with cloudpickle, so functions defined
in a notebook work), starts ``nproc`` ranks through PyTorch's elastic launcher
(the engine behind torchrun), initialises the process group in each, calls
``fn(*args)`` and returns every rank's return value.
"""

from __future__ import annotations

import os
import pickle
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
        timeout: seconds before the whole job is stopped.
        env: extra environment variables for the ranks.
        quiet: do not echo the ranks' output.

    Returns:
        A list with one return value per rank, indexed by rank.

    Raises:
        LaunchError: a rank raised; the message holds its traceback.

    Example:
        >>> def total():
        ...     t = torch.ones(1) * (dist.get_rank() + 1)
        ...     dist.all_reduce(t)
        ...     return t.item()
        >>> disttrain.launch(total, nproc=2)
        [3.0, 3.0]
    """
    import cloudpickle

    if nproc < 1:
        raise ValueError(f"launch: nproc must be >= 1, got {nproc}")
    with tempfile.TemporaryDirectory(prefix="disttrain-launch-") as workdir:
        with open(os.path.join(workdir, "payload.pkl"), "wb") as f:
            cloudpickle.dump((fn, tuple(args), backend), f)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "disttrain._launch_worker", workdir]
        child_env = dict(os.environ, **(env or {}))
        child_env.setdefault("OMP_NUM_THREADS", "1")
        # The ranks must import this very package, wherever it was imported from.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, child_env.get("PYTHONPATH")]))
        proc = subprocess.run(cmd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
        output = "\n".join(line for line in proc.stdout.splitlines()
                           if "OMP_NUM_THREADS" not in line and not line.strip().startswith(("W1", "*****")))
        if not quiet and output.strip():
            print(output)
        results: list[Any] = []
        failures: list[str] = []
        for rank in range(nproc):
            path = os.path.join(workdir, f"result_{rank}.pkl")
            if not os.path.exists(path):
                failures.append(f"rank {rank} produced no result (exit code {proc.returncode})")
                results.append(None)
                continue
            with open(path, "rb") as f:
                ok, value = pickle.load(f)
            if not ok:
                failures.append(f"rank {rank} failed:\n{value}")
            results.append(value if ok else None)
        if failures:
            raise LaunchError("\n".join(failures) + (f"\n--- output ---\n{output}" if quiet else ""))
        return results
