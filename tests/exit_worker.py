"""Rank side of the exit tests (tests/test_exit.py, scripts/soak_exit.sh).

Started by torchrun, on one host or inside a network namespace (one namespace
= one host). A disttrain group and a gloo group side by side (either one the
default), a few all-reduces and barriers on both, then the script ends the way
``--teardown`` says. Writes ``rank_<r>.json`` before its teardown (and
``pending_<r>.json`` after it when an op was left pending), so the test knows
the work was done whatever the exit status says.

    python -m torch.distributed.run ... tests/exit_worker.py OUT_DIR \\
        --default disttrain|gloo --teardown none|destroy|sub-first [--pending [--linger S]] [--hold]

With --pending, rank 0 leaves an all_reduce no other rank joins, and the
others keep their groups for --linger seconds before their own teardown: rank
0's teardown must not wait for them (nor for the group timeout).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch
import torch.distributed as dist

import disttrain  # noqa: F401  (registers the backend)
from disttrain._atomic import write_atomically

# --hold keeps the subgroup here, as a trainer object would: it then outlives
# destroy_process_group() and goes only with the interpreter.
HELD: list = []


def _write(out_dir: str, name: str, payload: dict) -> None:
    write_atomically(os.path.join(out_dir, name), lambda f: json.dump(payload, f), durable=False)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--default", choices=("disttrain", "gloo"), default="disttrain")
    p.add_argument("--teardown", choices=("none", "destroy", "sub-first"), default="none",
                   help="none: the script just returns; destroy: destroy_process_group(); "
                        "sub-first: the subgroup, then the default group")
    p.add_argument("--pending", action="store_true",
                   help="rank 0 leaves a disttrain all_reduce pending that no other rank joins")
    p.add_argument("--linger", type=float, default=3.0,
                   help="with --pending: seconds the other ranks keep their groups before tearing down")
    p.add_argument("--hold", action="store_true", help="keep the subgroup referenced until the interpreter exits")
    a = p.parse_args()

    torch.set_num_threads(1)
    sub_backend = "gloo" if a.default == "disttrain" else "disttrain"
    dist.init_process_group(a.default, timeout=datetime.timedelta(seconds=60))
    sub = dist.new_group(backend=sub_backend)
    if a.hold:
        HELD.append(sub)
    disttrain_group = None if a.default == "disttrain" else sub
    rank, world = dist.get_rank(), dist.get_world_size()

    correct = True
    for i in range(3):
        for group in (None, sub):
            t = torch.full((1000,), float(rank + i))
            dist.all_reduce(t, group=group)
            correct &= bool(torch.all(t == world * (world - 1) / 2 + world * i))
            dist.barrier(group=group)
    # As many scripts end: ops on temporaries, the last reference to their
    # tensors held by the ops themselves.
    dist.all_reduce(torch.ones(100))
    dist.all_reduce(torch.ones(100), group=sub)
    dist.barrier(group=sub)
    _write(a.out_dir, f"rank_{rank}.json", {"rank": rank, "world": world, "correct": correct,
                                             "package": os.path.dirname(disttrain.__file__)})

    pending = None
    if a.pending and rank == 0:
        pending = dist.all_reduce(torch.ones(1 << 16), group=disttrain_group, async_op=True)
        time.sleep(0.2)  # in progress: waiting for ranks that never join
    elif a.pending:
        time.sleep(a.linger)  # alive, groups and all: rank 0's op would wait for us
    _write(a.out_dir, f"teardown_{rank}.json", {"time": time.time()})  # compared with the exit's time
    start = time.monotonic()
    if a.teardown == "sub-first":
        dist.destroy_process_group(sub)
    if a.teardown != "none":
        dist.destroy_process_group()
    if pending is not None and a.teardown != "none":
        try:
            pending.wait()
            error = None
        except Exception as e:  # noqa: BLE001 - reported to the test
            error = f"{type(e).__name__}: {e}"
        _write(a.out_dir, f"pending_{rank}.json",
               {"error": error, "teardown_seconds": time.monotonic() - start})


if __name__ == "__main__":
    main()
