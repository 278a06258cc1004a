"""Rank side of :func:`disttrain.launch`, which starts it with torchrun's environment."""

import functools
import os
import pickle
import sys
import traceback


def _die_with_parent() -> None:
    """SIGKILL this rank when the launching process dies (each rank runs in a session
    of its own: a launcher killed outright would leave the ranks running)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _output_to(path: str) -> None:
    """This rank's stdout and stderr (the file descriptors: C++ and child processes too) to ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


# The default group this rank made for fn, while fn runs (None otherwise).
_made = None


def _let_fn_init_its_own_group(dist) -> None:
    """A function written for torchrun or torch.multiprocessing.spawn starts with
    ``dist.init_process_group(...)``, which raised 'trying to initialize the default process
    group twice!' here. Such a call, while ``fn`` runs, first destroys the group this rank made
    for it (if it is still the default one), then makes the one ``fn`` asks for, with its own
    arguments (backend, timeout, options), from the same torchrun environment. Installed before
    fn's module is imported, so ``from torch.distributed import init_process_group`` gets it too."""
    original = dist.init_process_group

    @functools.wraps(original)
    def init_process_group(*args, **kwargs):
        if _made is not None and dist.is_initialized() and dist.group.WORLD is _made:
            dist.destroy_process_group()
        return original(*args, **kwargs)

    dist.init_process_group = init_process_group
    dist.distributed_c10d.init_process_group = init_process_group


def main(workdir: str) -> int:
    global _made
    _die_with_parent()
    rank = int(os.environ.get("RANK", "0"))
    _output_to(os.path.join(workdir, f"output_{rank}.log"))
    try:
        import torch.distributed as dist

        _let_fn_init_its_own_group(dist)
        with open(os.path.join(workdir, "payload.pkl"), "rb") as f:
            parent_path = pickle.load(f)
            sys.path[:] = parent_path + [p for p in sys.path if p not in parent_path]
            fn, args, backend = pickle.load(f)
        import disttrain

        disttrain.init(backend=backend)
        _made = dist.group.WORLD
        try:
            value = fn(*args)
        finally:
            _made = None
        if dist.is_initialized():  # fn may end as a script does, destroying the group itself
            dist.destroy_process_group()
        outcome = (True, value)
    except BaseException:  # report everything to the launching process
        outcome = (False, traceback.format_exc())
    try:
        data = pickle.dumps(outcome)
    except Exception as e:  # the return value cannot travel back
        outcome = (False, f"rank {rank}'s return value ({type(outcome[1]).__name__}) cannot be pickled: "
                          f"{type(e).__name__}: {e}")
        data = pickle.dumps(outcome)
    with open(os.path.join(workdir, f"result_{rank}.pkl"), "wb") as f:
        f.write(data)
    return 0 if outcome[0] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
