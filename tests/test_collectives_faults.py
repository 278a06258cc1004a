"""Faults end in a clear error on every rank within the group timeout, or, for
a stray connection, in nothing at all."""

import os
import re
import signal
import socket
import threading
import time

import pytest
import torch
import torch.distributed as dist

from harness import run_ranks, transport_env

# Every fault test runs over both same-host transports; those with 3 ranks
# also "mixed": ranks 0-1 on one host (shared memory), rank 2 on another (TCP).
SAME_HOST = pytest.mark.parametrize("transport", ["shm", "tcp"])
WITH_MIXED = pytest.mark.parametrize("transport", ["shm", "tcp", "mixed"])


def env(transport):
    return transport_env(transport)


def _backend():
    return dist.group.WORLD._get_backend(torch.device("cpu"))


def _killed_mid_allreduce(rank, world):
    victim = world - 1
    t = torch.ones(4 << 20)
    if rank == victim:
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    start = time.monotonic()
    try:
        for _ in range(10_000):
            op_start = time.monotonic()
            dist.all_reduce(t)
    except Exception as e:  # noqa: BLE001 - the test inspects whatever was raised
        return {"error": str(e), "type": type(e).__name__, "op_seconds": time.monotonic() - op_start}
    return {"error": None, "seconds": time.monotonic() - start}


@WITH_MIXED
def test_killed_rank_makes_every_other_rank_raise_naming_it(transport):
    results = run_ranks(_killed_mid_allreduce, 3, pg_timeout=30, expect_exit=[2], **env(transport))
    for r in (0, 1):
        res = results[r]
        assert res["error"] is not None, f"rank {r} never noticed the dead rank"
        assert "rank 2" in res["error"], res["error"]
        assert res["type"] == "DistBackendError"
        assert res["op_seconds"] < 30
    assert results[0]["error"] == results[1]["error"], "ranks report different errors"


def _mismatched_shapes(rank, world):
    try:
        dist.all_reduce(torch.ones(100 if rank == 0 else 200))
    except Exception as e:  # noqa: BLE001
        return str(e)
    return None


@SAME_HOST
def test_mismatched_shapes_raise_the_same_error_everywhere(transport):
    a, b = run_ranks(_mismatched_shapes, 2, pg_timeout=30, **env(transport))
    assert a is not None and a == b
    assert "collective mismatch" in a and "seq=0" in a
    assert "numel=100" in a and "numel=200" in a


def _root_mismatch(rank, world, op):
    """Rank 1 names itself the root, the others rank 0."""
    root = 1 if rank == 1 else 0
    t = torch.full((1000,), float(rank))
    start = time.monotonic()
    try:
        if op == "broadcast":
            dist.broadcast(t, src=root)
        elif op == "gather":
            dist.gather(t, [torch.empty(1000) for _ in range(world)] if rank == root else None, dst=root)
        else:
            dist.scatter(t, [torch.full((1000,), 7.0) for _ in range(world)] if rank == root else None, src=root)
    except Exception as e:  # noqa: BLE001
        return {"error": str(e), "seconds": time.monotonic() - start}
    return {"error": None, "value": t[0].item()}


@SAME_HOST
@pytest.mark.parametrize("op", ["broadcast", "gather", "scatter"])
def test_root_mismatch_raises_on_every_rank_in_the_op(transport, op):
    """Over TCP a broadcast or scatter whose ranks named different roots returned wrong data on
    some ranks, and a gather hung until the group timeout: every rank now raises the mismatch in
    that op, naming both roots."""
    results = run_ranks(_root_mismatch, 3, args=(op,), pg_timeout=30, **env(transport))
    for r, res in enumerate(results):
        assert res["error"] is not None, f"rank {r} returned {res} from a {op} with mismatched roots"
        assert "collective mismatch" in res["error"] and "root=0" in res["error"] and "root=1" in res["error"], res
        assert res["seconds"] < 10, f"rank {r} raised only at the timeout: {res}"
    assert len({res["error"] for res in results}) == 1, results


def _split_disagreement(rank, world):
    """Rank 0 expects 3 elements from rank 1, which sends it 2 (and expects from rank 0 the 3 it
    sends): only the pair's split sizes disagree."""
    out = torch.empty(5 if rank == 0 else 6)
    start = time.monotonic()
    try:
        dist.all_to_all_single(out, torch.arange(5.0), output_split_sizes=[2, 3] if rank == 0 else [3, 3],
                               input_split_sizes=[2, 3])
    except Exception as e:  # noqa: BLE001
        return {"error": str(e), "seconds": time.monotonic() - start}
    return {"error": None, "out": out.tolist()}


@SAME_HOST
def test_all_to_all_split_disagreement_raises_on_both_ranks_of_the_pair(transport):
    """Rank 1 received what it expected and returned (its output looked right), and raised only at
    its next op; rank 0 raised. Now both raise in the op, naming both counts of the pair."""
    results = run_ranks(_split_disagreement, 2, pg_timeout=30, **env(transport))
    for r, res in enumerate(results):
        assert res["error"] is not None, f"rank {r} returned {res} from an all_to_all its peer disagreed with"
        assert "collective mismatch" in res["error"] and "all_to_all" in res["error"], res
        assert re.search(r"numel(_back)?=2\b", res["error"]) and re.search(r"numel(_back)?=3\b", res["error"]), res
        assert res["seconds"] < 10, f"rank {r} raised only at the timeout: {res}"


def _skips_collective(rank, world):
    try:
        if rank != 1:
            dist.all_reduce(torch.ones(10))
        dist.barrier()
    except Exception as e:  # noqa: BLE001
        return str(e)
    return None


@WITH_MIXED
def test_rank_that_skips_a_collective_is_reported(transport):
    results = run_ranks(_skips_collective, 3, pg_timeout=30, **env(transport))
    assert all(r is not None for r in results), results
    assert len(set(results)) == 1, results
    assert "allreduce" in results[0] and "barrier" in results[0]


def _silent_peer(rank, world):
    if rank == 1:
        time.sleep(8)  # never joins the collective
        return None
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(10))
    except Exception as e:  # noqa: BLE001
        return {"error": str(e), "seconds": time.monotonic() - start}
    return {"error": None}


@SAME_HOST
def test_silent_peer_times_out_within_the_group_timeout(transport):
    results = run_ranks(_silent_peer, 2, pg_timeout=3, **env(transport))
    res = results[0]
    assert res["error"] is not None and "timeout" in res["error"] and "rank(s) 1" in res["error"], res
    assert 2.5 < res["seconds"] < 10


def _stray_connections(rank, world):
    backend = _backend()
    host, port = backend.address.rsplit(":", 1)
    if rank == 0:
        def knock():
            garbage = socket.create_connection((host, int(port)))
            garbage.sendall(os.urandom(4096))
            wrong_secret = socket.create_connection((host, int(port)))
            wrong_secret.sendall(b"DHEL" + (1).to_bytes(4, "little") + world.to_bytes(4, "little") + b"\0" * 16)
            silent = socket.create_connection((host, int(port)))
            time.sleep(0.5)
            for s in (garbage, wrong_secret, silent):
                s.close()
        knocker = threading.Thread(target=knock)
        knocker.start()
    for i in range(30):
        t = torch.full((1 << 18,), float(rank + i))
        dist.all_reduce(t)
        assert torch.equal(t, torch.full((1 << 18,), float(sum(r + i for r in range(world)))))
    if rank == 0:
        knocker.join()
        time.sleep(0.3)
    return backend.rejected_connections


@SAME_HOST
def test_stray_connections_are_dropped_without_disturbing_the_job(transport):
    rejected = run_ranks(_stray_connections, 2, pg_timeout=30, **env(transport))
    assert rejected[0] >= 3


def _bad_input(rank, world):
    errors = {}
    for name, call in {
        "band_float": lambda: dist.all_reduce(torch.ones(3), op=dist.ReduceOp.BAND),
        "avg_bool": lambda: dist.all_reduce(torch.ones(3, dtype=torch.bool), op=dist.ReduceOp.AVG),
        "send_to_self": lambda: dist.send(torch.ones(3), dst=rank),
        "gather_wrong_size": lambda: dist.all_gather_into_tensor(torch.empty(5), torch.ones(3)),
        "uneven_split": lambda: dist.all_to_all_single(torch.empty(5), torch.ones(5)),
    }.items():
        try:
            call()
            errors[name] = None
        except Exception as e:  # noqa: BLE001
            errors[name] = (type(e).__name__, str(e))
    # The group still works after rejected calls.
    t = torch.ones(3)
    dist.all_reduce(t)
    errors["still_works"] = t.tolist()
    return errors


@SAME_HOST
def test_bad_input_is_a_clear_error_and_leaves_the_group_usable(transport):
    res = run_ranks(_bad_input, 2, **env(transport))[0]
    assert res["band_float"][0] == "ValueError" and "BAND" in res["band_float"][1]
    assert res["avg_bool"][0] == "ValueError"
    assert res["send_to_self"] is not None
    assert res["gather_wrong_size"][0] == "ValueError" and "2 x 3" in res["gather_wrong_size"][1]
    assert res["uneven_split"][0] == "ValueError" and "not divisible" in res["uneven_split"][1]
    assert res["still_works"] == [2.0, 2.0, 2.0]


def _shutdown_during_caller_thread_all_reduce(rank, world):
    # Rank 0 waits in a small synchronous all-reduce (on its own thread, over
    # shared memory) that rank 1 never joins; another thread shuts the group
    # down: the all-reduce raises at once, naming the shutdown, not at the timeout.
    if rank == 1:
        time.sleep(4)
        return None
    backend = _backend()
    threading.Timer(0.5, backend.shutdown).start()
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(4))
    except Exception as e:  # noqa: BLE001
        return {"error": str(e), "seconds": time.monotonic() - start, "caller_ops": backend.caller_thread_ops}
    return {"error": None}


def test_shutdown_ends_an_all_reduce_waiting_on_the_callers_thread():
    res = run_ranks(_shutdown_during_caller_thread_all_reduce, 2, pg_timeout=60, **env("shm"))[0]
    assert res["error"] is not None and "shut down" in res["error"], res
    assert res["seconds"] < 10, res
    assert res["caller_ops"] == 1, res
