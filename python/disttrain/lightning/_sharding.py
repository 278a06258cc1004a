"""What the Trainer and Fabric ZeRO strategies share: turning optimizers built
on a module's parameters into optimizers over disttrain's flat shards, the
full (unsharded) optimizer state for checkpoints, and unwrapping."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import _C
from ..fsdp import FullyShardedDataParallel

_UNITS_KEY = "disttrain_units"


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
        for group, units in zip(optimizer.param_groups, plan):
            group["params"] = [model.flat_shards[u] for u in units]
        optimizer.register_step_post_hook(lambda opt, args, kwargs: model.gather_updated_parameters())


def _shard_units(model: FullyShardedDataParallel, optimizer: torch.optim.Optimizer) -> list[int]:
    by_id = {id(p): u for u, p in enumerate(model.flat_shards)}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: FullyShardedDataParallel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state with every per-element tensor gathered over the
    ranks into the unit's whole flat length (collective; every rank gets it).
    Loadable at any world size by :func:`load_full_optimizer_state`."""
    state = optimizer.state_dict()
    units = _shard_units(model, optimizer)
    group = model.process_group
    world = dist.get_world_size(group)
    full: dict[int, dict[str, Any]] = {}
    for index in sorted(state["state"]):
        shard_numel = model.flat_shards[units[index]].numel()
        total = model._engine.unit(units[index]).total_numel
        entry = {}
        for key, value in state["state"][index].items():
            if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == shard_numel:
                pieces = [torch.empty_like(value) for _ in range(world)]
                dist.all_gather(pieces, value.contiguous(), group=group)
                entry[key] = torch.cat(pieces)[:total]
            else:
                entry[key] = value
        full[index] = entry
    return {"state": full, "param_groups": state["param_groups"], _UNITS_KEY: units}


def load_full_optimizer_state(model: FullyShardedDataParallel, optimizer: torch.optim.Optimizer,
                              saved: dict[str, Any]) -> None:
    """Loads what :func:`full_optimizer_state` returned: each rank keeps its slice."""
    units = _shard_units(model, optimizer)
    if saved.get(_UNITS_KEY) != units:
        raise ValueError("disttrain ZeRO: the checkpoint's optimizer state was saved for other units "
                         f"({saved.get(_UNITS_KEY)}, this model has {units}); it is not a disttrain ZeRO "
                         "checkpoint of this model and wrapping")
    rank, world = dist.get_rank(model.process_group), dist.get_world_size(model.process_group)
    state = {}
    for index, entry in saved["state"].items():
        total = model._engine.unit(units[int(index)]).total_numel
        state[int(index)] = {key: (_C.reshard_flat([value], total, rank, world)
                                   if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == total
                                   else value)
                             for key, value in entry.items()}
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def unwrap(model: FullyShardedDataParallel) -> nn.Module:
    """Puts the full parameters back into the wrapped module as ordinary
    ``nn.Parameter`` s, removes the hooks and returns the module (collective)."""
    full = model.full_state_dict(rank0_only=False)
    for hook in model._hooks:
        hook.remove()
    model._hooks.clear()
    for slots in model._slots:
        for slot in slots:
            slot.owner.__dict__.pop(slot.attr, None)
            slot.owner._parameters[slot.attr] = nn.Parameter(full[slot.name].clone())
    return model.module
