"""dist.batch_isend_irecv and sparse all-reduce on the disttrain backend.

A batch is one op: its sends and receives run side by side, so the pattern of
PyTorch's own test (every rank posts its receive before its send) completes
instead of deadlocking, large messages included (more than a socket buffer
holds), several messages per pair keep their order, and each op's Work
completes with the batch's. A sparse COO all-reduce sums every rank's
nonzeros, as gloo's does, over shared memory, TCP and both (two "hosts"). Both fail before the change: the batch at the group
timeout, the sparse all-reduce with "needs a dense tensor"."""

import pytest
import torch
import torch.distributed as dist

from harness import run_ranks, transport_env


def _ring_batch(rank, world, numel, per_pair):
    """Every rank receives from every other one before it sends to it (the
    order that deadlocks when ops run one at a time), `per_pair` messages a pair."""
    ops, received = [], []
    for peer in range(world):
        if peer == rank:
            continue
        for i in range(per_pair):
            t = torch.full((numel,), -1.0)
            received.append((peer, i, t))
            ops.append(dist.P2POp(dist.irecv, t, peer, tag=i))
        for i in range(per_pair):
            ops.append(dist.P2POp(dist.isend, torch.full((numel,), 100.0 * rank + i), peer, tag=i))
    works = dist.batch_isend_irecv(ops)
    for w in works:
        w.wait()
    out = [(peer, i, t.min().item(), t.max().item()) for peer, i, t in received]
    # The group still works afterwards: a collective, then a lone send/recv pair.
    x = torch.ones(4)
    dist.all_reduce(x)
    return out, x.tolist()


@pytest.mark.parametrize("world,transport,numel,per_pair",
                         [(2, "shm", 8, 1), (3, "tcp", 8, 2), (2, "tcp", 4_000_000, 2), (3, "shm", 1_000_000, 1),
                          (4, "mixed", 1000, 2)])
def test_batch_receives_posted_before_sends_complete(world, transport, numel, per_pair):
    results = run_ranks(_ring_batch, world, (numel, per_pair), pg_timeout=30, **transport_env(transport))
    for rank, (out, x) in enumerate(results):
        assert x == [float(world)] * 4
        assert len(out) == (world - 1) * per_pair
        for peer, i, lo, hi in out:
            assert lo == hi == 100.0 * peer + i, (rank, peer, i, lo, hi)


def _members(rank, world):
    """The Works of the ops inside a coalescing block complete with it."""
    peer = 1 - rank
    got = torch.zeros(3)
    from torch.distributed.distributed_c10d import _coalescing_manager
    with _coalescing_manager(device=torch.device("cpu"), async_ops=True) as cm:
        recv = dist.irecv(got, peer)
        send = dist.isend(torch.full((3,), float(rank + 1)), peer)
        early = None
        try:
            recv.wait()
        except RuntimeError as e:  # the block has not ended: nothing can run yet
            early = str(e)
    for w in cm.works:
        w.wait()
    recv.wait()
    send.wait()
    return got.tolist(), recv._source_rank(), early


def test_works_inside_a_block_complete_with_it_and_an_early_wait_is_a_clear_error():
    results = run_ranks(_members, 2, **transport_env("tcp"))
    for rank, (got, source, early) in enumerate(results):
        assert got == [float(2 - rank)] * 3
        assert source == 1 - rank
        assert early is not None and "before the block ended" in early


def _any_source_in_batch(rank, world):
    """torch's batch_isend_irecv needs a peer; the coalescing block it is built
    on takes a receive without one, which the backend refuses by name."""
    from torch.distributed.distributed_c10d import _coalescing_manager
    message = None
    with _coalescing_manager(device=torch.device("cpu"), async_ops=True) as cm:
        try:
            dist.irecv(torch.zeros(2))
        except (ValueError, RuntimeError) as e:
            message = str(e)
    for w in cm.works:
        w.wait()  # an empty block completes at once
    x = torch.ones(2)
    dist.all_reduce(x)
    return message, x.tolist()


def test_a_receive_from_any_source_in_a_batch_is_a_clear_error():
    for message, x in run_ranks(_any_source_in_batch, 2, **transport_env("tcp")):
        assert message is not None and "any source cannot be part of a coalescing block" in message, message
        assert x == [2.0, 2.0]


def _sparse(rank, world, dense_dims):
    """Rank r holds rows {r, r+1} of a (world + 1) x 3 (x 2 ...) tensor, an
    uncoalesced duplicate included; the sum has every rank's rows added."""
    dense = (2,) * dense_dims
    idx = torch.tensor([[rank, rank + 1, rank], [0, 2, 0]])[: 2 - dense_dims]
    vals = torch.arange(3, dtype=torch.float64).reshape((3,) + (1,) * dense_dims).expand((3,) + dense).clone()
    vals = vals + 10.0 * rank
    size = (world + 1, 3)[: 2 - dense_dims] + dense
    t = torch.sparse_coo_tensor(idx, vals, size)
    expected = sum(torch.sparse_coo_tensor(torch.tensor([[r, r + 1, r], [0, 2, 0]])[: 2 - dense_dims],
                                           (torch.arange(3, dtype=torch.float64).reshape((3,) + (1,) * dense_dims)
                                            .expand((3,) + dense) + 10.0 * r),
                                           size).to_dense() for r in range(world))
    dist.all_reduce(t)
    empty = torch.sparse_coo_tensor(torch.zeros((1, 0), dtype=torch.long), torch.zeros(0), (5,))
    dist.all_reduce(empty)  # no rank holds a nonzero
    errors = []
    try:
        dist.all_reduce(torch.sparse_coo_tensor([[0]], [1.0], (2,)), op=dist.ReduceOp.MAX)
    except ValueError as e:
        errors.append(str(e))
    x = torch.ones(2)
    dist.all_reduce(x)  # the group is still in step
    return torch.equal(t.to_dense(), expected), t.is_coalesced(), empty._nnz(), errors, x.tolist()


@pytest.mark.parametrize("world,transport,dense_dims", [(2, "shm", 0), (3, "tcp", 1), (3, "shm", 0), (4, "mixed", 1)])
def test_sparse_all_reduce_sums_every_ranks_nonzeros(world, transport, dense_dims):
    for same, coalesced, empty_nnz, errors, x in run_ranks(_sparse, world, (dense_dims,), **transport_env(transport)):
        assert same and coalesced
        assert empty_nnz == 0
        assert errors and "SUM only" in errors[0]
        assert x == [float(world)] * 2


def _sparse_sizes_differ(rank, world):
    """Rank r's tensor has r + 5 elements: every rank raises an error naming the sizes
    (it summed into tensors of each rank's own size, silently)."""
    t = torch.sparse_coo_tensor(torch.tensor([[rank + 4]]), torch.tensor([1.0]), (5 + rank,))
    messages = []
    for op in (lambda: dist.all_reduce(t), lambda: dist.all_reduce(torch.ones(2))):  # then the failed group's
        try:
            op()
            messages.append(None)
        except Exception as e:  # noqa: BLE001 - the test reads the message
            messages.append(str(e))
    return messages


@pytest.mark.parametrize("world,transport", [(2, "shm"), (3, "tcp")])
def test_sparse_all_reduce_of_different_sizes_is_an_error(world, transport):
    for first, later in run_ranks(_sparse_sizes_differ, world, **transport_env(transport)):
        assert first is not None and "rank 0 has a tensor of size [5], rank 1 of size [6]" in first, first
        # the recorded reason is reported once prefixed, not "disttrain: disttrain: ..."
        assert later is not None and "aborted earlier: sparse all_reduce" in later, later
