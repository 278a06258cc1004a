"""disttrain.DistributedDataParallel against torch's DDP, plus overlap and errors.

Each launch runs several cases in one process group to keep the file fast.
"""

from __future__ import annotations

import pytest

from harness import Boom, boom, on_backward, run_ranks

STEPS = 4
# Small buckets so that every model is split into several and rebuilt.
BUCKET_MB = 0.004


def _models():
    import torch
    from torch import nn

    class Branchy(nn.Module):
        """`b` is used on some ranks and steps only; `never` on none."""

        def __init__(self):
            super().__init__()
            self.trunk = nn.Linear(16, 32)
            self.a = nn.Linear(32, 4)
            self.b = nn.Linear(32, 4)
            self.never = nn.Linear(32, 4)

        def forward(self, x, use_b: bool):
            h = torch.relu(self.trunk(x))
            out = self.a(h)
            return out + self.b(h) if use_b else out

    def cnn():
        from disttrain.models import small_cnn
        return small_cnn(num_classes=10, in_channels=1)

    def bn_cnn():
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    return {"cnn": cnn, "branchy": Branchy, "bn": bn_cnn}


def _train(case: str, wrapper: str, rank: int, world_size: int) -> dict:
    """Trains one case for STEPS steps and returns the module's state (params, buffers, grads)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as TorchDDP

    import disttrain

    torch.manual_seed(1234 + rank)  # ranks start different: construction must broadcast rank 0's model
    name, _, variant = case.partition(":")
    model = _models()[name]()
    kwargs = dict(bucket_cap_mb=BUCKET_MB)
    if name == "branchy":
        kwargs["find_unused_parameters"] = True
    if variant == "view":
        kwargs["gradient_as_bucket_view"] = True
    if variant == "stale":  # one bucket per parameter, gradients never zeroed
        kwargs["bucket_cap_mb"] = 1e-6
    if variant == "caller" and wrapper != "torch":  # buckets reduced on backward's thread
        kwargs["reduce_on_caller"] = True
    if variant == "handoff" and wrapper != "torch":  # every bucket on the progress thread (the default: not the last)
        kwargs["reduce_on_caller"] = False
    if variant == "onebucket" and wrapper != "torch":  # no overlap: every gradient in one bucket at the end
        kwargs = {k: v for k, v in kwargs.items() if k != "bucket_cap_mb"}
        kwargs["overlap"] = False
    if variant == "defaults":  # each wrapper's own defaults (disttrain: overlap="auto")
        kwargs = {k: v for k, v in kwargs.items() if k != "bucket_cap_mb"}
    cls = TorchDDP if wrapper == "torch" else disttrain.DistributedDataParallel
    ddp = cls(model, **kwargs)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    data = torch.Generator().manual_seed(99 + rank)

    def batch():
        if name == "branchy":
            return torch.randn(6, 16, generator=data), torch.randint(0, 4, (6,), generator=data)
        return torch.randn(6, 1, 8, 8, generator=data), torch.randint(0, 10, (6,), generator=data)

    def loss_of(x, y, step):
        if name == "branchy":  # "stale": `b` unused by every rank at odd steps, keeping an old .grad
            out = ddp(x, (step if variant == "stale" else rank + step) % 2 == 0)
        else:
            out = ddp(x)
        return F.cross_entropy(out, y)

    for step in range(STEPS):
        if variant != "stale":
            opt.zero_grad()
        if variant == "accumulate":
            with ddp.no_sync():
                loss_of(*batch(), step).backward()
        loss_of(*batch(), step).backward()
        opt.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state.update({f"grad:{n}": (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()})
    return state


CASES = ["cnn", "cnn:view", "cnn:accumulate", "cnn:caller", "cnn:handoff", "cnn:onebucket", "cnn:defaults",
         "branchy", "branchy:onebucket", "branchy:stale", "bn"]


def _numerics(rank, world_size):
    import torch

    failures = []
    for case in CASES:
        ours = _train(case, "disttrain", rank, world_size)
        theirs = _train(case, "torch", rank, world_size)
        assert ours.keys() == theirs.keys()
        for key in theirs:
            a, b = ours[key], theirs[key]
            if a is None or b is None:
                if (a is None) != (b is None):
                    failures.append(f"{case} {key}: grad None on one side only")
                continue
            try:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            except AssertionError as e:
                failures.append(f"{case} {key}: {e}")
    assert not failures, "\n".join(failures)
    return len(CASES)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_matches_torch_ddp(world_size):
    """CNN, gradient-as-bucket-view, no_sync accumulation, unused parameters
    and batch-norm buffers: after STEPS steps, parameters (and buffers, and
    gradients) equal torch DDP's on the same data and seed."""
    assert run_ranks(_numerics, world_size, timeout=180) == [len(CASES)] * world_size


def _recording_group(inner, events):
    """A Python process group that forwards to `inner` and logs each all-reduce."""
    import torch.distributed as dist

    class RecordingGroup(dist.ProcessGroup):
        def __init__(self):
            super().__init__(inner.rank(), inner.size())

        def allreduce(self, tensors, opts):
            events.append(("allreduce", tensors[0].dtype, tensors[0].numel()))
            return inner.allreduce(tensors, opts)

        def broadcast(self, tensors, opts):
            return inner.broadcast(tensors, opts)

        def allgather(self, outputs, inputs, opts):
            return inner.allgather(outputs, inputs, opts)

    return RecordingGroup()


def _overlap_and_features(rank, world_size):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    import disttrain

    results = {}

    # 1. Overlap. A marker at the model's input records when backward reaches
    # it, which is after every parameter's gradient except the first layer's.
    events = []


    layers = [nn.Linear(32, 32) for _ in range(6)] + [nn.Linear(32, 4)]
    model = nn.Sequential(*layers)
    group = _recording_group(dist.group.WORLD, events)
    ddp = disttrain.DistributedDataParallel(model, process_group=group, bucket_cap_mb=0.005)
    for _ in range(2):  # the second iteration uses the rebuilt plan
        events.clear()
        x = torch.randn(8, 32, requires_grad=True)
        ddp(on_backward(x, lambda: events.append(("input_grad",)))).sum().backward()
        kinds = [e[0] for e in events]
        assert "input_grad" in kinds and "allreduce" in kinds, kinds
        first_allreduce, input_grad = kinds.index("allreduce"), kinds.index("input_grad")
        # The first bucket went out while backward still had layers to run.
        assert first_allreduce < input_grad, kinds
        assert kinds.count("allreduce") == len(ddp.bucket_plan()) > 1, kinds
        trace = ddp.last_backward_trace()
        assert trace["launch_ns"][0] < trace["backward_end_ns"] <= trace["finalize_end_ns"], trace
    # The first bucket holds the last layer: its gradients come first.
    first, last = ddp.bucket_plan()[0], ddp.bucket_plan()[-1]
    assert {"6.weight", "6.bias"} <= set(first) and "0.weight" in last, ddp.bucket_plan()
    results["overlap"] = True

    # 2. The rebuilt plan follows real arrival order: a module used in the
    # opposite order to its registration gets its first bucket from the
    # first-registered layer.
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Linear(64, 8)    # used last in forward
            self.early = nn.Linear(8, 64)   # used first in forward

        def forward(self, x):
            return self.late(torch.relu(self.early(x)))

    rev = disttrain.DistributedDataParallel(Reversed(), bucket_cap_mb=0.001)
    assert rev.bucket_plan()[0][0].startswith("early"), rev.bucket_plan()  # registration guess: wrong
    rev(torch.randn(4, 8)).sum().backward()
    assert rev.bucket_plan()[0][0].startswith("late"), rev.bucket_plan()
    results["rebuild"] = rev.bucket_plan()[0]

    # 3. Compression: bf16 on the wire, result close to full precision.
    for compression, wire, as_view in (("bf16", torch.bfloat16, False), ("fp16", torch.float16, False),
                                       ("bf16", torch.bfloat16, True)):
        events.clear()
        torch.manual_seed(7)
        full_model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        half_model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        half_model.load_state_dict(full_model.state_dict())
        full = disttrain.DistributedDataParallel(full_model)
        half = disttrain.DistributedDataParallel(half_model, process_group=_recording_group(dist.group.WORLD, events),
                                                 compression=compression, gradient_as_bucket_view=as_view)
        events.clear()  # construction's own collectives are not gradients
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(rank))
        for _ in range(2):  # the second backward runs on the rebuilt buckets
            for module in (full_model, half_model):
                module.zero_grad()
            full(x).square().sum().backward()
            half(x).square().sum().backward()
        dtypes = {e[1] for e in events if e[0] == "allreduce"}
        assert dtypes == {wire}, dtypes
        for p, q in zip(full_model.parameters(), half_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=2e-2, atol=1e-2)
            assert q.grad.dtype == torch.float32
        results[compression] = True
        if as_view:
            assert all(p.grad.data_ptr() != 0 and p.grad._base is not None for p in half_model.parameters())

    # 4. Replicas that differ: every rank raises naming the first differing parameter.
    width = 16 if rank == 0 else 17
    bad = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, width))
    with pytest.raises(RuntimeError) as err:
        disttrain.DistributedDataParallel(bad)
    message = str(err.value)
    assert "'1.weight'" in message and "parameter 2" in message, message
    assert "[16, 8]" in message and "[17, 8]" in message, message
    results["mismatch"] = message

    # 5. A parameter without a gradient, and find_unused_parameters not set.
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.idle = nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    unused = disttrain.DistributedDataParallel(Unused())
    with pytest.raises(RuntimeError) as err:
        unused(torch.randn(2, 4)).sum().backward()
    message = str(err.value)
    assert "'idle.weight'" in message and "'idle.bias'" in message and "find_unused_parameters=True" in message, message
    assert "'used.weight'" not in message, message
    results["unused"] = message

    # The group is still consistent on every rank after the errors.
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == world_size
    return results


@pytest.mark.parametrize("backend", ["gloo", "disttrain"])
def test_overlap_rebuild_compression_and_errors(backend):
    results = run_ranks(_overlap_and_features, 2, backend=backend, timeout=120)
    assert all(r["overlap"] and r["bf16"] and r["fp16"] for r in results)
    assert results[0]["mismatch"].split("(")[0] == results[1]["mismatch"].split("(")[0]


def _bad_arguments(rank, world_size):
    import torch

    import disttrain

    with pytest.raises(ValueError, match="compression"):
        disttrain.DistributedDataParallel(torch.nn.Linear(2, 2), compression="int8")
    with pytest.raises(RuntimeError, match="no parameter"):
        disttrain.DistributedDataParallel(torch.nn.ReLU())
    with pytest.raises(ValueError, match="reduce_on_caller must be True, False or 'last', got 'first'"):
        disttrain.DistributedDataParallel(torch.nn.Linear(2, 2), reduce_on_caller="first")
    with pytest.raises(ValueError, match="overlap must be True, False or 'auto', got 'yes'"):
        disttrain.DistributedDataParallel(torch.nn.Linear(2, 2), overlap="yes")
    with pytest.raises(ValueError, match="bucket_cap_mb must be positive, got 0"):
        disttrain.DistributedDataParallel(torch.nn.Linear(2, 2), bucket_cap_mb=0)
    return True


def test_bad_arguments():
    assert run_ranks(_bad_arguments, 1, backend="gloo") == [True]


def _auto_overlap(rank, world_size):
    """overlap="auto": one bucket at the end where the host's ranks x threads cover its cores,
    buckets overlapping backward where cores are left; every rank agrees (any rank's busy host)."""
    import os
    from unittest import mock

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import disttrain

    torch.set_num_threads(1)
    model = _models()["cnn"]()

    def ddp_seeing(cores, **kwargs):
        with mock.patch.object(os, "sched_getaffinity", lambda pid: set(range(cores))):
            return disttrain.DistributedDataParallel(model, **kwargs)

    out = {}
    busy = ddp_seeing(world_size)  # as many cores as ranks, one thread each: all computing
    out["busy"] = (busy.overlap, len(busy.bucket_plan()))
    idle = ddp_seeing(64, bucket_cap_mb=0.004)  # buckets chosen by the user: overlap
    out["given_cap"] = (idle.overlap, len(idle.bucket_plan()))
    roomy = ddp_seeing(64)
    out["roomy"] = roomy.overlap
    # One host busy, the other not: they must build the same buckets, so both take no overlap.
    mixed = ddp_seeing(world_size if rank == 0 else 64)
    out["mixed"] = (mixed.overlap, len(mixed.bucket_plan()))
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    F.cross_entropy(mixed(x), y).backward()  # a step on the agreed layout completes
    out["grad"] = float(next(model.parameters()).grad.abs().sum())
    out["forced"] = ddp_seeing(world_size, overlap=True).overlap
    gloo = dist.new_group(backend="gloo")
    out["gloo"] = ddp_seeing(world_size, process_group=gloo).overlap  # not a disttrain group
    return out


def test_auto_overlap_follows_the_cores_and_ranks_agree():
    results = run_ranks(_auto_overlap, 2, timeout=120)
    for r in results:
        assert r["busy"] == (False, 1) and r["mixed"] == (False, 1), r
        assert r["given_cap"][0] is True and r["given_cap"][1] > 1, r
        assert r["roomy"] is True and r["forced"] is True and r["gloo"] is True, r
    assert results[0]["grad"] == results[1]["grad"] > 0  # averaged: the same on both ranks


def _no_sync_after_failed_backward(rank, world_size):
    """A backward that raises midway (some gradients already counted) leaves no trace in the
    reducer: the next no_sync() micro-batch accumulates locally (it raised 'received a gradient
    twice' instead), and the synchronised one after it reduces the sum, as if the failed step
    had never run."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import disttrain

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.last = nn.Linear(8, 16), nn.Linear(16, 4)
            self.fail = False

        def forward(self, x):  # `last` gets its gradient before the failure, `first` never does
            h = torch.relu(self.first(x))
            return self.last(on_backward(h, boom) if self.fail else h)

    gen = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(4, 8, generator=gen), torch.randint(0, 4, (4,), generator=gen)) for _ in range(3)]
    grads = {}
    for overlap in (False, True):
        for failed_first in (False, True):
            torch.manual_seed(0)
            net = Net()
            ddp = disttrain.DistributedDataParallel(net, overlap=overlap)
            assert ddp.overlap is overlap
            F.cross_entropy(ddp(batches[0][0]), batches[0][1]).backward()  # a first step: buckets rebuilt
            net.zero_grad()
            if failed_first:
                net.fail = True
                with pytest.raises(Boom):
                    F.cross_entropy(ddp(batches[0][0]), batches[0][1]).backward()
                net.fail = False
                net.zero_grad()
            with ddp.no_sync():
                F.cross_entropy(ddp(batches[1][0]), batches[1][1]).backward()
            F.cross_entropy(ddp(batches[2][0]), batches[2][1]).backward()
            grads[overlap, failed_first] = [p.grad.clone() for p in net.parameters()]
    for overlap in (False, True):
        for clean, after_failure in zip(grads[overlap, False], grads[overlap, True]):
            torch.testing.assert_close(after_failure, clean, rtol=0, atol=0)
    return True


def test_no_sync_after_a_failed_backward():
    assert run_ranks(_no_sync_after_failed_backward, 2, timeout=120, pg_timeout=30) == [True, True]


# Fused optimizer cases: (SGD settings or a name, DDP settings, dtype).
FUSED_CASES = [
    ({"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}, {"overlap": False}, "float32"),
    ({"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}, {"bucket_cap_mb": BUCKET_MB}, "float32"),
    ({"lr": 0.05, "momentum": 0.8, "nesterov": True}, {"bucket_cap_mb": BUCKET_MB, "reduce_on_caller": True},
     "float64"),
    ({"lr": 0.1, "momentum": 0.5, "dampening": 0.3, "maximize": True}, {"overlap": False}, "float32"),
    ({"lr": 0.2}, {"bucket_cap_mb": BUCKET_MB, "reduce_on_caller": False}, "float64"),
    ("groups+schedule", {"overlap": False}, "float32"),
    ("accumulate", {"bucket_cap_mb": BUCKET_MB}, "float32"),
]


def _fused_train(sgd, ddp_kwargs, dtype, fused: bool, rank: int):
    """STEPS steps of an MLP with disttrain DDP and the SGD step fused into backward, or (the
    reference) with torch's DDP and torch's optimizer.step(); returns the parameters, momentum
    buffers and whether the grads were None after each backward."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import disttrain

    torch.manual_seed(4321 + rank)
    # 2.1 MB of float32 gradients: one bucket spans several 1 MiB shared-memory slots, and each slot's
    # reduction is split among the ranks (the small buckets of BUCKET_MB are reduced whole by each).
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 64), nn.ReLU(),
                          nn.Linear(64, 10)).to(getattr(torch, dtype))
    if fused:
        ddp = disttrain.DistributedDataParallel(model, **ddp_kwargs)
    else:
        from torch.nn.parallel import DistributedDataParallel as TorchDDP
        ddp = TorchDDP(model)
    params = list(ddp.parameters())
    if sgd == "groups+schedule":  # two groups with their own settings, and the lr changing every step
        opt = torch.optim.SGD([{"params": params[:2], "lr": 0.3, "momentum": 0.9},
                               {"params": params[2:], "weight_decay": 0.01}], lr=0.1, momentum=0.7)
        schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    else:
        opt = torch.optim.SGD(params, **(sgd if isinstance(sgd, dict) else {"lr": 0.1, "momentum": 0.9}))
        schedule = None
    if fused:
        ddp.fuse_optimizer(opt)
    data = torch.Generator().manual_seed(77 + rank)

    def loss():
        x = torch.randn(6, 1, 8, 8, generator=data).to(getattr(torch, dtype))
        return F.cross_entropy(ddp(x), torch.randint(0, 10, (6,), generator=data))

    grads_none = []
    for _ in range(STEPS):
        opt.zero_grad()
        if sgd == "accumulate":
            with ddp.no_sync():
                loss().backward()
        loss().backward()
        grads_none.append(all(p.grad is None for p in params))
        opt.step()
        if schedule is not None:
            schedule.step()
    buffers = [opt.state[p].get("momentum_buffer") for p in params]
    return [p.detach().clone() for p in params], buffers, grads_none


def _fused_optimizer(rank, world_size):
    import torch
    from torch import nn

    import disttrain

    failures = []
    for sgd, ddp_kwargs, dtype in FUSED_CASES:
        fused, fused_buffers, fused_none = _fused_train(sgd, ddp_kwargs, dtype, True, rank)
        plain, plain_buffers, plain_none = _fused_train(sgd, ddp_kwargs, dtype, False, rank)
        if not all(fused_none) or any(plain_none):
            failures.append(f"{sgd} {ddp_kwargs}: grads None after a fused backward {fused_none}, plain {plain_none}")
        for i, (a, b) in enumerate(zip(fused + fused_buffers, plain + plain_buffers)):
            if (a is None) != (b is None):
                failures.append(f"{sgd} {ddp_kwargs} tensor {i}: None on one side only")
            elif a is not None:
                try:
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
                except AssertionError as e:
                    failures.append(f"{sgd} {ddp_kwargs} {dtype} tensor {i}: {e}")
    assert not failures, "\n".join(failures)

    # What a user can get wrong, each one line.
    ddp = disttrain.DistributedDataParallel(nn.Linear(4, 2), overlap=False)
    with pytest.raises(TypeError, match="only torch.optim.SGD can be fused, got Adam"):
        ddp.fuse_optimizer(torch.optim.Adam(ddp.parameters()))
    with pytest.raises(ValueError, match="exactly once"):
        ddp.fuse_optimizer(torch.optim.SGD([ddp.module.weight], lr=0.1))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    ddp.fuse_optimizer(opt)
    with pytest.raises(RuntimeError, match="found no synchronised backward"):
        opt.step()
    with ddp.no_sync():
        ddp(torch.randn(3, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="found no synchronised backward"):
        opt.step()  # a no_sync backward does not step
    ddp(torch.randn(3, 4)).sum().backward()
    opt.step()
    ddp.fuse_optimizer(None)  # back to plain gradients and torch's step
    ddp(torch.randn(3, 4)).sum().backward()
    assert ddp.module.weight.grad is not None
    opt.step()
    # A backward that raises midway (one bucket, never launched) updates nothing, and the next steps go on.
    torch.manual_seed(0)
    first, last = nn.Linear(4, 8), nn.Linear(8, 2)
    ddp = disttrain.DistributedDataParallel(nn.ModuleList([first, last]), overlap=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    ddp.fuse_optimizer(opt)
    before = [p.detach().clone() for p in ddp.parameters()]
    with pytest.raises(Boom):
        ddp.prepare_for_backward(None)
        last(on_backward(torch.relu(first(torch.randn(3, 4))), boom)).sum().backward()
    assert all(torch.equal(a, p) for a, p in zip(before, ddp.parameters()))
    for _ in range(2):
        ddp.prepare_for_backward(None)
        last(torch.relu(first(torch.randn(3, 4)))).sum().backward()
        opt.step()
    assert not any(torch.equal(a, p) for a, p in zip(before, ddp.parameters()))
    with pytest.raises(ValueError, match="not with find_unused_parameters"):
        disttrain.DistributedDataParallel(nn.Linear(4, 2), find_unused_parameters=True).fuse_optimizer(
            torch.optim.SGD([torch.zeros(1)], lr=0.1))
    return True


def _fused_optimizer_lifecycle(rank, world_size):
    import warnings

    import torch
    from torch import nn

    import disttrain

    def train(refuse: str | None, fused: bool = True):
        torch.manual_seed(3)
        ddp = disttrain.DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
        schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # made before fusing
        if fused:
            ddp.fuse_optimizer(opt)
        if refuse == "twice":
            ddp(torch.ones(2, 4))  # a forward without backward makes the zero buffers for the next step
            ddp.fuse_optimizer(opt)
        elif refuse == "unfuse":
            ddp(torch.ones(2, 4))
            ddp.fuse_optimizer(None)
            assert not any("momentum_buffer" in st for st in opt.state.values()), "fuse_optimizer(None) left unfilled momentum buffers in opt.state"
        data = torch.Generator().manual_seed(rank)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no scheduler warning about the call order
            for _ in range(3):
                opt.zero_grad()
                ddp(torch.randn(5, 4, generator=data)).square().sum().backward()
                opt.step()
                schedule.step()
        return [p.detach().clone() for p in ddp.parameters()] + [opt.state[p]["momentum_buffer"]
                                                                  for p in ddp.parameters()], ddp, opt

    plain = train(None, fused=False)[0]
    for refuse in (None, "twice", "unfuse"):
        got = train(refuse)[0]
        for a, b in zip(got, plain):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"{refuse}: {m}")
    # A parameter added to the optimizer after fusing would never be stepped: one line instead.
    _, ddp, opt = train(None)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    with pytest.raises(RuntimeError, match="exactly once, and nothing else"):
        ddp(torch.ones(2, 4))

    # A forward without backward (evaluation with grad enabled) makes zero buffers for the next step:
    # not in a checkpoint, where a resumed torch step would take them for filled ones.
    ddp = disttrain.DistributedDataParallel(nn.Linear(4, 2))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    ddp.fuse_optimizer(opt)
    ddp(torch.ones(2, 4))
    assert not opt.state_dict()["state"], "a checkpoint holds the momentum buffers of a step not yet made"
    ddp(torch.ones(2, 4)).sum().backward()
    opt.step()
    assert len(opt.state_dict()["state"]) == 2

    # The lr set between backward and step() (a warm-up loop's habit) came too late for the fused step.
    _, ddp, opt = train(None)
    ddp(torch.ones(2, 4)).sum().backward()
    opt.param_groups[0]["lr"] = 0.01
    with pytest.warns(UserWarning, match="changed between the synchronised forward and step"):
        opt.step()

    # A backward that raises with buckets in flight (rank 1 comes to them late): their steps finish
    # before the next forward runs, not behind it while it reads the parameters.
    import time

    import torch.distributed as dist

    class Halves(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.last = nn.Linear(64, 64), nn.Linear(64, 64)
            self.fail = False

        def forward(self, x):
            h = self.first(x)
            return self.last(on_backward(h, boom) if self.fail else h)

    torch.manual_seed(0)
    ddp = disttrain.DistributedDataParallel(Halves(), overlap=True, bucket_cap_mb=0.001)  # a bucket each
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    ddp.fuse_optimizer(opt)
    ddp.module.fail = True
    if rank == 1:
        time.sleep(1.0)
    with pytest.raises(Boom):
        ddp(torch.randn(3, 64)).sum().backward()  # 'last' is stepped (its bucket launched), 'first' not
    ddp.module.fail = False
    with torch.no_grad():
        ddp(torch.randn(3, 64))
    seen = [p.detach().clone() for p in ddp.parameters()]
    dist.barrier()  # rank 1 is past its backward: every reduction is done
    assert all(torch.equal(a, p) for a, p in zip(seen, ddp.parameters())), \
        "a step of the raised backward changed the parameters after the next forward"
    for _ in range(2):
        opt.zero_grad()
        ddp(torch.randn(3, 64)).sum().backward()
        opt.step()
    return True


def test_fused_optimizer_lifecycle():
    """fuse_optimizer under a scheduler made before it (no call-order warning), fused twice, or
    unfused after a forward without backward: the same parameters and momentum buffers as torch's
    step (dampening shows a zero buffer left where torch starts from the gradient); a parameter
    added after fusing raises instead of silently never being stepped; the buckets a raised
    backward left in flight finish their steps before the next forward."""
    assert run_ranks(_fused_optimizer_lifecycle, 2, timeout=120) == [True, True]


@pytest.mark.parametrize("world_size,backend", [(2, "disttrain"), (3, "disttrain"), (2, "gloo")])
def test_fused_optimizer_matches_torch_sgd(world_size, backend):
    """DDP.fuse_optimizer: the SGD step applied as the all-reduce hands back each reduced block
    (disttrain's shared memory; over gloo, after the write-back) equals torch's optimizer.step()
    after a plain backward: parameters and momentum buffers within 1e-6 after STEPS steps, with
    momentum, weight decay, Nesterov, dampening, maximize, param groups, an LR schedule, no_sync
    accumulation, one bucket or several (on backward's thread or the progress thread), float32
    and float64."""
    assert run_ranks(_fused_optimizer, world_size, backend=backend, timeout=180) == [True] * world_size
