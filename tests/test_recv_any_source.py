"""dist.recv(tensor) and dist.irecv(tensor) without a source on the disttrain
backend: the first sender whose next message is a send with the tag is matched,
recv returns it and the Work's _source_rank() names it, receives from a given
rank posted before or after keep each pair's order, and a receive nobody
sends fails at the group timeout with a clear error (never a hang).
tests/cpp/test_recv_any_source.cpp covers the same at the backend's level."""

import time

import pytest
import torch
import torch.distributed as dist

from harness import run_ranks, transport_env


def _many_senders(rank, world):
    """Every other rank sends rank 0 two messages (10 * rank + i); rank 0
    receives them all from any source, with recv and with irecv."""
    if rank != 0:
        for i in range(2):
            dist.send(torch.full((6,), 10.0 * rank + i), 0)
        dist.barrier()
        return None
    got = []
    for i in range(world - 1):
        t = torch.full((6,), -1.0)
        sender = dist.recv(t)
        got.append((sender, t.tolist()))
        t = torch.full((6,), -1.0)
        work = dist.irecv(t)
        work.wait()
        got.append((work._source_rank(), t.tolist()))
    dist.barrier()
    return got


@pytest.mark.parametrize("world,transport", [(2, "shm"), (3, "tcp"), (3, "shm")])
def test_recv_without_source_matches_every_sender_and_names_it(world, transport):
    got = run_ranks(_many_senders, world, **transport_env(transport))[0]
    assert len(got) == 2 * (world - 1)
    per_sender = {}
    for sender, values in got:
        assert len(set(values)) == 1 and int(values[0]) // 10 == sender, (sender, values)
        per_sender.setdefault(sender, []).append(values[0])
    assert per_sender == {s: [10.0 * s, 10.0 * s + 1] for s in range(1, world)}


def _mixed(rank, world):
    """Ranks 1 and 2 send 10, 11, 12 and 20, 21, 22; rank 0 posts, before
    waiting: any, recv(src=1), recv(src=2), any, recv(src=1), any.

    Which sender an any-source receive takes depends on whose message has
    arrived (as in MPI), and this order has a losing match: if the second
    any took rank 1's last message, the recv(src=1) after it could never be
    matched (rank 1's next message is the barrier: a clear mismatch error). So
    rank 0 posts only once every message is in its sockets (the senders' isends
    completed, said through the store): then the senders are taken in turn
    (1, then 2, then 2), which every pair's order below needs."""
    store = dist.distributed_c10d._get_default_store()
    if rank != 0:
        works = [dist.isend(torch.full((3,), 10.0 * rank + i), 0) for i in range(3)]
        for w in works:
            w.wait()
        store.set(f"mixed_sent_{rank}", "1")
        dist.barrier()
        return None
    store.wait([f"mixed_sent_{r}" for r in range(1, world)])
    posted = []
    for src in (None, 1, 2, None, 1, None):
        t = torch.full((3,), -1.0)
        posted.append((src, dist.irecv(t, src=src), t))
    out = []
    for src, work, t in posted:
        work.wait()
        out.append((src, work._source_rank(), t[0].item()))
    dist.barrier()
    return out


def test_any_source_mixed_with_given_sources_in_both_orders():
    out = run_ranks(_mixed, 3, **transport_env("tcp"))[0]
    per_sender = {1: [], 2: []}
    for src, sender, value in out:
        if src is not None:
            assert sender == src
        assert int(value) // 10 == sender, out
        per_sender[sender].append(value)
    # every message once, each pair's in the order it was sent
    assert per_sender == {1: [10.0, 11.0, 12.0], 2: [20.0, 21.0, 22.0]}, out


def _nobody_sends(rank, world):
    if rank == 0:
        t0 = time.monotonic()
        try:
            dist.recv(torch.zeros(2))
        except Exception as e:  # noqa: BLE001 - the error is what is checked
            return time.monotonic() - t0, type(e).__name__, str(e)
        return None
    time.sleep(6)  # alive and silent past rank 0's timeout
    return None


def test_recv_without_source_times_out_when_nobody_sends():
    waited, kind, message = run_ranks(_nobody_sends, 3, pg_timeout=3, timeout=120, **transport_env("tcp"))[0]
    assert kind == "DistBackendError", message
    assert "timeout" in message and "recv from any source" in message, message
    assert 2.0 <= waited < 20.0, waited
