"""disttrain.strategies.parameter_server: consistency modes, sharding, faults, bad input.

Each launch starts its own processes (spawn); data are small slices of the digits set.
"""

import multiprocessing as mp
import random
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from disttrain import data, models
from disttrain.strategies import parameter_server as ps


def _loaders(n_train=384, batch_size=32, shuffle=True):
    train = data.digits(train=True)
    train = TensorDataset(train.tensors[0][:n_train], train.tensors[1][:n_train])
    return (DataLoader(train, batch_size=batch_size, shuffle=shuffle),
            DataLoader(data.digits(train=False), batch_size=512))


def _reference(train_loader, num_workers, epochs, seed=42):
    """Data-parallel training in one process: each step averages the workers' gradients on their batches."""
    torch.manual_seed(seed)
    model = models.small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dataset = train_loader.dataset
    for epoch in range(epochs):
        parts = [ps.worker_indices(len(dataset), num_workers, k, epoch, seed, shuffle=True) for k in range(num_workers)]
        for step in range(len(parts[0]) // train_loader.batch_size):
            grads = []
            for part in parts:
                idx = part[step * train_loader.batch_size:(step + 1) * train_loader.batch_size]
                x, y = dataset[idx]
                model.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
            total = grads[0].clone()
            for g in grads[1:]:
                total += g
            total /= len(grads)
            offset = 0
            for p in model.parameters():
                p.grad = total[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            opt.step()
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


@pytest.mark.parametrize("num_servers", [1, 2])
def test_sync_equals_data_parallel(num_servers):
    train, test = _loaders()
    model, stats = ps.launch_ps_and_workers(num_servers + 3, 2, train, test, mode="sync", num_servers=num_servers,
                                            log_interval=-1)
    got = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    want = _reference(train, 3, 2)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-6, f"sync PS with {num_servers} server(s) differs from data-parallel training: relative {rel:.2e}"
    assert stats.updates == 2 * 384 // (3 * 32)
    assert stats.gradients_applied == 3 * stats.updates and stats.max_applied_staleness == 0
    assert stats.samples == 2 * 384


@pytest.mark.parametrize("policy,num_servers", [("wait", 1), ("drop", 2)])
def test_ssp_never_applies_a_gradient_staler_than_s(policy, num_servers):
    train, test = _loaders()
    s = 1
    _, stats = ps.launch_ps_and_workers(num_servers + 3, 1, train, test, mode="ssp", staleness=s, policy=policy,
                                        num_servers=num_servers, log_interval=-1)
    received = [row for row in stats.staleness_log if row[0] == 0]
    assert len(received) == 384 // 32  # every gradient reached server 0 and was logged
    applied = [st for (_, _, st, ok) in stats.staleness_log if ok]
    assert applied and max(applied) <= s, f"applied staleness {max(applied)} > {s}"
    assert all(st > s for (_, _, st, ok) in stats.staleness_log if not ok), "dropped a gradient within the bound"
    if policy == "wait":
        assert stats.gradients_dropped == 0 and stats.gradients_applied == len(received)


def test_async_three_workers_learn_without_inplace_error():
    train, test = _loaders(n_train=1437)  # the whole training set: 479 samples, 15 batches per worker
    _, stats = ps.launch_ps_and_workers(4, 4, train, test, mode="async", log_interval=-1,
                                        optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    assert stats.updates == 3 * 4 * 15 and stats.gradients_dropped == 0 and stats.samples == 4 * 1437
    assert stats.max_applied_staleness >= 1  # really asynchronous: some gradients were stale
    # Stale gradients learn less per update than serial training (0.9 here): sane, not equal.
    assert stats.final_accuracy > 0.5, f"async training reached only {stats.final_accuracy:.3f} (chance: 0.1)"
    first, last = [sum(loss for _, loss in part) / 30 for part in (stats.losses[:30], stats.losses[-30:])]
    assert last < 0.8 * first, f"the loss did not fall: {first:.3f} -> {last:.3f}"
    assert stats.accuracy_history[-1][2] == pytest.approx(stats.final_accuracy)


def test_killed_worker_is_dropped_in_async_mode():
    train, test = _loaders()
    with pytest.warns(RuntimeWarning, match=r"rank 2 \(worker 2 of 2\) was killed by SIGKILL"):
        _, stats = ps.launch_ps_and_workers(3, 2, train, test, mode="async", kill_after={2: 3}, log_interval=-1,
                                            timeout=30)
    assert stats.dead_workers == [2]
    assert not mp.active_children()  # every rank joined
    assert stats.updates == 2 * 192 // 32 + 3  # the other worker finished its data; the dead one pushed 3


def test_killed_worker_fails_sync_mode_naming_it():
    train, test = _loaders()
    with pytest.raises(ps.ParameterServerError, match=r"(?s)rank 2 \(worker 2 of 2\) was killed by SIGKILL.*"
                                                      r"worker rank 2 \(2 of 2\) failed in synchronous mode"):
        ps.launch_ps_and_workers(3, 2, train, test, mode="sync", kill_after={2: 3}, log_interval=-1, timeout=30)


def test_killed_server_fails_every_worker_within_the_timeout():
    train, test = _loaders()
    start = time.monotonic()
    with pytest.raises(ps.ParameterServerError) as info:
        ps.launch_ps_and_workers(3, 2, train, test, mode="async", kill_after={0: 5}, log_interval=-1, timeout=20)
    text = str(info.value)
    assert "rank 0 (server 1 of 1) was killed by SIGKILL" in text
    for rank in (1, 2):
        assert f"worker rank {rank} ({rank} of 2): lost parameter server rank 0" in text
    assert time.monotonic() - start < 20 + 15
    assert not mp.active_children()


@pytest.mark.parametrize("kwargs,match", [
    ({"world_size": 1}, "world_size must be an integer >= num_servers \\+ 1 = 2"),
    ({"world_size": 2, "num_servers": 2}, "world_size must be an integer >= num_servers \\+ 1 = 3"),
    ({"mode": "hogwild"}, "unknown mode 'hogwild'; choose one of sync, ssp, async"),
    ({"staleness": -1, "mode": "ssp"}, "staleness must be an integer >= 0, got -1"),
    ({"policy": "skip", "mode": "ssp"}, "unknown policy 'skip'; choose one of wait, drop"),
    ({"epochs_per_worker": 0}, "epochs_per_worker must be an integer >= 1"),
    ({"kill_after": {7: 1}}, "kill_after names rank 7"),
    ({"world_size": 4, "num_servers": 2, "mode": "ssp", "policy": "wait"}, "policy='wait' needs num_servers=1"),
])
def test_bad_input_is_a_clear_value_error(kwargs, match):
    train, test = _loaders()
    args = {"world_size": 3, "epochs_per_worker": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        ps.launch_ps_and_workers(args.pop("world_size"), args.pop("epochs_per_worker"), train, test, **args)


def test_worker_indices_split_each_epoch_exactly_once():
    for workers in (1, 3, 4):
        parts = [ps.worker_indices(103, workers, k, epoch=5, seed=1) for k in range(workers)]
        assert sorted(i for p in parts for i in p) == list(range(103))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("s", [0, 1, 2, 3])
def test_wait_policy_bound_and_progress_under_random_arrivals(s):
    """The server's rule alone, with workers finishing in random order: every
    gradient is applied, none staler than s, and nobody waits forever."""
    rng = random.Random(s)
    workers, steps_each = [1, 2, 3, 4], 25
    in_flight: dict[int, int] = {}  # worker -> version it computes on
    remaining = {w: steps_each for w in workers}

    def send_params(w, dropped):
        in_flight[w] = core.version

    core = ps._ServerCore(workers, "ssp", s, "wait", apply=lambda grads: None, send_params=send_params,
                          send_fin=lambda w: None)
    for w in workers:
        core.request(w)
    while in_flight:
        assert len(in_flight) <= s + 1
        w = rng.choice(sorted(in_flight))
        version = in_flight.pop(w)
        remaining[w] -= 1
        last = remaining[w] == 0
        core.gradient(w, version, torch.zeros(1), last, wants=not last)
    assert core.finished and core.applied == len(workers) * steps_each
    assert max(st for (_, _, st, _) in core.log) <= s


def _linear_loaders(dtype=torch.float32, n=96):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.rand(n, 64, generator=g).to(dtype), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(ds, batch_size=16), DataLoader(ds, batch_size=96)


def test_frozen_parameters_stay_as_they_are():
    """A parameter with requires_grad=False is not the servers' to train: with
    AdamW's weight decay it used to be decayed on the server (it had a zero gradient)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    trained = model[2].weight.detach().clone()
    train, _ = _linear_loaders()
    out, stats = ps.launch_ps_and_workers(3, 1, train, model=model, mode="async", log_interval=-1, timeout=30,
                                          optimizer=lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5))
    assert stats.updates == 96 // 16
    assert torch.equal(out[0].weight, frozen) and not out[0].weight.requires_grad
    assert not torch.equal(out[2].weight, trained)


def test_bfloat16_model():
    """bfloat16 parameters used to fail every server at start-up (numpy has no bfloat16)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10).to(torch.bfloat16)
    train, test = _linear_loaders(torch.bfloat16)
    out, stats = ps.launch_ps_and_workers(2, 2, train, test, model=model, mode="sync", log_interval=-1, timeout=30,
                                          optimizer=lambda p: torch.optim.SGD(p, lr=0.1), eval_every=3)
    assert out.weight.dtype == torch.bfloat16 and stats.updates == 2 * 96 // 16
    assert not torch.equal(out.weight, model.weight)
    assert stats.final_accuracy is not None and len(stats.accuracy_history) == 1 + 12 // 3


def test_an_empty_test_loader_is_a_value_error():
    """It used to train, then report a final accuracy of 0.0."""
    train, _ = _loaders()
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=8)
    with pytest.raises(ValueError, match="test_dataloader has no samples"):
        ps.launch_ps_and_workers(2, 1, train, empty)


def test_a_model_off_the_cpu_is_a_value_error():
    train, test = _loaders()
    with pytest.raises(ValueError, match="on the CPU.*meta"):
        ps.launch_ps_and_workers(2, 1, train, test, model=torch.nn.Linear(64, 10, device="meta"))


def test_batches_with_more_than_input_and_target():
    """(input, target, index) batches, as Hogwild and the evaluation take them,
    used to fail every worker with 'too many values to unpack'."""
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.rand(64, 64, generator=g), torch.randint(0, 10, (64,), generator=g), torch.arange(64))
    _, stats = ps.launch_ps_and_workers(2, 1, DataLoader(ds, batch_size=16), DataLoader(ds, batch_size=64),
                                        model=torch.nn.Linear(64, 10), log_interval=-1, timeout=30)
    assert stats.updates == 4 and stats.samples == 64 and stats.final_accuracy is not None
