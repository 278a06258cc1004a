"""Rank side of :func:`disttrain.launch`, which starts it with torchrun's environment."""

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


def main(workdir: str) -> int:
    _die_with_parent()
    rank = int(os.environ.get("RANK", "0"))
    _output_to(os.path.join(workdir, f"output_{rank}.log"))
    try:
        with open(os.path.join(workdir, "payload.pkl"), "rb") as f:
            parent_path = pickle.load(f)
            sys.path[:] = parent_path + [p for p in sys.path if p not in parent_path]
            fn, args, backend = pickle.load(f)
        import torch.distributed as dist

        import disttrain

        disttrain.init(backend=backend)
        value = fn(*args)
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
