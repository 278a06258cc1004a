"""disttrain.DistributedSampler: PyTorch's order in torch mode, exactly-once
stream mode, mid-epoch resume on the same and on other world sizes, warnings
and errors."""

from __future__ import annotations

import collections
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings, strategies as st
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.distributed import DistributedSampler as TorchSampler

import disttrain
from disttrain import DistributedSampler, ResumableLoader
from harness import run_ranks


class Sized:
    """A data set of n samples whose sample i is i; nothing is materialised."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def global_order(n, num_replicas, **kwargs):
    """Interleaves every rank's pass back into the epoch's global order."""
    per_rank = [list(DistributedSampler(Sized(n), num_replicas, r, **kwargs)) for r in range(num_replicas)]
    assert len({len(p) for p in per_rank}) <= 1, "ranks got different counts"
    return [per_rank[p % num_replicas][p // num_replicas] for p in range(sum(map(len, per_rank)))]


# ---------------------------------------------------------------- torch mode

@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 300), num_replicas=st.integers(1, 9), data=st.data(), shuffle=st.booleans(),
       seed=st.integers(0, 2**63 - 1), epoch=st.integers(-3, 10**6), drop_last=st.booleans())
def test_torch_mode_matches_pytorch(n, num_replicas, data, shuffle, seed, epoch, drop_last):
    rank = data.draw(st.integers(0, num_replicas - 1))
    ours = DistributedSampler(Sized(n), num_replicas, rank, shuffle, seed, drop_last, mode="torch")
    theirs = TorchSampler(Sized(n), num_replicas, rank, shuffle, seed, drop_last)
    ours.set_epoch(epoch)
    theirs.set_epoch(epoch)
    assert (len(ours), ours.num_samples, ours.total_size) == (len(theirs), theirs.num_samples, theirs.total_size)
    assert list(ours) == list(theirs)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(10**4, 2 * 10**5), num_replicas=st.integers(1, 4), seed=st.integers(0, 2**32),
       drop_last=st.booleans())
def test_torch_mode_matches_pytorch_large(n, num_replicas, seed, drop_last):
    rank = num_replicas - 1
    ours = DistributedSampler(Sized(n), num_replicas, rank, seed=seed, drop_last=drop_last)
    theirs = TorchSampler(Sized(n), num_replicas, rank, seed=seed, drop_last=drop_last)
    ours.set_epoch(7)
    theirs.set_epoch(7)
    assert list(ours) == list(theirs)


# --------------------------------------------------------------- stream mode

def check_exactly_once(order, n, num_replicas, drop_last):
    order = np.asarray(order, dtype=np.int64)
    if drop_last:
        assert len(order) == (n // num_replicas) * num_replicas
        assert len(np.unique(order)) == len(order)
        assert order.min(initial=0) >= 0 and order.max(initial=0) < max(n, 1)
    else:
        total = -(-n // num_replicas) * num_replicas
        assert len(order) == total
        assert np.array_equal(np.sort(order[:n]), np.arange(n))
        # Padding repeats the start of the epoch's order, as PyTorch's does.
        assert np.array_equal(order[n:], np.resize(order[:n], total - n))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000, 2**16, 2**16 + 1, 12345, 10**6])
@pytest.mark.parametrize("num_replicas", [1, 3, 4])
def test_stream_every_index_exactly_once(n, num_replicas):
    for drop_last in (False, True):
        order = global_order(n, num_replicas, mode="stream", seed=11, drop_last=drop_last)
        check_exactly_once(order, n, num_replicas, drop_last)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, 5000), num_replicas=st.integers(1, 7), seed=st.integers(0, 2**64 - 1),
       epoch=st.integers(0, 2**40), drop_last=st.booleans(), shuffle=st.booleans())
def test_stream_exactly_once_property(n, num_replicas, seed, epoch, drop_last, shuffle):
    per_rank = []
    for rank in range(num_replicas):
        sampler = DistributedSampler(Sized(n), num_replicas, rank, shuffle, seed, drop_last, mode="stream")
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
        assert len(per_rank[-1]) == len(sampler) == TorchSampler(Sized(n), num_replicas, rank,
                                                                 drop_last=drop_last).num_samples
    order = [per_rank[p % num_replicas][p // num_replicas] for p in range(sum(map(len, per_rank)))]
    check_exactly_once(order, n, num_replicas, drop_last)
    if not shuffle:
        assert order[:n] == list(range(len(order[:n])))


def test_stream_orders_differ_between_epochs_and_seeds():
    n = 1000

    def order(seed, epoch):
        sampler = DistributedSampler(Sized(n), 1, 0, seed=seed, mode="stream")
        sampler.set_epoch(epoch)
        return list(sampler)

    orders = [order(0, 0), order(0, 1), order(0, 2), order(1, 0), order(2, 0)]
    assert order(0, 1) == orders[1], "the same seed and epoch must give the same order"
    for i in range(len(orders)):
        assert orders[i] != list(range(n))
        for j in range(i):
            # Two independent shuffles of 1000 share ~1 position; a weak key schedule shares many.
            same = sum(a == b for a, b in zip(orders[i], orders[j]))
            assert same < 20, (i, j, same)


def test_stream_first_position_is_spread_over_epochs():
    # Over 3000 epochs each of 10 samples should lead about 300 times.
    n, epochs = 10, 3000
    firsts = collections.Counter()
    sampler = DistributedSampler(Sized(n), 1, 0, seed=5, mode="stream")
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        firsts[next(iter(sampler))] += 1
    assert set(firsts) == set(range(n))
    assert max(firsts.values()) < 400 and min(firsts.values()) > 200, firsts


# ---------------------------------------------------------------- resume

def consume(sampler, count):
    iterator = iter(sampler)
    return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize("mode", ["torch", "stream"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_same_world_size_continues_exactly(mode, drop_last):
    n, world, taken = 1001, 3, 57
    for rank in range(world):
        full = DistributedSampler(Sized(n), world, rank, seed=4, drop_last=drop_last, mode=mode)
        full.set_epoch(2)
        expected = list(full)
        first = DistributedSampler(Sized(n), world, rank, seed=4, drop_last=drop_last, mode=mode)
        first.set_epoch(2)
        head = consume(first, taken)
        state = first.state_dict()
        assert state["consumed"] == taken * world and state["epoch"] == 2
        second = DistributedSampler(Sized(n), world, rank, seed=4, drop_last=drop_last, mode=mode)
        second.load_state_dict(state)
        second.set_epoch(2)  # a training loop's usual call must keep the resume point
        assert len(second) == len(expected) - taken
        assert head + list(second) == expected


def resume_across(n, old_world, new_world, batches, batch_size, mode, drop_last, use_loader):
    """Runs part of an epoch on old_world ranks and the rest on new_world ranks;
    returns (samples seen by all ranks in the epoch, consumed at the switch)."""
    seen, states = [], []
    for rank in range(old_world):
        sampler = DistributedSampler(Sized(n), old_world, rank, seed=9, drop_last=drop_last, mode=mode)
        sampler.set_epoch(5)
        if use_loader:
            loader = ResumableLoader(DataLoader(Sized(n), batch_size=batch_size, sampler=sampler))
            for i, batch in enumerate(loader):
                seen += batch.tolist()
                if i + 1 == batches:
                    break
        else:
            seen += consume(sampler, batches * batch_size)
        states.append(sampler.state_dict())
    assert all(s == states[0] for s in states), "lockstep ranks must agree on the state"
    for rank in range(new_world):
        sampler = DistributedSampler(Sized(n), new_world, rank, seed=9, drop_last=drop_last, mode=mode)
        sampler.load_state_dict(states[0])
        assert sampler.epoch == 5
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            seen += list(sampler)
    return seen, states[0]["consumed"]


@pytest.mark.parametrize("mode", ["torch", "stream"])
@pytest.mark.parametrize("old_world,new_world", [(4, 2), (2, 3), (3, 4)])
@pytest.mark.parametrize("n", [997, 1000])
def test_resume_other_world_size_sees_each_sample_once(mode, old_world, new_world, n):
    for use_loader in (False, True):
        seen, consumed = resume_across(n, old_world, new_world, batches=7, batch_size=8, mode=mode,
                                       drop_last=False, use_loader=use_loader)
        assert consumed == 7 * 8 * old_world
        counts = collections.Counter(seen)
        assert set(counts) == set(range(n)), "a sample was skipped"
        padding = -(n - consumed) % new_world
        assert len(seen) == n + padding
        assert sum(c - 1 for c in counts.values()) == padding, "a sample was repeated beyond the padding"


@pytest.mark.parametrize("mode", ["torch", "stream"])
def test_resume_other_world_size_drop_last_never_repeats(mode):
    n, old_world, new_world = 1001, 2, 3
    seen, consumed = resume_across(n, old_world, new_world, batches=5, batch_size=10, mode=mode,
                                   drop_last=True, use_loader=False)
    assert len(seen) == len(set(seen))
    assert len(seen) == n - (n - consumed) % new_world


def test_resume_twice_across_world_sizes():
    # 4 ranks, then 2, then 3: the second state continues from the first.
    n = 500
    seen = []
    state = None
    for world, take in ((4, 20), (2, 30), (3, None)):
        states = []
        for rank in range(world):
            sampler = DistributedSampler(Sized(n), world, rank, seed=1, mode="stream")
            if state is not None:
                sampler.load_state_dict(state)
            seen += consume(sampler, take) if take is not None else list(sampler)
            states.append(sampler.state_dict())
        state = states[0]
    assert set(seen) == set(range(n))
    assert len(seen) == n + (-(n - 4 * 20 - 2 * 30) % 3)
    assert state["consumed"] == n


def test_loader_counts_consumed_batches_not_prefetched():
    n, world, batch = 400, 2, 5
    sampler = DistributedSampler(Sized(n), world, 0, mode="stream")
    loader = ResumableLoader(DataLoader(Sized(n), batch_size=batch, sampler=sampler, num_workers=2,
                                        prefetch_factor=4))
    received = []
    for i, b in enumerate(loader):
        received += b.tolist()
        if i == 1:
            break
    assert sampler._pass.handed_out() > len(received), "workers should have prefetched ahead"
    assert loader.state_dict()["consumed"] == len(received) * world == 2 * batch * world
    # The rest of the epoch, resumed in a fresh sampler, is exactly what the loop had not received.
    rest = DistributedSampler(Sized(n), world, 0, mode="stream")
    rest.load_state_dict(loader.state_dict())
    whole = DistributedSampler(Sized(n), world, 0, mode="stream")
    assert received + list(rest) == list(whole)


def test_finished_epoch_state_and_next_epoch():
    n = 101
    sampler = DistributedSampler(Sized(n), 3, 1, seed=2, drop_last=True, mode="stream")
    loader = ResumableLoader(DataLoader(Sized(n), batch_size=4, sampler=sampler, drop_last=True))
    for _ in loader:
        pass
    state = loader.state_dict()
    assert state["consumed"] == n and state["epoch"] == 0
    resumed = DistributedSampler(Sized(n), 2, 0, seed=2, drop_last=True, mode="stream")
    resumed.load_state_dict(state)
    assert len(resumed) == 0 and list(resumed) == []
    resumed.set_epoch(1)
    assert len(resumed) == 50 and len(list(resumed)) == 50


def test_state_dict_round_trip_before_iterating():
    sampler = DistributedSampler(Sized(90), 3, 0, mode="torch")
    sampler.set_epoch(4)
    consume(sampler, 10)
    state = sampler.state_dict()
    other = DistributedSampler(Sized(90), 2, 1, mode="torch")
    other.load_state_dict(state)
    assert other.state_dict() == {**state, "num_replicas": 2}


def _resume_with_process_group(rank, world_size, n, batches, state):
    """One rank of a real job: resumes from `state` (or starts), consumes up to
    `batches` batches through a DataLoader."""
    sampler = DistributedSampler(Sized(n), seed=3, mode="stream")  # world size and rank from the group
    assert (sampler.num_replicas, sampler.rank) == (world_size, rank)
    # Ranks run as daemonic processes, which cannot start loader workers.
    loader = ResumableLoader(DataLoader(Sized(n), batch_size=6, sampler=sampler))
    if state is not None:
        loader.load_state_dict(state)
    seen = []
    for i, batch in enumerate(loader):
        seen += batch.tolist()
        if batches is not None and i + 1 == batches:
            break
    states = [None] * world_size
    dist.all_gather_object(states, loader.state_dict())
    assert all(s == states[0] for s in states)
    return seen, states[0]


def test_resume_with_process_groups_2_to_3():
    n = 311
    first = run_ranks(_resume_with_process_group, 2, args=(n, 4, None))
    state = first[0][1]
    assert state["consumed"] == 4 * 6 * 2
    second = run_ranks(_resume_with_process_group, 3, args=(n, None, state))
    seen = [i for part in first + second for i in part[0]]
    assert set(seen) == set(range(n))
    assert len(seen) == n + (-(n - state["consumed"]) % 3)
    assert second[0][1]["consumed"] == n


# ----------------------------------------------------------- warnings, errors

def test_warns_when_epoch_restarts_without_set_epoch():
    sampler = DistributedSampler(Sized(20), 2, 0)
    list(sampler)
    with pytest.warns(UserWarning, match="set_epoch"):
        list(sampler)


@pytest.mark.parametrize("mode", ["torch", "stream"])
def test_no_warning_with_set_epoch_or_without_shuffle(mode):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler = DistributedSampler(Sized(20), 2, 0, mode=mode)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            list(sampler)
        ordered = DistributedSampler(Sized(20), 2, 0, shuffle=False, mode=mode)
        list(ordered)
        list(ordered)


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(3))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_replicas=0, rank=0), ValueError, "num_replicas"),
    (dict(num_replicas=-2, rank=0), ValueError, "num_replicas"),
    (dict(num_replicas=3, rank=3), ValueError, "Invalid rank 3"),
    (dict(num_replicas=3, rank=-1), ValueError, "Invalid rank -1"),
    (dict(num_replicas=2, rank=0, seed=-1), ValueError, "seed"),
    (dict(num_replicas=2, rank=0, seed=2**64), ValueError, "seed"),
    (dict(num_replicas=2, rank=0, mode="fast"), ValueError, "mode"),
    (dict(num_replicas=2.5, rank=0), TypeError, "num_replicas"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DistributedSampler(Sized(10), **kwargs)


@pytest.mark.parametrize("dataset", [Stream(), (i for i in range(3))])
def test_unsized_dataset(dataset):
    with pytest.raises(TypeError, match="sized data set"):
        DistributedSampler(dataset, 2, 0)


def test_no_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="num_replicas and rank"):
        DistributedSampler(Sized(10))


def test_state_dict_from_another_data_set_or_setting():
    state = DistributedSampler(Sized(10), 2, 0, mode="stream").state_dict()
    with pytest.raises(ValueError, match="data set of 10 samples"):
        DistributedSampler(Sized(11), 2, 0, mode="stream").load_state_dict(state)
    with pytest.raises(ValueError, match="mode"):
        DistributedSampler(Sized(10), 2, 0, mode="torch").load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        DistributedSampler(Sized(10), 2, 0, seed=1, mode="stream").load_state_dict(state)
    with pytest.raises(ValueError, match="consumed"):
        DistributedSampler(Sized(10), 2, 0, mode="stream").load_state_dict({**state, "consumed": 11})
    with pytest.raises(ValueError, match="missing"):
        DistributedSampler(Sized(10), 2, 0, mode="stream").load_state_dict({"epoch": 1})


def test_epoch_outside_int64_is_refused_when_set():
    """An epoch the engine cannot take is a one-line ValueError from set_epoch or
    load_state_dict (it was a pybind 'incompatible constructor arguments' dump at iteration)."""
    sampler = DistributedSampler(Sized(10), 2, 0)
    for epoch in (2**63, -2**63 - 1):
        with pytest.raises(ValueError, match="epoch must fit in int64"):
            sampler.set_epoch(epoch)
        with pytest.raises(ValueError, match="epoch must fit in int64"):
            sampler.load_state_dict({**sampler.state_dict(), "epoch": epoch})
    sampler.set_epoch(2**63 - 1)
    assert len(list(sampler)) == 5


def test_loader_without_our_sampler():
    with pytest.raises(TypeError, match="DistributedSampler"):
        ResumableLoader(DataLoader(Sized(10), batch_size=2))


def test_engine_errors_are_clean():
    with pytest.raises(ValueError, match="mode"):
        disttrain._C.SamplerIndexStream(10, 2, 0, True, 0, False, "nope", 0, 0)
    with pytest.raises(ValueError, match="Invalid rank"):
        disttrain._C.SamplerIndexStream(10, 2, 5, True, 0, False, "stream", 0, 0)
    with pytest.raises(ValueError, match="num_replicas"):
        disttrain._C.sampler_samples_per_rank(10, 0, False, 0)
    stream = disttrain._C.SamplerIndexStream(10, 2, 0, True, 0, False, "stream", 0, 0)
    with pytest.raises(ValueError, match="int64"):
        stream.fill(torch.empty(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous"):
        stream.fill(torch.empty(4, 2, dtype=torch.long).t())


def test_drop_in_for_pytorch_in_a_dataloader():
    n = 57
    ours = DistributedSampler(Sized(n), 3, 2, seed=8)
    theirs = TorchSampler(Sized(n), 3, 2, seed=8)
    for epoch in range(2):
        ours.set_epoch(epoch)
        theirs.set_epoch(epoch)
        a = [b.tolist() for b in DataLoader(Sized(n), batch_size=4, sampler=ours)]
        b = [b.tolist() for b in DataLoader(Sized(n), batch_size=4, sampler=theirs)]
        assert a == b
