"""What the Trainer and Fabric ZeRO strategies share: turning optimizers built
on a module's parameters into optimizers over disttrain's flat shards, the
full (unsharded) optimizer state for checkpoints, and unwrapping."""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import _C
from ..fsdp import FullyShardedDataParallel

# Each retargeted optimizer's parameter names per group, in configure_optimizers' order.
_PARAM_NAMES: weakref.WeakKeyDictionary[torch.optim.Optimizer, list[list[str]]] = weakref.WeakKeyDictionary()


def retarget_optimizers(model: FullyShardedDataParallel, optimizers: list[torch.optim.Optimizer],
                        names_by_id: dict[int, str]) -> None:
    """Points each parameter group of ``optimizers`` at the flat shards of the
    units its parameters belong to, in place (schedulers and wrappers holding
    the optimizers keep working), and gathers the stage 1/2 parameters after
    each step. ``names_by_id``: the module's parameters (by ``id``) and names,
    taken before wrapping.

    A unit's parameters must all be in one group of one optimizer: a unit is
    one flat tensor, stepped as a whole. Anything else is a ValueError that
    names the unit and how to fix it (``auto_wrap`` at a finer level).
    """
    unit_of: dict[str, int] = {}
    for u in range(model._engine.num_units):
        for unit_name in model._engine.unit(u).names:
            unit_of[unit_name] = u
    claimed: dict[int, str] = {}
    covered: set[str] = set()
    plans: list[list[list[int]]] = []
    for optimizer in optimizers:
        if optimizer.state:
            raise ValueError("disttrain ZeRO: the optimizer has already taken a step; set the strategy up first")
        plan = []
        for g, group in enumerate(optimizer.param_groups):
            owner = f"{type(optimizer).__name__} (id {id(optimizer)}) group {g}"
            units: list[int] = []
            for p in group["params"]:
                name = names_by_id.get(id(p))
                if name is None:
                    raise ValueError(f"disttrain ZeRO: parameter group {g} of {type(optimizer).__name__} holds a "
                                     "tensor that is not a parameter of the module being sharded")
                u = unit_of[name]
                if claimed.setdefault(u, owner) != owner:
                    raise ValueError(
                        f"disttrain ZeRO: unit {u} (parameters {list(model._engine.unit(u).names)[:3]}...) is split "
                        f"between {claimed[u]} and {owner}; a unit is one flat tensor stepped by one optimizer "
                        "group. Put its parameters in one group, or shard at a finer level with auto_wrap")
                covered.add(name)
                if u not in units:
                    units.append(u)
            plan.append(units)
        plans.append(plan)
    for u in claimed:
        missing = [n for n in model._engine.unit(u).names if n not in covered]
        if missing:
            raise ValueError(f"disttrain ZeRO: unit {u} has parameters no optimizer steps ({missing[:3]}); a unit is "
                             "stepped as a whole. Add them to the optimizer, or shard at a finer level with auto_wrap")
    for optimizer, plan in zip(optimizers, plans):
        _PARAM_NAMES[optimizer] = [[names_by_id[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        for group, units in zip(optimizer.param_groups, plan):
            group["params"] = [model.flat_shards[u] for u in units]
        optimizer.register_step_post_hook(lambda opt, args, kwargs: model.gather_updated_parameters())


def _unit_layout(model: FullyShardedDataParallel, u: int) -> dict[str, tuple[int, list[int]]]:
    """name -> (offset in the unit's flat tensor, shape)."""
    unit = model._engine.unit(u)
    layout, offset = {}, 0
    for name, shape, numel in zip(unit.names, unit.shapes, unit.numels):
        layout[name] = (offset, list(shape))
        offset += numel
    return layout


def _shard_units(model: FullyShardedDataParallel, optimizer: torch.optim.Optimizer) -> list[int]:
    by_id = {id(p): u for u, p in enumerate(model.flat_shards)}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _names(optimizer: torch.optim.Optimizer) -> list[list[str]]:
    names = _PARAM_NAMES.get(optimizer)
    if names is None:
        raise ValueError("disttrain ZeRO: this optimizer was not set up by a disttrain ZeRO strategy")
    return names


def full_optimizer_state(model: FullyShardedDataParallel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state as the same optimizer over the unsharded module
    would have it: per parameter (in the order ``configure_optimizers`` gave
    them), each per-element tensor gathered from the ranks and shaped like its
    parameter (collective; every rank gets it). So a full ZeRO checkpoint
    resumes under DDP or one process, and theirs under ZeRO, at any world size
    (:func:`load_full_optimizer_state`)."""
    state = optimizer.state_dict()
    units = _shard_units(model, optimizer)
    names = _names(optimizer)
    group = model.process_group
    world = dist.get_world_size(group)
    unit_state: dict[int, dict[str, Any]] = {}  # unit -> key -> full flat tensor or scalar
    for index in sorted(state["state"]):
        u = units[index]
        shard_numel = model.flat_shards[u].numel()
        entry = {}
        for key, value in state["state"][index].items():
            if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == shard_numel:
                pieces = [torch.empty_like(value) for _ in range(world)]
                dist.all_gather(pieces, value.contiguous(), group=group)
                entry[key] = torch.cat(pieces)
            else:
                entry[key] = value
        unit_state[u] = entry
    unit_of = {n: u for u in range(model._engine.num_units) for n in model._engine.unit(u).names}
    layouts = {u: _unit_layout(model, u) for u in set(units)}
    per_param: dict[int, dict[str, Any]] = {}
    groups = []
    index = 0
    for saved_group, group_names in zip(state["param_groups"], names):
        indices = []
        for name in group_names:
            u = unit_of[name]
            if u in unit_state:
                offset, shape = layouts[u][name]
                numel = math.prod(shape)
                # Every tensor its own copy: a scalar shared by the unit's parameters (Adam's step) would
                # come back from a snapshot as one tensor, and each parameter's step would advance it.
                per_param[index] = {key: (value[offset:offset + numel].view(shape).clone()
                                          if isinstance(value, torch.Tensor) and value.dim() == 1
                                          and value.numel() >= model._engine.unit(u).total_numel
                                          else value.clone() if isinstance(value, torch.Tensor) else value)
                                    for key, value in unit_state[u].items()}
            indices.append(index)
            index += 1
        groups.append({**saved_group, "params": indices})
    return {"state": per_param, "param_groups": groups}


def load_full_optimizer_state(model: FullyShardedDataParallel, optimizer: torch.optim.Optimizer,
                              saved: dict[str, Any]) -> None:
    """Loads a per-parameter optimizer state (from :func:`full_optimizer_state`,
    or saved under DDP or by one process with the same ``configure_optimizers``):
    each rank keeps its slice of every unit."""
    names = _names(optimizer)
    saved_groups = saved["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(n) for n in names]:
        raise ValueError("disttrain ZeRO: the checkpoint's optimizer has parameter groups of "
                         f"{[len(g['params']) for g in saved_groups]} parameters, this one "
                         f"{[len(n) for n in names]}: not the same configure_optimizers")
    name_of = {int(i): n for g, group_names in zip(saved_groups, names) for i, n in zip(g["params"], group_names)}
    by_name = {name_of[int(i)]: entry for i, entry in saved["state"].items()}
    rank, world = dist.get_rank(model.process_group), dist.get_world_size(model.process_group)
    state: dict[int, dict[str, Any]] = {}
    groups = []
    index = 0
    for saved_group, live_group in zip(saved_groups, optimizer.param_groups):
        indices = []
        for shard in live_group["params"]:
            u = next(k for k, p in enumerate(model.flat_shards) if p is shard)
            unit = model._engine.unit(u)
            found = [by_name.get(n) for n in unit.names]
            entries = [e for e in found if e is not None]
            if len(entries) == len(found):
                first = entries[0]
                entry = {}
                for key, value in first.items():
                    if isinstance(value, torch.Tensor) and value.shape == torch.Size(unit.shapes[0]) and \
                            all(isinstance(e[key], torch.Tensor) and e[key].shape == torch.Size(shape)
                                for e, shape in zip(entries, unit.shapes)):
                        full = torch.cat([e[key].reshape(-1) for e in entries])
                        entry[key] = _C.reshard_flat([full], unit.total_numel, rank, world)
                    else:  # the same for every parameter of the unit (Adam's step)
                        entry[key] = value.clone() if isinstance(value, torch.Tensor) else value
                state[index] = entry
            elif entries:
                raise ValueError(f"disttrain ZeRO: the checkpoint has optimizer state for some parameters of "
                                 f"unit {u} but not all ({[n for n, e in zip(unit.names, found) if e is None][:3]})")
            indices.append(index)
            index += 1
        groups.append({**saved_group, "params": indices})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def unwrap(model: FullyShardedDataParallel) -> nn.Module:
    """Puts the full parameters back into the wrapped module as ordinary
    ``nn.Parameter`` s, removes the hooks and returns the module (collective)."""
    full = model.full_state_dict(rank0_only=False)
    for hook in model._hooks:
        hook.remove()
    model._hooks.clear()
    for module in model._checkpointed:
        module.__dict__.pop("forward", None)  # the class's forward again
    model._checkpointed.clear()
    for slots in model._slots:
        for slot in slots:
            slot.owner.__dict__.pop(slot.attr, None)
            slot.owner._parameters[slot.attr] = nn.Parameter(full[slot.name])  # a copy of its own already
    return model.module
