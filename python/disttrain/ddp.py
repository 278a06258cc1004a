"""``disttrain.DistributedDataParallel``: data-parallel training with the
gradient reducer in C++ (``csrc/ddp/reducer.cpp``).

The Python side only checks arguments, finds the module's tensors and calls
the reducer; the reducer talks to the process group through its C++
interface, so any ``torch.distributed`` group works (disttrain, gloo, NCCL).
"""

from __future__ import annotations

import contextlib
import os
import types
import warnings
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from . import _C, trace
from ._parallel import BROADCAST_CHUNK_BYTES, any_rank, default_group, find_tensors, wire_dtype

# torch DDP's first bucket: small, so the first all-reduce starts early.
_FIRST_BUCKET_BYTES = 1024 * 1024
_DEFAULT_BUCKET_MB = 25


def _cores_busy(group: dist.ProcessGroup, params: list[nn.Parameter]) -> bool:
    """Whether the cores of some rank's host are all computing: a disttrain group, parameters on the
    CPU, and that host's ranks (sharing memory) times torch's threads at least the cores this process
    may use. Decided by every rank and agreed (any rank's yes), since every rank must build the same
    buckets. Anything else (another backend, a GPU model): False, on every rank alike."""
    if any(p.device.type != "cpu" for p in params):
        return False
    try:
        backend = group._get_backend(torch.device("cpu"))
    except (RuntimeError, ValueError):
        return False
    if not isinstance(backend, _C.ProcessGroupDisttrain):
        return False
    return any_rank(backend.host_ranks * torch.get_num_threads() >= len(os.sched_getaffinity(0)), group)


def _sgd_settings(group: dict[str, Any]) -> tuple[float, float, float, float, bool, bool]:
    """A torch.optim.SGD param group's settings, as the fused step takes them."""
    return (float(group["lr"]), float(group["momentum"]), float(group["dampening"]), float(group["weight_decay"]),
            bool(group["nesterov"]), bool(group.get("maximize", False)))


class DistributedDataParallel(nn.Module):
    r"""Data-parallel wrapper: a drop-in for :class:`torch.nn.parallel.DistributedDataParallel`
    in the common cases.

    At construction, every rank checks that its parameters match rank 0's in
    order, shape and dtype (the error names the first that differs, on every
    rank), then parameters and buffers are broadcast from rank 0. During
    backward, gradients are packed into buckets (reverse registration order,
    a 1 MiB first bucket, then ``bucket_cap_mb``); each bucket is all-reduced
    asynchronously as soon as its gradients are ready, and all are waited for
    once, at the end of backward. Gradients are averaged over ranks. After the
    first iteration the buckets are rebuilt in the order gradients arrived.
    Where the host's cores are all computing (its ranks times torch's threads
    cover them), there is no idle core to overlap with, and by default all
    gradients are reduced in one bucket at the end of backward instead
    (``overlap``).

    Args:
        module: the model, already on its device.
        process_group: a ``torch.distributed`` group; the default group if None.
        bucket_cap_mb: bucket size in MiB (default 25; given, the buckets
            overlap backward whatever ``overlap`` says, unless it is False).
        find_unused_parameters: allow parameters that get no gradient in some
            iterations (costs a graph traversal per forward and one small
            all-reduce per backward). Without it, such a parameter raises an
            error naming it at the end of backward.
        gradient_as_bucket_view: ``param.grad`` becomes a view into its bucket,
            saving a copy in and a copy out per step.
        broadcast_buffers: broadcast buffers (batch-norm statistics) from rank
            0 at the start of every forward.
        compression: ``"bf16"`` or ``"fp16"`` to all-reduce gradients in half
            precision (half the bytes on the wire); None for full precision.
        reduce_on_caller: which buckets the thread that completes them (backward's)
            all-reduces itself, there and then, instead of handing them to the
            backend's progress thread (disttrain backend over shared memory, when
            no other collective is in flight). ``"last"`` (default): the last
            bucket only, which completes as backward ends, when there is
            nothing left to overlap it with; ``True``: every bucket (no
            hand-off, but backward waits for the other ranks at every bucket:
            measured faster on idle cores, slower on cores shared with other
            work); ``False``: none (docs/ddp.md, "Near the floor").
        overlap: whether buckets are all-reduced while backward still runs.
            ``"auto"`` (default): yes, unless the model is on the CPU, the
            group is a disttrain one, ``bucket_cap_mb`` is not given and this
            host's ranks times ``torch.get_num_threads()`` are at least the
            cores this process may use (on any rank: all ranks agree). Then
            there is no idle core for the reduction, which would only take
            turns with backward on a busy one, and one bucket reduced at
            the end on backward's thread was measured faster (wide MLP at 2
            ranks on 2 cores, 9 quiet runs: a median of 1.12x the
            no-communication step against 1.19x; docs/ddp.md). ``True``:
            always overlap; ``False``:
            never (one bucket).

    Example:
        >>> import disttrain, torch
        >>> disttrain.init()
        >>> model = disttrain.DistributedDataParallel(torch.nn.Linear(8, 2))
        >>> model(torch.randn(4, 8)).sum().backward()   # grads now averaged over ranks
        >>> with model.no_sync():                        # accumulate locally
        ...     model(torch.randn(4, 8)).sum().backward()
    """

    def __init__(self, module: nn.Module, process_group: dist.ProcessGroup | None = None,
                 bucket_cap_mb: float | None = None, find_unused_parameters: bool = False,
                 gradient_as_bucket_view: bool = False, broadcast_buffers: bool = True,
                 compression: str | None = None, reduce_on_caller: bool | str = "last",
                 overlap: bool | str = "auto"):
        super().__init__()
        compression_dtype = wire_dtype(compression, "DistributedDataParallel", "compression")
        if reduce_on_caller not in (True, False, "last"):
            raise ValueError(f"DistributedDataParallel: reduce_on_caller must be True, False or 'last', "
                             f"got {reduce_on_caller!r}")
        if overlap not in (True, False, "auto"):
            raise ValueError(f"DistributedDataParallel: overlap must be True, False or 'auto', got {overlap!r}")
        if bucket_cap_mb is not None and not bucket_cap_mb > 0:
            raise ValueError(f"DistributedDataParallel: bucket_cap_mb must be positive, got {bucket_cap_mb}")
        process_group = default_group("DistributedDataParallel", process_group)
        trace.start_from_environment()  # DISTTRAIN_TRACE=path
        self.module = module
        self.process_group = process_group
        self.broadcast_buffers = broadcast_buffers
        self.find_unused_parameters = find_unused_parameters
        self.gradient_as_bucket_view = gradient_as_bucket_view
        self.compression = compression
        self.require_backward_grad_sync = True

        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._fused: torch.optim.SGD | None = None
        # The fused optimizer's bookkeeping (fuse_optimizer): buffers made and not yet filled, the
        # reducer's step count when they were made and at the last step(), the step() it replaced,
        # its state_dict hook, and the settings pushed at the last synchronised forward.
        self._fresh_buffers: dict[int, torch.Tensor] = {}
        self._fresh_at = self._stepped_at = 0
        self._step_before: Any = None
        self._state_dict_hook: Any = None
        self._pushed: list[tuple[dict[str, Any], tuple]] = []
        if not named:
            raise RuntimeError("DistributedDataParallel: the module has no parameter that requires grad")
        all_params = list(module.parameters())
        _C.verify_replicas(process_group, all_params, [n for n, _ in module.named_parameters()])
        self._buffers_to_sync = [b for b in module.buffers()]
        with torch.no_grad():
            _C.broadcast_coalesced(process_group, all_params + self._buffers_to_sync, BROADCAST_CHUNK_BYTES, 0)
        #: whether buckets are reduced while backward runs (False: one bucket, at its end)
        self.overlap = overlap if overlap != "auto" else bucket_cap_mb is not None or not _cores_busy(
            process_group, all_params)
        cap_bytes = int((_DEFAULT_BUCKET_MB if bucket_cap_mb is None else bucket_cap_mb) * 1024 * 1024)
        if not self.overlap:  # one bucket of every gradient
            cap_bytes = max(1, sum(p.numel() * p.element_size() for _, p in named))
        self._reducer = _C.Reducer(
            [p for _, p in named], [n for n, _ in named], process_group,
            bucket_cap_bytes=cap_bytes,
            first_bucket_cap_bytes=cap_bytes if not self.overlap else min(_FIRST_BUCKET_BYTES, cap_bytes),
            find_unused_parameters=find_unused_parameters,
            gradient_as_bucket_view=gradient_as_bucket_view,
            wire_dtype=compression_dtype,
            reduce_on_caller="last" if reduce_on_caller == "last" else "all" if reduce_on_caller else "none")

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if self.broadcast_buffers and self._buffers_to_sync:
            with torch.no_grad():
                _C.broadcast_coalesced(self.process_group, self._buffers_to_sync, BROADCAST_CHUNK_BYTES, 0)
        if (torch.is_grad_enabled() and not self.require_backward_grad_sync) or self._fused is not None:
            # A synchronised backward that raised midway must not claim this one's gradients; with a
            # fused optimizer, the steps of the buckets it left in flight finish before this forward.
            self._reducer.discard_unfinished_backward()
        output = self.module(*inputs, **kwargs)
        if torch.is_grad_enabled() and self.require_backward_grad_sync:
            self.prepare_for_backward(output)
        return output

    def prepare_for_backward(self, output: Any) -> None:
        """Arms the reducer for the next backward pass (``forward`` does it;
        call it yourself only when backward runs inside forward, as in
        Lightning's manual optimization, with ``require_backward_grad_sync``
        off during that forward). ``output``: what the backward starts from
        (searched for unused parameters when ``find_unused_parameters``)."""
        # The outputs also mark where backward starts in a trace (disttrain.trace).
        wanted = self.find_unused_parameters or _C.trace_enabled()
        if self._fused is not None:
            self._push_fused_settings()
        self._reducer.prepare_for_backward(find_tensors(output) if wanted else [])

    def fuse_optimizer(self, optimizer: torch.optim.SGD | None) -> None:
        """Applies ``optimizer``'s step inside each synchronised backward: every
        parameter is updated as its averaged gradient comes back from the
        all-reduce (over shared memory, block by block while the block is still
        in cache), which saves the gradients' write-back and the step's own pass
        over them. The result equals ``optimizer.step()`` after a plain backward.

        ``optimizer`` must be a :class:`torch.optim.SGD` over exactly this
        module's parameters that require grad (any param groups, momentum,
        dampening, weight decay, Nesterov, maximize); its settings are read at
        every synchronised forward, so learning-rate schedulers work, and its
        momentum buffers stay in ``optimizer.state`` (``state_dict()`` as
        usual). Call it on every rank.

        What changes: the gradients are consumed (``.grad`` is None after a
        synchronised backward, so clip or inspect gradients inside the loss, or
        do not fuse), and ``optimizer.step()`` becomes a check that a
        synchronised backward ran since the last step (it raises otherwise).
        Backwards under :meth:`no_sync` accumulate as usual; the next
        synchronised one steps on the sum. A backward that raises midway may
        already have updated the parameters of the buckets it had reduced
        (with one bucket, none before every gradient has arrived). ``None``:
        back to plain gradients and ``step()``.
        Not with ``find_unused_parameters``, ``gradient_as_bucket_view`` or
        ``compression``; parameters must be contiguous float32 or float64 on
        the CPU.

        Example:
            >>> opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
            >>> ddp.fuse_optimizer(opt)
            >>> loss_fn(ddp(x), y).backward()   # parameters updated here
            >>> opt.step(); opt.zero_grad()     # unchanged loop: step() only checks
        """
        if optimizer is None:
            if self._fused is not None:
                self._reducer.set_fused_sgd([], [], [])
                self._forget_fresh_buffers()
                self._state_dict_hook.remove()
                if self._step_before is None:
                    self._fused.__dict__.pop("step", None)
                else:  # what was there before fusing (an LR scheduler's wrapper, say)
                    self._fused.step = self._step_before  # type: ignore[method-assign]
                self._fused = None
            return
        if type(optimizer) is not torch.optim.SGD:
            raise TypeError(f"DistributedDataParallel.fuse_optimizer: only torch.optim.SGD can be fused, "
                            f"got {type(optimizer).__name__}")
        if self.find_unused_parameters or self.gradient_as_bucket_view or self.compression:
            raise ValueError("DistributedDataParallel.fuse_optimizer: not with find_unused_parameters, "
                             "gradient_as_bucket_view or compression")
        if self._fused is not None and self._fused is not optimizer:
            raise RuntimeError("DistributedDataParallel.fuse_optimizer: another optimizer is fused; "
                               "call fuse_optimizer(None) first")
        held = [p for group in optimizer.param_groups for p in group["params"]]
        mine = {id(p) for p in self._params}
        if len({id(p) for p in held}) != len(held) or {id(p) for p in held} != mine:
            raise ValueError("DistributedDataParallel.fuse_optimizer: the optimizer must hold each of the "
                             "module's parameters that require grad exactly once, and nothing else")
        for group in optimizer.param_groups:
            if group.get("differentiable"):
                raise ValueError("DistributedDataParallel.fuse_optimizer: not with differentiable=True")
        bad = next((n for n, p in zip(self._names, self._params)
                    if p.device.type != "cpu" or p.dtype not in (torch.float32, torch.float64)
                    or not p.is_contiguous()), None)
        if bad is not None:
            raise ValueError(f"DistributedDataParallel.fuse_optimizer: parameters must be contiguous float32 or "
                             f"float64 on the CPU; '{bad}' is not")
        if self._fused is optimizer:  # fused again: its unfilled buffers stay fresh, its step stays checked
            self._push_fused_settings()
            return
        self._fused = optimizer
        # Momentum buffers this wrapper created (zeros, by id) that no fused step has filled yet.
        self._fresh_buffers = {}
        self._fresh_at = self._stepped_at = self._reducer.fused_steps
        self._step_before = optimizer.__dict__.get("step")
        ddp = self

        def step(opt: torch.optim.SGD, closure: Any = None) -> None:
            if closure is not None:
                raise ValueError("DistributedDataParallel.fuse_optimizer: a fused optimizer's step() takes no "
                                 "closure (the step is applied by the backward)")
            done = ddp._reducer.fused_steps
            if done == ddp._stepped_at:
                raise RuntimeError("DistributedDataParallel: optimizer.step() found no synchronised backward "
                                   "since the last step; with a fused optimizer (fuse_optimizer) the backward "
                                   "applies the step, and step() only checks that one ran")
            ddp._stepped_at = done
            if any(_sgd_settings(group) != used for group, used in ddp._pushed):
                warnings.warn("DistributedDataParallel: the fused optimizer's settings (lr, momentum, dampening, "
                              "weight_decay, nesterov, maximize) changed between the synchronised forward and "
                              "step(); the step the backward applied used those read at the forward. Change "
                              "them before the forward (or after step(), as LR schedulers do)", stacklevel=2)
            opt._opt_called = True  # type: ignore[attr-defined]  # what an LR scheduler checks for

        if self._step_before is not None and hasattr(self._step_before, "_wrapped_by_lr_sched"):
            # An LR scheduler made before fusing checks for its wrapper at its first step; this step sets
            # what that wrapper would (_opt_called), so the scheduler's order check still holds.
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        # A bound method, as torch's own: a scheduler made after fusing wraps step.__func__.
        optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]

        def without_unfilled(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
            # The zero buffers made for a step that has not run yet are not torch's state: its own
            # step (after a resume) would start them from the gradient.
            if ddp._fused is not opt or ddp._reducer.fused_steps != ddp._fresh_at:
                return
            for key, state in list(state_dict["state"].items()):
                buf = state.get("momentum_buffer")
                if buf is not None and ddp._fresh_buffers.get(id(buf)) is buf:
                    rest = {k: v for k, v in state.items() if k != "momentum_buffer"}  # not the live dict
                    if rest:
                        state_dict["state"][key] = rest
                    else:
                        del state_dict["state"][key]

        self._state_dict_hook = optimizer.register_state_dict_post_hook(without_unfilled)
        self._push_fused_settings()

    def _forget_fresh_buffers(self) -> None:
        """Drops from the fused optimizer's state the zero momentum buffers made for a step that never
        ran, so that its own step (or a re-fuse) starts them from the gradient, as torch's first step."""
        optimizer = self._fused
        assert optimizer is not None
        if self._reducer.fused_steps == self._fresh_at:
            for p in self._params:
                state = optimizer.state.get(p)
                buf = state.get("momentum_buffer") if state is not None else None
                if state is not None and buf is not None and self._fresh_buffers.get(id(buf)) is buf:
                    del state["momentum_buffer"]
                    if not state:
                        del optimizer.state[p]
        self._fresh_buffers.clear()

    def _push_fused_settings(self) -> None:
        """The fused optimizer's current settings and momentum buffers, to the reducer."""
        optimizer = self._fused
        assert optimizer is not None
        if self._reducer.fused_steps != self._fresh_at:  # a step filled the buffers made fresh before it
            self._fresh_buffers.clear()
            self._fresh_at = self._reducer.fused_steps
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        if len(group_of) != len(self._params) or sum(len(g["params"]) for g in optimizer.param_groups) != len(
                self._params):
            raise RuntimeError("DistributedDataParallel: the fused optimizer must hold each of the module's "
                               "parameters that require grad exactly once, and nothing else (a fused step "
                               "never updates another parameter); call fuse_optimizer(None) before changing "
                               "its groups")
        settings, buffers, fresh = [], [], []
        for p in self._params:
            group = group_of.get(id(p))
            if group is None:
                raise RuntimeError("DistributedDataParallel: the fused optimizer no longer holds every "
                                   "parameter; call fuse_optimizer(None) before changing its groups")
            settings.append(_sgd_settings(group))
            momentum = settings[-1][1]
            buf = None
            if momentum != 0:
                state = optimizer.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:  # torch's first step copies the gradient into a new buffer
                    buf = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    self._fresh_buffers[id(buf)] = buf
            buffers.append(buf)
            fresh.append(buf is not None and self._fresh_buffers.get(id(buf)) is buf)
        self._reducer.set_fused_sgd(settings, buffers, fresh)
        self._pushed = [(group, _sgd_settings(group)) for group in optimizer.param_groups]

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients locally, without
        communication; the first synchronised backward after it reduces the sum.

        Example:
            >>> with ddp.no_sync():
            ...     ddp(x1).sum().backward()
            >>> ddp(x2).sum().backward()   # reduces the gradients of x1 and x2
        """
        previous = self.require_backward_grad_sync
        self.require_backward_grad_sync = False
        try:
            yield
        finally:
            self.require_backward_grad_sync = previous

    def bucket_plan(self) -> list[list[str]]:
        """Current buckets in launch order, as parameter names."""
        names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        return [[names[i] for i in bucket] for bucket in self._reducer.bucket_plan()]

    def last_backward_trace(self) -> dict[str, Any]:
        """Timestamps (``time.monotonic_ns`` clock) of the last synchronised
        backward: per bucket ``ready_ns`` (last gradient arrived), ``launch_ns``
        and ``done_ns``, ``backward_start_ns`` (backward reached the outputs;
        0 unless :mod:`disttrain.trace` was recording at the forward),
        ``backward_end_ns`` (autograd finished) and ``finalize_end_ns``
        (gradients written back)."""
        return self._reducer.last_trace()
