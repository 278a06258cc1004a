"""``disttrain.FullyShardedDataParallel``: ZeRO stages 1-3 with the sharding
engine in C++ (``csrc/shard/``).

The Python side checks arguments, decides which submodules become wrapped
units (``auto_wrap``), swaps each unit's parameters for views into the
engine's flat buffer and wires module hooks to the engine. Flat-buffer
layout, shard bookkeeping, gathers, gradient reduction (async, overlapped with
backward), freeing and gradient clipping are the engine's.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import re
import shutil
from typing import Any, Callable, NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import checkpoint as torch_checkpoint

from . import _C
from ._atomic import fsync_directory
from ._parallel import BROADCAST_CHUNK_BYTES, default_group, find_tensors, wire_dtype

__all__ = ["FullyShardedDataParallel", "ShardedOptimizer"]

_SHARDED_FORMAT = "disttrain.fsdp.sharded/1"
MANIFEST = "manifest.dts"


_GENERATION_RE = re.compile(r"^gen_(\d{9})$")
_LEGACY_SHARD_RE = re.compile(r"^shard_\d{5}\.dts$")


def _shard_file(rank: int) -> str:
    return f"shard_{rank:05d}.dts"


def _generation_dir(number: int) -> str:
    return f"gen_{number:09d}"


class _ParamSlot:
    """Where an original parameter lived: ``owner.<attr>``, named ``name`` in the root."""
    __slots__ = ("owner", "attr", "name")

    def __init__(self, owner: nn.Module, attr: str, name: str):
        self.owner, self.attr, self.name = owner, attr, name


def _module_classes(value: Any, option: str) -> tuple[type, ...] | None:
    """``value`` as a tuple of nn.Module subclasses when it is one such class or a collection of
    them (a collection holding anything else, or nothing, is a TypeError naming ``option``); None
    when it is neither a class nor a collection."""
    if isinstance(value, type) and issubclass(value, nn.Module):
        return (value,)
    if not isinstance(value, (set, frozenset, list, tuple)):
        return None
    classes = tuple(value)
    bad = [c for c in classes if not (isinstance(c, type) and issubclass(c, nn.Module))]
    if bad or not classes:
        raise TypeError(f"FullyShardedDataParallel: {option} as a collection must hold nn.Module subclasses; "
                        f"got {bad or 'an empty collection'}")
    return classes


def _wrap_policy(auto_wrap: Any) -> Callable[[nn.Module, int], bool]:
    """``auto_wrap`` as ``policy(module, unwrapped_numel) -> wrap?``."""
    if auto_wrap is None:
        return lambda module, numel: False
    if isinstance(auto_wrap, bool):
        raise TypeError("FullyShardedDataParallel: auto_wrap must be None, a set of module classes, a minimum "
                        f"parameter count or a callable; got {auto_wrap!r}")
    if isinstance(auto_wrap, int):
        if auto_wrap <= 0:
            raise ValueError(f"FullyShardedDataParallel: auto_wrap as a minimum parameter count must be positive, "
                             f"got {auto_wrap}")
        return lambda module, numel: numel >= auto_wrap
    classes = _module_classes(auto_wrap, "auto_wrap")
    if classes is not None:
        return lambda module, numel: isinstance(module, classes)
    if callable(auto_wrap):
        return lambda module, numel: bool(auto_wrap(module))
    raise TypeError("FullyShardedDataParallel: auto_wrap must be None, a set of module classes, a minimum parameter "
                    f"count or a callable; got {type(auto_wrap).__name__}")


def _plan_units(root: nn.Module, policy: Callable[[nn.Module, int], bool]) -> list[tuple[nn.Module, list[_ParamSlot]]]:
    """Wrapped units, innermost first, then the root with what is left (if anything)."""
    taken: set[int] = set()

    def slots_under(module: nn.Module, prefix: str) -> list[_ParamSlot]:
        out = []
        for mname, sub in module.named_modules(prefix=prefix):
            for pname, p in sub._parameters.items():
                if p is not None and id(p) not in taken:
                    out.append(_ParamSlot(sub, pname, f"{mname}.{pname}" if mname else pname))
        return out

    units: list[tuple[nn.Module, list[_ParamSlot]]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            visit(child, f"{prefix}.{name}" if prefix else name)
        if module is root:
            return
        slots = slots_under(module, prefix)
        if slots and policy(module, sum(getattr(s.owner, s.attr).numel() for s in slots)):
            taken.update(id(getattr(s.owner, s.attr)) for s in slots)
            units.append((module, slots))

    visit(root, "")
    rest = slots_under(root, "")
    if rest:
        units.append((root, rest))
    return units


def _checkpoint_policy(activation_checkpointing: Any) -> Callable[[nn.Module], bool]:
    """``activation_checkpointing`` as ``policy(unit_module) -> checkpoint it?``."""
    if activation_checkpointing is None or activation_checkpointing is False:
        return lambda module: False
    if activation_checkpointing is True:
        return lambda module: True
    classes = _module_classes(activation_checkpointing, "activation_checkpointing")
    if classes is not None:
        return lambda module: isinstance(module, classes)
    if callable(activation_checkpointing):
        return lambda module: bool(activation_checkpointing(module))
    raise TypeError("FullyShardedDataParallel: activation_checkpointing must be None, a bool, a set of module "
                    f"classes or a callable; got {type(activation_checkpointing).__name__}")


class _KeepBatchNormStatistics:
    """Recomputation's context: the unit's batch-norm running statistics as
    they were before, after (the recomputed forward must not count the batch twice)."""

    def __init__(self, module: nn.Module):
        self._norms = [m for m in module.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self._saved: list[dict[str, torch.Tensor]] = []

    def __enter__(self) -> None:
        self._saved = [{k: b.clone() for k, b in m._buffers.items() if b is not None} for m in self._norms]

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for m, saved in zip(self._norms, self._saved):
                for k, v in saved.items():
                    m._buffers[k].copy_(v)  # type: ignore[union-attr]
        self._saved = []


def _checkpointed_forward(module: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``forward`` under :func:`torch.utils.checkpoint.checkpoint` (non-reentrant):
    only the unit's inputs are kept; backward recomputes the rest, after the
    unit's pre-backward hook gathered its parameters again."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch_checkpoint.checkpoint(
        forward, *args, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _KeepBatchNormStatistics(module)), **kwargs)


def _backward_ignores_params(module: nn.Module) -> bool:
    """True for a unit whose backward never reads its parameters' values: a
    plain ``nn.Embedding`` (its gradient needs only the indices), so stage 3
    does not gather it again for backward. Subclasses may use the weight
    otherwise and are gathered as usual."""
    return type(module) is nn.Embedding


# What a freed parameter still answers: its metadata lives outside the freed storage.
_PARAMETER_METADATA = frozenset({"shape", "dtype", "device", "ndim", "layout", "requires_grad", "is_leaf", "size",
                                 "dim", "numel", "nelement", "element_size", "is_floating_point", "is_complex",
                                 "is_cuda", "is_sparse", "is_meta"})


class _ShardedOut:
    """Stands in a stage-3 module's parameter attribute while its unit is not
    gathered: the parameter's storage is freed, and reading it through the
    view crashed the process (SIGSEGV). Metadata (``shape``, ``dtype``, ...)
    still answer; anything that would read the values raises."""
    __slots__ = ("_name", "_view")

    def __init__(self, name: str, view: torch.Tensor):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_view", view)

    def _refuse(self) -> NoReturn:
        raise RuntimeError(f"FullyShardedDataParallel (stage 3): parameter '{self._name}' is sharded outside its "
                           "unit's forward and backward (its full values are freed); read parameters with "
                           "model.full_state_dict()")

    def __getattr__(self, name: str) -> Any:
        if name in _PARAMETER_METADATA:
            return getattr(self._view, name)
        if name.startswith("__"):  # protocol probes (copy, pickle, hasattr) see a plain object
            raise AttributeError(name)
        self._refuse()

    def __setattr__(self, name: str, value: Any) -> None:
        self._refuse()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        for arg in list(args) + list((kwargs or {}).values()):
            if isinstance(arg, _ShardedOut):
                arg._refuse()
        return NotImplemented

    def __repr__(self) -> str:
        return (f"<parameter '{self._name}' of shape {list(self._view.shape)}, sharded by FullyShardedDataParallel "
                "(stage 3): read it with full_state_dict()>")


def _check_module(module: nn.Module) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"FullyShardedDataParallel: module must be an nn.Module, got {type(module).__name__}")
    for name, sub in module.named_modules():
        if isinstance(sub, FullyShardedDataParallel):
            raise ValueError(f"FullyShardedDataParallel: submodule '{name}' is already wrapped; wrap the model once "
                             "and choose units with auto_wrap")
    by_id: dict[int, list[str]] = collections.defaultdict(list)
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id[id(p)].append(name)
    shared = [names for names in by_id.values() if len(names) > 1]
    if shared:
        listed = "; ".join(" = ".join(names) for names in shared)
        raise ValueError(f"FullyShardedDataParallel: shared (tied) parameters are not supported: {listed}. "
                         "Untie them (e.g. clone the weight) or train this model with DistributedDataParallel")
    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(f"FullyShardedDataParallel: parameters that do not require grad are not supported: "
                         f"{', '.join(frozen)}")
    if not by_id:
        raise ValueError("FullyShardedDataParallel: the module has no parameters")


class FullyShardedDataParallel(nn.Module):
    r"""Sharded data-parallel training (ZeRO stages 1, 2 and 3).

    The module's parameters are grouped into *units*: each submodule chosen by
    ``auto_wrap`` (e.g. every transformer block) is one, and the root holds
    the parameters no unit took. Each unit's parameters are flattened into one
    buffer, padded to a multiple of the world size and split evenly: every
    rank owns one slice, the *shard*, and ``model.parameters()`` yields these
    shards (flat 1-d ``nn.Parameter``), so an optimizer built on them steps on
    this rank's slice only.

    * stage 1: parameters and gradients stay whole on every rank; gradients
      are all-reduced (asynchronously, as each unit's are ready) and each
      shard's ``.grad`` is a view of its slice. Only optimizer state is sharded.
    * stage 2: also gradients: each unit's gradient is reduce-scattered into
      its shard as soon as backward produced it, and the full one is dropped.
    * stage 3: also parameters: a unit's parameters are all-gathered before
      its forward and its backward and freed after each (the root's stay
      from the start of forward to the end of backward; an ``nn.Embedding``
      unit is not gathered for backward); with ``prefetch`` the next unit's
      gather runs while the current unit computes (forward) or the current
      unit's gradient is reduced (backward, see ``backward_prefetch``).

    Activation checkpointing (``activation_checkpointing``): a chosen unit
    keeps only its inputs from forward; its backward first gathers the unit's
    parameters (stage 3), then recomputes the unit's forward and computes its
    gradients, which are the same as without checkpointing (batch-norm running
    statistics are counted once). The unit's activations are traded for a
    second forward of its compute.

    With stages 1 and 2 the updated shards are gathered back into the full
    parameters after an optimizer step (:func:`ShardedOptimizer` does it at
    once; otherwise the next forward does).

    Outside forward and backward use :meth:`full_state_dict` to see the
    parameters: at stage 3 the module's parameter attributes point at freed
    memory between iterations.

    Args:
        module: the model (on CPU, or on this rank's device). Its parameters
            are replaced; keep using the wrapper.
        stage: 1, 2 or 3 (default 3).
        auto_wrap: which submodules become units: None (one unit, the root),
            a set of module classes (each instance is a unit), an int
            (a submodule with at least that many parameters not already in
            a unit below it), or a callable ``policy(module) -> bool``.
        process_group: a ``torch.distributed`` group; the default group if None.
        prefetch: stage 3: gather the next unit while the current one computes.
        backward_prefetch: stage 3, when backward's prefetch is issued:
            ``"post"`` (default) once the current unit's gradients are complete
            and its parameters freed (one unit's full parameters alive at a
            time, and the next gather overlaps the current reduction), or
            ``"pre"`` when the current unit's backward starts (the gather also
            overlaps its computation, at one more unit's full parameters).
        mixed_precision: ``"bf16"`` (or ``torch.bfloat16``), ``"fp16"``: parameters
            and gradients travel in that dtype; shards, optimizer state and
            computation stay fp32. None (default): fp32 on the wire.
        activation_checkpointing: which wrapped units recompute their forward
            in backward instead of keeping their activations: None or False
            (default: none), True (every wrapped unit, not the root), a set of
            module classes (units that are instances), or a callable
            ``policy(unit_module) -> bool``. A checkpointed unit must not hold
            another unit. Any stage (stage 3 gathers the unit for backward).
        lean_backward: stage 3: trade overlap for memory in backward
            (default False). A unit's gradients are kept as autograd made them
            until its last one arrives; when the next unit's backward starts
            (autograd has let go of them by then) its gathered parameters are
            freed, the gradients flattened for the reduction, the next unit
            gathered and the reduction launched and finished before that unit
            computes a gradient. Backward's worst moment then holds fewer
            copies of a unit (no gathered parameters next to the flat gradient
            and autograd's gradient; no reduction in flight next to the next
            unit's gradient); the reduction no longer overlaps computation.
            Same results.

    Example:
        >>> disttrain.init()
        >>> model = disttrain.FullyShardedDataParallel(Transformer(), stage=3, auto_wrap={Block})
        >>> optimizer = disttrain.ShardedOptimizer(torch.optim.AdamW, model, lr=1e-3)
        >>> loss = model(x).sum(); loss.backward()
        >>> model.clip_grad_norm_(1.0)
        >>> optimizer.step(); optimizer.zero_grad()
        >>> state = model.full_state_dict()   # on rank 0; {} elsewhere
    """

    def __init__(self, module: nn.Module, stage: int = 3, auto_wrap: Any = None,
                 process_group: dist.ProcessGroup | None = None, prefetch: bool = True,
                 mixed_precision: Any = None, backward_prefetch: str = "post",
                 activation_checkpointing: Any = None, lean_backward: bool = False):
        super().__init__()
        if isinstance(stage, bool) or stage not in (1, 2, 3):
            raise ValueError(f"FullyShardedDataParallel: stage must be 1, 2 or 3, got {stage!r}")
        mixed_dtype = wire_dtype(mixed_precision, "FullyShardedDataParallel", "mixed_precision")
        if not isinstance(prefetch, bool):
            raise TypeError(f"FullyShardedDataParallel: prefetch must be a bool, got {prefetch!r}")
        if not isinstance(lean_backward, bool):
            raise TypeError(f"FullyShardedDataParallel: lean_backward must be a bool, got {lean_backward!r}")
        _check_module(module)
        policy = _wrap_policy(auto_wrap)
        checkpoint_policy = _checkpoint_policy(activation_checkpointing)
        plan = _plan_units(module, policy)
        checkpointed = [m for m, _ in plan if m is not module and checkpoint_policy(m)]
        unit_modules = {id(m) for m, _ in plan}
        for m in checkpointed:
            inner = [name for name, sub in m.named_modules() if sub is not m and id(sub) in unit_modules]
            if inner:
                raise ValueError(f"FullyShardedDataParallel: activation_checkpointing chose a unit "
                                 f"({type(m).__name__}) that holds other units ({', '.join(inner[:3])}); "
                                 "checkpoint the inner units or wrap at one level")
        process_group = default_group("FullyShardedDataParallel", process_group)
        # Parses backward_prefetch: a ValueError before any collective.
        self._engine = _C.ShardEngine(process_group, stage=stage, prefetch=prefetch,
                                      wire_dtype=mixed_dtype, backward_prefetch=backward_prefetch,
                                      lean_backward=lean_backward)
        self.module = module
        self.process_group = process_group
        self.stage = stage
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self._state_keys = list(module.state_dict().keys())

        params = list(module.parameters())
        _C.verify_replicas(process_group, params, [n for n, _ in module.named_parameters()])
        with torch.no_grad():
            _C.broadcast_coalesced(process_group, params + list(module.buffers()), BROADCAST_CHUNK_BYTES, 0)

        self._slots: list[list[_ParamSlot]] = []
        self._root_unit: int | None = None
        self.flat_shards = nn.ParameterList()
        self._hooks = []
        # Units whose forward is checkpointed (an instance attribute over the class's forward; unwrap removes it).
        self._checkpointed: list[nn.Module] = []
        for unit_module, slots in plan:
            is_root = unit_module is module
            recompute = any(m is unit_module for m in checkpointed)
            index = self._engine.add_unit([getattr(s.owner, s.attr) for s in slots], [s.name for s in slots],
                                          is_root=is_root,
                                          gather_for_backward=recompute or not _backward_ignores_params(unit_module))
            if recompute:
                unit_module.forward = functools.partial(_checkpointed_forward, unit_module, unit_module.forward)
                self._checkpointed.append(unit_module)
            unit = self._engine.unit(index)
            shard = nn.Parameter(unit.shard)
            unit.set_shard(shard)
            self.flat_shards.append(shard)
            for s in slots:
                del s.owner._parameters[s.attr]
            self._slots.append(slots)
            if is_root:
                self._root_unit = index
            else:
                self._hooks.append(unit_module.register_forward_pre_hook(functools.partial(self._pre_forward, index)))
                self._hooks.append(unit_module.register_forward_hook(functools.partial(self._post_forward, index)))
            with torch.no_grad():
                self._install_views(index)
        self._engine.free_all()  # stage 3 starts sharded
        # Stage 3: what a unit's parameter attributes hold while it is freed (no view of freed memory).
        self._sharded_out = [[_ShardedOut(slot.name, view) for slot, view in zip(slots, self._engine.unit(i).params)]
                             for i, slots in enumerate(self._slots)]
        self._sharded_out_queued = False
        self._install_sharded_out_all()

    # --- hooks ------------------------------------------------------------------------------------

    def _install_views(self, index: int) -> None:
        for slot, view in zip(self._slots[index], self._engine.unit(index).params):
            slot.owner.__dict__[slot.attr] = view

    def _install_sharded_out(self, index: int) -> None:
        if self.stage == 3:
            for slot, stand_in in zip(self._slots[index], self._sharded_out[index]):
                slot.owner.__dict__[slot.attr] = stand_in

    def _install_sharded_out_all(self) -> None:
        self._sharded_out_queued = False
        for index in range(len(self._slots)):
            self._install_sharded_out(index)

    def _queue_sharded_out(self, grad: torch.Tensor | None = None) -> None:
        """In backward: the attributes become stand-ins again when it ends (the engine frees every unit then)."""
        if not self._sharded_out_queued:
            self._sharded_out_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._install_sharded_out_all)

    def _pre_forward(self, index: int, module: nn.Module | None = None, args: Any = None) -> None:
        self._engine.pre_forward(index)
        self._install_views(index)

    def _post_forward(self, index: int, module: nn.Module, args: Any, output: Any) -> None:
        self._engine.post_forward(index)
        self._install_sharded_out(index)  # stage 3: freed
        if self.stage == 3 and torch.is_grad_enabled():
            hook = functools.partial(self._pre_backward, index)
            for t in find_tensors(output):
                if t.requires_grad:
                    t.register_hook(hook)

    def _pre_backward(self, index: int, grad: torch.Tensor) -> None:
        self._engine.pre_backward(index)
        self._install_views(index)  # a checkpointed unit's recomputed forward reads them
        self._queue_sharded_out()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._engine.begin_forward()
        self._sharded_out_queued = False  # a backward that raised dropped its callback
        if self._root_unit is not None:
            self._pre_forward(self._root_unit)
        output = self.module(*args, **kwargs)
        if self._root_unit is not None:
            self._engine.post_forward(self._root_unit)
        self._engine.end_forward(torch.is_grad_enabled())
        if self.stage == 3:
            if not torch.is_grad_enabled():
                self._install_sharded_out_all()  # end_forward freed every unit
            else:  # the root stays gathered until backward ends
                for t in find_tensors(output):
                    if t.requires_grad:
                        t.register_hook(self._queue_sharded_out)
        return output

    # --- optimizer support ------------------------------------------------------------------------

    def gather_updated_parameters(self) -> None:
        """Stages 1 and 2: all-gathers the shards an optimizer step changed into
        the full parameters (:func:`ShardedOptimizer` calls it after each step).
        Stage 3 gathers on use; nothing to do. Collective: every rank calls it."""
        self._engine.gather_stale()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clips the gradients of all shards by their global norm (over every
        rank), like :func:`torch.nn.utils.clip_grad_norm_` on the unsharded
        model. Collective. Returns the total norm before clipping.

        Args:
            max_norm: the largest allowed norm.
            norm_type: 2 or ``float('inf')``.
        """
        if float(norm_type) not in (2.0, float("inf")):
            raise ValueError(f"clip_grad_norm_: norm_type must be 2 or inf, got {norm_type}")
        return torch.tensor(self._engine.clip_grad_norm(float(max_norm), float(norm_type)))

    # --- state dicts ------------------------------------------------------------------------------

    def _unit_infos(self) -> list[dict[str, Any]]:
        out = []
        for i in range(self._engine.num_units):
            u = self._engine.unit(i)
            out.append({"names": list(u.names), "shapes": [list(s) for s in u.shapes], "total": u.total_numel})
        return out

    def _non_param_state(self) -> dict[str, Any]:
        return self.module.state_dict()  # buffers and extra state: the parameters were taken out

    def full_state_dict(self, rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """The unwrapped module's ``state_dict()`` (same keys, same order),
        gathered. Collective: every rank calls it.

        Args:
            rank0_only: only rank 0 gets the dict, every other rank ``{}``
                (default); False: every rank gets it. Buffers (batch-norm
                statistics) are kept per rank, not synchronised: the dict
                holds rank 0's.

        Returns:
            An ``OrderedDict`` loadable into the plain model with ``load_state_dict``.
        """
        gathered: dict[str, torch.Tensor] = {}
        for i in range(self._engine.num_units):
            u = self._engine.unit(i)
            flat = u.gather_copy()
            if rank0_only and self.rank != 0:
                continue
            offset = 0
            for name, shape, numel in zip(u.names, u.shapes, u.numels):
                gathered[name] = flat[offset:offset + numel].view(shape).clone()
                offset += numel
        if rank0_only and self.rank != 0:
            return {}
        rest = self._non_param_state()
        if not rank0_only:  # buffers are per rank (not synchronised): everyone gets rank 0's
            rest = collections.OrderedDict((k, v.clone() if isinstance(v, torch.Tensor) else v)
                                           for k, v in rest.items())
            tensors = [v for v in rest.values() if isinstance(v, torch.Tensor)]
            if tensors:
                _C.broadcast_coalesced(self.process_group, tensors, BROADCAST_CHUNK_BYTES, 0)
        out: Any = collections.OrderedDict()  # carries torch's state-dict _metadata attribute
        for key in self._state_keys:
            out[key] = gathered[key] if key in gathered else rest[key]
        out._metadata = getattr(rest, "_metadata", None)
        return out

    def load_full_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a full (unwrapped) state dict: every rank passes the same dict
        and keeps its slice. Keys must match the unwrapped module's exactly.
        Collective at stages 1 and 2 (the parameters are gathered again)."""
        missing = [k for k in self._state_keys if k not in state_dict]
        unexpected = [k for k in state_dict if k not in set(self._state_keys)]
        if missing or unexpected:
            raise KeyError(f"FullyShardedDataParallel.load_full_state_dict: missing keys {missing}, "
                           f"unexpected keys {unexpected}")
        param_names = set()
        for i in range(self._engine.num_units):
            u = self._engine.unit(i)
            parts = []
            for name, shape in zip(u.names, u.shapes):
                t = state_dict[name]
                if list(t.shape) != list(shape):
                    raise ValueError(f"FullyShardedDataParallel.load_full_state_dict: '{name}' has shape "
                                     f"{list(t.shape)}, the model has {list(shape)}")
                parts.append(t.detach().reshape(-1).to(self.flat_shards[i].dtype))
                param_names.add(name)
            u.load_full(torch.cat(parts))
        self.module.load_state_dict({k: v for k, v in state_dict.items() if k not in param_names})
        self.gather_updated_parameters()

    def sharded_state_dict(self, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None, *,
                           extra: Any = None) -> None:
        """Writes a sharded checkpoint into directory ``path``: each rank its
        shards (and its optimizer state, if ``optimizer`` is given) as
        ``gen_<n>/shard_<rank>.dts`` in a new generation folder, then, once
        every rank's shard is durable, rank 0 the manifest ``manifest.dts``
        (layout, buffers, the generation) by an atomic rename. The manifest is
        the commit: a checkpoint already at ``path`` stays loadable, untouched,
        until the new one is complete on every rank, and a save that fails or
        is killed at any instant leaves it as it was. Older generations are
        deleted after the switch. Snapshot format (``disttrain.snapshot``). Collective.

        ``extra``: rank 0's further state (what :func:`disttrain.snapshot.save`
        stores) kept in the manifest, committed with the shards; read it back
        with :func:`read_sharded_checkpoint`."""
        from . import snapshot
        path = os.fspath(path)
        optimizer_units = self._optimizer_units(optimizer) if optimizer is not None else None
        # Rank 0 picks a generation no file in the folder uses (one past any
        # there, also a crashed save's); an all-reduce hands it to every rank.
        # (on the shards' device: an NCCL group reduces only CUDA tensors)
        number = torch.zeros(1, dtype=torch.int64,
                             device=self.flat_shards[0].device if self.flat_shards else torch.device("cpu"))
        if self.rank == 0:
            os.makedirs(path, exist_ok=True)
            used = [int(m.group(1)) for name in os.listdir(path) if (m := _GENERATION_RE.match(name))]
            number[0] = max(used, default=0) + 1
            os.mkdir(os.path.join(path, _generation_dir(int(number[0]))))
            fsync_directory(path)
        dist.all_reduce(number, op=dist.ReduceOp.MAX, group=self.process_group)
        generation = _generation_dir(int(number[0]))
        state = {"format": _SHARDED_FORMAT, "rank": self.rank, "world_size": self.world_size,
                 "shards": [p.detach() for p in self.flat_shards],
                 "optimizer": optimizer.state_dict() if optimizer is not None else None,
                 "optimizer_units": optimizer_units}
        snapshot.save(os.path.join(path, generation, _shard_file(self.rank)), state)
        dist.barrier(group=self.process_group)
        if self.rank == 0:
            manifest = {"format": _SHARDED_FORMAT, "world_size": self.world_size, "stage": self.stage,
                        "units": self._unit_infos(), "state_keys": self._state_keys,
                        "buffers": dict(self._non_param_state()), "has_optimizer": optimizer is not None,
                        "generation": generation, "extra": extra}
            snapshot.save(os.path.join(path, MANIFEST), manifest)  # the switch
            for name in os.listdir(path):  # what no manifest refers to any more
                full = os.path.join(path, name)
                if _GENERATION_RE.match(name) and name != generation:
                    shutil.rmtree(full, ignore_errors=True)
                elif _LEGACY_SHARD_RE.match(name):  # a checkpoint of the layout before generations
                    os.unlink(full)
        dist.barrier(group=self.process_group)

    def load_sharded_state_dict(self, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Loads a checkpoint written by :meth:`sharded_state_dict`, at any
        world size: each rank reads the saved shards that overlap its new
        slice and reshards them (also the optimizer's per-element state).
        The wrapping (units) must be the same. Collective."""
        from . import snapshot
        path = os.fspath(path)
        optimizer_units = self._optimizer_units(optimizer) if optimizer is not None else None
        manifest, generation = _read_manifest(path)
        mine = self._unit_infos()
        if [u["names"] for u in manifest["units"]] != [u["names"] for u in mine] or \
                [u["shapes"] for u in manifest["units"]] != [u["shapes"] for u in mine]:
            raise ValueError(f"sharded checkpoint '{path}' was saved with other units (auto_wrap) or another model")
        buffers = self._non_param_state()
        saved_buffers = manifest["buffers"]
        differ = [k for k in set(buffers) | set(saved_buffers) if k not in buffers or k not in saved_buffers
                  or (isinstance(buffers[k], torch.Tensor) and isinstance(saved_buffers[k], torch.Tensor)
                      and buffers[k].shape != saved_buffers[k].shape)]
        if differ:
            k = sorted(differ)[0]
            what = (f"{list(saved_buffers[k].shape)} in the checkpoint, {list(buffers[k].shape)} in the model"
                    if k in buffers and k in saved_buffers else
                    "only in the model" if k in buffers else "only in the checkpoint")
            raise ValueError(f"sharded checkpoint '{path}' was saved with another model: its buffers differ "
                             f"({len(differ)}, e.g. '{k}': {what})")
        if optimizer is not None and not manifest["has_optimizer"]:
            raise ValueError(f"sharded checkpoint '{path}' holds no optimizer state")
        old_world = manifest["world_size"]
        needed = sorted({r for u in mine for r in _C.reshard_sources(u["total"], old_world, self.rank,
                                                                       self.world_size)})
        if not needed and optimizer is not None:
            # Every slice of this rank is padding (a model smaller than the world): the
            # optimizer's param groups and scalar state still come from a saved rank.
            needed = [0]
        # Each rank reads only the shard files it needs: one that fails here must fail the load on
        # every rank, before any rank changes its model or enters the load's collectives.
        error: Exception | None = None
        try:
            saved = {r: snapshot.load(os.path.join(path, generation, _shard_file(r))) for r in needed}
            if optimizer_units is not None:
                # Which unit each saved optimizer parameter was (a checkpoint from before this was
                # recorded: taken to be this optimizer's, which torch's load then checks by count).
                saved_units = next(iter(saved.values())).get("optimizer_units", optimizer_units)
                if saved_units != optimizer_units:
                    raise ValueError(f"sharded checkpoint '{path}': its optimizer held the units' shards in the "
                                     f"order {saved_units}, this optimizer holds {optimizer_units}; build the "
                                     "optimizer over the same shards in the same order (param groups included)")
        except Exception as e:
            error = e
        failed = torch.zeros(self.world_size, dtype=torch.int64,
                             device=self.flat_shards[0].device if self.flat_shards else torch.device("cpu"))
        failed[self.rank] = int(error is not None)
        dist.all_reduce(failed, group=self.process_group)
        if error is not None:
            raise error
        if failed.any():
            ranks = failed.nonzero().flatten().tolist()
            who = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
            raise RuntimeError(f"sharded checkpoint '{path}' could not be loaded: {who} could not read the shard "
                               "files it needs (its own error says why); nothing was loaded")

        def reshard(total: int, pieces: dict[int, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
            # The placeholders for ranks not read carry the pieces' dtype: the engine takes the
            # result's dtype from the first one (a float32 placeholder rounded float64 shards).
            empty = torch.empty(0, dtype=dtype)
            return _C.reshard_flat([pieces.get(r, empty) for r in range(old_world)], total, self.rank,
                                   self.world_size)

        for i, u in enumerate(mine):
            self._engine.unit(i).load_shard(reshard(u["total"], {r: s["shards"][i] for r, s in saved.items()},
                                                    self.flat_shards[i].dtype))
        self.module.load_state_dict(manifest["buffers"])
        if optimizer is not None:
            assert optimizer_units is not None
            optimizer.load_state_dict(self._reshard_optimizer_state(saved, old_world, reshard, optimizer_units))
        self.gather_updated_parameters()
        dist.barrier(group=self.process_group)

    def _optimizer_units(self, optimizer: torch.optim.Optimizer) -> list[int]:
        """For each parameter of ``optimizer``, in its state dict's numbering (group by
        group), the unit whose shard it is."""
        unit_of = {id(p): i for i, p in enumerate(self.flat_shards)}
        units = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in unit_of:
                    raise ValueError("FullyShardedDataParallel: the optimizer holds a parameter that is not one of "
                                     "this model's shards (build it over model.parameters())")
                units.append(unit_of[id(p)])
        return units

    def _reshard_optimizer_state(self, saved: dict[int, Any], old_world: int, reshard,
                                 optimizer_units: list[int]) -> dict[str, Any]:
        any_saved = next(iter(saved.values()))["optimizer"]
        infos = self._unit_infos()
        state = {}
        for i, unit in enumerate(optimizer_units):  # i: the optimizer's numbering of its parameters
            u = infos[unit]
            old_numel = (u["total"] + old_world - 1) // old_world
            per_rank = {r: s["optimizer"]["state"].get(i) for r, s in saved.items()}
            if any(v is None for v in per_rank.values()):
                continue  # no step taken for this shard yet
            first = next(iter(per_rank.values()))
            entry = {}
            for key, value in first.items():
                if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == old_numel:
                    entry[key] = reshard(u["total"], {r: v[key] for r, v in per_rank.items()}, value.dtype)
                else:
                    entry[key] = value  # replicated (Adam's step)
            state[i] = entry
        return {"state": state, "param_groups": any_saved["param_groups"]}


def ShardedOptimizer(optimizer_class: type[torch.optim.Optimizer], model: FullyShardedDataParallel,
                     **optimizer_args: Any) -> torch.optim.Optimizer:
    """An ``optimizer_class`` optimizer over ``model``'s local shards: it steps
    on this rank's slice of every unit only (its state is 1/N of the
    unsharded optimizer's). After each step the stage 1 and 2 full parameters
    are gathered again from the updated shards (at stage 3 the next gather
    uses them anyway).

    Returns an instance of ``optimizer_class`` itself (with a step post-hook),
    so learning-rate schedulers, ``state_dict`` and ``zero_grad`` work as usual.

    Args:
        optimizer_class: e.g. ``torch.optim.SGD``, ``torch.optim.Adam``, ``torch.optim.AdamW``.
        model: a :class:`FullyShardedDataParallel`.
        **optimizer_args: passed to ``optimizer_class`` (``lr``, ``betas``, ...).

    Example:
        >>> optimizer = disttrain.ShardedOptimizer(torch.optim.Adam, model, lr=1e-3)
    """
    if not isinstance(model, FullyShardedDataParallel):
        raise TypeError(f"ShardedOptimizer: model must be a FullyShardedDataParallel, got {type(model).__name__}")
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise TypeError(f"ShardedOptimizer: optimizer_class must be a torch.optim.Optimizer subclass, "
                        f"got {optimizer_class!r}")
    optimizer = optimizer_class(model.parameters(), **optimizer_args)
    optimizer.register_step_post_hook(lambda opt, args, kwargs: model.gather_updated_parameters())
    return optimizer


def _read_manifest(path: str) -> tuple[dict[str, Any], str]:
    """A sharded checkpoint's manifest, checked, and the generation folder of its shards
    ("": the layout before generations, shards beside the manifest)."""
    from . import snapshot
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        raise FileNotFoundError(f"sharded checkpoint '{path}' has no {MANIFEST} (missing or incomplete)")
    manifest = snapshot.load(manifest_path)
    if manifest.get("format") != _SHARDED_FORMAT:
        raise ValueError(f"'{manifest_path}' is not a disttrain sharded checkpoint")
    generation = manifest.get("generation", "")
    if not isinstance(generation, str) or (generation and not _GENERATION_RE.match(generation)):
        raise ValueError(f"'{manifest_path}' names the generation {generation!r}, not a gen_<number> folder")
    _check_layout(manifest, manifest_path)
    return manifest, generation


_MAX_NUMEL = 1 << 62  # a manifest's sizes and their products must fit a tensor's int64 sizes


def _check_layout(manifest: dict[str, Any], manifest_path: str) -> None:
    """Refuses, by name, a manifest whose layout fields the loaders could not index: its
    checksums pass, but a buggy or hostile writer may still have written it (found by
    fuzz/python/fsdp_manifest_fuzzer.py: a KeyError, a TypeError, a loop over any world size,
    a size beyond int64)."""
    def refuse(why: str) -> NoReturn:
        raise ValueError(f"'{manifest_path}' is not a valid sharded checkpoint manifest: {why}")

    def whole(value: Any, low: int) -> bool:  # and within a tensor's int64 sizes
        return type(value) is int and low <= value <= _MAX_NUMEL

    world: Any = manifest.get("world_size")
    units = manifest.get("units")
    if not whole(world, 1) or world > 1 << 20:
        refuse(f"world_size {world!r}")
    if not isinstance(units, list):
        refuse("units is not a list")
    names: set[str] = set()
    for i, unit in enumerate(units):
        shapes = unit.get("shapes") if isinstance(unit, dict) else None
        unit_names = unit.get("names") if isinstance(unit, dict) else None
        if not (isinstance(unit, dict) and whole(unit.get("total"), 0) and isinstance(unit_names, list)
                and isinstance(shapes, list) and len(unit_names) == len(shapes)
                and all(isinstance(n, str) for n in unit_names)
                and all(isinstance(s, list) and all(whole(d, 0) for d in s)
                        and math.prod(max(d, 1) for d in s) <= _MAX_NUMEL for s in shapes)):
            refuse(f"unit {i} is not (total, names, shapes)")
        if sum(math.prod(s) for s in shapes) > unit["total"]:
            refuse(f"unit {i}'s parameters need more than its {unit['total']} elements")
        names.update(unit_names)
    buffers, keys = manifest.get("buffers"), manifest.get("state_keys")
    if not isinstance(buffers, dict) or not isinstance(keys, list):
        refuse("buffers or state_keys missing")
    unknown = [k for k in keys if not isinstance(k, str) or (k not in names and k not in buffers)]
    if unknown:
        refuse(f"state keys {unknown[:3]!r} are neither parameters nor buffers")


def read_sharded_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Any]:
    """Consolidates a checkpoint written by :meth:`FullyShardedDataParallel.sharded_state_dict`
    without a process group: every rank's shards are read and joined into the
    unwrapped module's full ``state_dict`` (parameters and buffers, the
    module's keys and order). Returns ``(state_dict, extra)``. Reads every
    shard file: for one process, not for every rank of a job."""
    from . import snapshot
    path = os.fspath(path)
    manifest, generation = _read_manifest(path)
    world = manifest["world_size"]
    shards = [snapshot.load(os.path.join(path, generation, _shard_file(r)))["shards"] for r in range(world)]
    if any(len(s) != len(manifest["units"]) for s in shards):
        raise ValueError(f"sharded checkpoint '{path}': its shard files do not hold one shard per unit of the manifest")
    params: dict[str, torch.Tensor] = {}
    for i, unit in enumerate(manifest["units"]):
        try:
            flat = _C.reshard_flat([s[i] for s in shards], unit["total"], 0, 1)
        except RuntimeError as e:  # the manifest's sizes do not match the shard files
            raise ValueError(f"sharded checkpoint '{path}', unit {i}: {e}") from None
        offset = 0
        for name, shape in zip(unit["names"], unit["shapes"]):
            numel = math.prod(shape)
            params[name] = flat[offset:offset + numel].view(shape).clone()
            offset += numel
    buffers = manifest["buffers"]
    state: Any = collections.OrderedDict((k, params[k] if k in params else buffers[k]) for k in manifest["state_keys"])
    return state, manifest.get("extra")
