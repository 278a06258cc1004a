"""What the DDP and FSDP wrappers (and the trainer) share: the default group, the tensors of a
forward's output, the broadcast chunk size, the wire dtypes and a flag agreed by every rank."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

# Chunk size for broadcasting parameters and buffers (torch DDP uses 250 MiB).
BROADCAST_CHUNK_BYTES = 250 * 1024 * 1024

# What gradients (and FSDP's gathered parameters) may travel as: name or dtype -> dtype.
_WIRE_DTYPES: dict[Any, torch.dtype | None] = {
    None: None, "bf16": torch.bfloat16, "fp16": torch.float16,
    torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}


def wire_dtype(value: Any, owner: str, argument: str) -> torch.dtype | None:
    """The dtype ``value`` names (``None``, ``"bf16"``, ``"fp16"``, ``torch.bfloat16``
    or ``torch.float16``); a ValueError naming ``owner`` and ``argument`` otherwise."""
    try:
        return _WIRE_DTYPES[value]
    except (KeyError, TypeError):
        raise ValueError(f"{owner}: {argument} must be None, 'bf16', 'fp16', torch.bfloat16 or "
                         f"torch.float16; got {value!r}") from None


def find_tensors(obj: Any) -> list[torch.Tensor]:
    """Tensors anywhere in a forward's output (nested tuples, lists and dicts)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in find_tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in find_tensors(item)]
    return []


def default_group(owner: str, process_group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """``process_group``, or the default group; a clear error when there is none."""
    if process_group is not None:
        return process_group
    if not dist.is_initialized():
        raise RuntimeError(f"{owner}: no process group; call disttrain.init() or "
                           "torch.distributed.init_process_group() first, or pass process_group")
    group = dist.group.WORLD
    assert group is not None
    return group


def flag_tensor(flag: bool) -> torch.Tensor:
    """The one-element tensor any_rank all-reduces for ``flag`` (a fault injected into that
    collective sends the same, so its signature matches the peers')."""
    return torch.tensor([1.0 if flag else 0.0])


def any_rank(flag: bool, group: dist.ProcessGroup | None = None) -> bool:
    """True on every rank of ``group`` (default: the default group) if ``flag`` is true on any
    (one small all-reduce): for decisions every rank must take alike."""
    t = flag_tensor(flag)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def average_coalesced(group: dist.ProcessGroup, tensors: list[torch.Tensor], async_op: bool = True) -> Any:
    """Starts one fused AVG all-reduce of ``tensors`` on ``group``, in place; returns its Work.
    Through the process group itself, as ``dist.all_reduce_coalesced`` does, which warns at its
    first call that it will be deprecated (torch 2.x). A synchronous one (``async_op=False``) may
    run on the calling thread (the disttrain backend over shared memory)."""
    opts = dist.AllreduceCoalescedOptions()
    opts.reduceOp = dist.ReduceOp(dist.ReduceOp.AVG)
    if hasattr(opts, "asyncOp"):  # torch >= 2.7
        opts.asyncOp = async_op
    return group.allreduce_coalesced(tensors, opts)
