"""disttrain strategies for Lightning's ``Fabric``: ``Fabric(strategy="disttrain_ddp")``
and ``"disttrain_zero1"`` ... ``"disttrain_zero3"`` after ``import disttrain.lightning``."""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import DDPStrategy
from lightning.fabric.strategies.strategy import _BackwardSyncControl
from torch import nn

from ..ddp import DistributedDataParallel
from ..fsdp import FullyShardedDataParallel
from . import _sharding
from ._checkpoint_io import SnapshotCheckpointIO
from .strategies import wait_for_writes

BACKEND = "disttrain"


class _NoSync(_BackwardSyncControl):
    def no_backward_sync(self, module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
        if not enabled:
            return contextlib.nullcontext()
        if not isinstance(module, DistributedDataParallel):
            raise TypeError("no_backward_sync needs a module set up by the disttrain_ddp strategy, "
                            f"got {type(module).__name__}")
        return module.no_sync()


class _FabricBase(DDPStrategy):
    def __init__(self, *, accelerator: Any = None, parallel_devices: list[torch.device] | None = None,
                 cluster_environment: Any = None, checkpoint_io: Any = None, precision: Any = None,
                 process_group_backend: str | None = BACKEND, timeout: timedelta | None = default_pg_timeout,
                 start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
                 async_checkpoint: bool = True):
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment,
                         checkpoint_io=checkpoint_io if checkpoint_io is not None
                         else SnapshotCheckpointIO(async_write=async_checkpoint),
                         precision=precision, process_group_backend=process_group_backend or BACKEND,
                         timeout=timeout, start_method=start_method)

    def _setup_distributed(self) -> None:
        if self._process_group_backend == BACKEND:
            from ..distributed import register_backend
            register_backend()
        super()._setup_distributed()

    def load_checkpoint(self, path: Any, state: Any = None, strict: bool = True,
                        weights_only: bool | None = None) -> dict[str, Any]:
        wait_for_writes(self)
        return super().load_checkpoint(path, state, strict=strict, weights_only=weights_only)


class DisttrainFabricDDPStrategy(_FabricBase):
    """Fabric with disttrain's backend and C++ reducer; options as
    :class:`disttrain.lightning.DisttrainDDPStrategy`.

    Example:
        >>> fabric = Fabric(accelerator="cpu", devices=2, strategy="disttrain_ddp")
        >>> model, optimizer = fabric.setup(model, optimizer)
        >>> with fabric.no_backward_sync(model, enabled=accumulating):
        ...     fabric.backward(loss)
    """

    def __init__(self, *, bucket_cap_mb: float | None = None, compression: str | None = None,
                 gradient_as_bucket_view: bool = False, find_unused_parameters: bool = False,
                 broadcast_buffers: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self._backward_sync_control = _NoSync()
        self._disttrain_ddp_kwargs = dict(bucket_cap_mb=bucket_cap_mb, compression=compression,
                                          gradient_as_bucket_view=gradient_as_bucket_view,
                                          find_unused_parameters=find_unused_parameters,
                                          broadcast_buffers=broadcast_buffers)

    def setup_module(self, module: nn.Module) -> DistributedDataParallel:  # type: ignore[override]
        return DistributedDataParallel(module, **self._disttrain_ddp_kwargs)  # type: ignore[arg-type]

    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        if isinstance(module, DistributedDataParallel):
            module = module.module
        return module.state_dict()

    def load_module_state_dict(self, module: nn.Module, state_dict: dict[str, Any], strict: bool = True) -> None:
        if isinstance(module, DistributedDataParallel):
            module = module.module
        module.load_state_dict(state_dict, strict=strict)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register("disttrain_ddp", cls, description="disttrain backend and C++ DDP reducer",
                                   override=True)


class DisttrainFabricZeroStrategy(_FabricBase):
    """Fabric with :class:`disttrain.FullyShardedDataParallel` (ZeRO stage 1-3).
    Set up the model and its optimizers together (``fabric.setup(model,
    optimizer)``): the optimizers, built on the model's parameters, are pointed
    at this rank's shards. Checkpoints hold the full model and optimizer state.
    Options as :class:`disttrain.lightning.DisttrainZeroStrategy`."""

    def __init__(self, stage: int = 3, *, auto_wrap: Any = None, mixed_precision: Any = None,
                 prefetch: bool = True, backward_prefetch: str = "post",
                 activation_checkpointing_policy: Any = None, lean_backward: bool = False, **kwargs: Any):
        if isinstance(stage, bool) or stage not in (1, 2, 3):
            raise ValueError(f"DisttrainFabricZeroStrategy: stage must be 1, 2 or 3, got {stage!r}")
        super().__init__(**kwargs)
        self.stage = stage
        self._fsdp_kwargs = dict(stage=stage, auto_wrap=auto_wrap, mixed_precision=mixed_precision,
                                 prefetch=prefetch, backward_prefetch=backward_prefetch,
                                 activation_checkpointing=activation_checkpointing_policy,
                                 lean_backward=lean_backward)
        self._sharded: FullyShardedDataParallel | None = None

    def setup_module_and_optimizers(self, module: nn.Module, optimizers: list[torch.optim.Optimizer],
                                    scheduler: Any = None) -> tuple[nn.Module, list[torch.optim.Optimizer], Any]:
        names_by_id = {id(p): n for n, p in module.named_parameters()}
        sharded = self.setup_module(module)
        _sharding.retarget_optimizers(sharded, optimizers, names_by_id)
        return sharded, optimizers, scheduler

    def setup_module(self, module: nn.Module) -> FullyShardedDataParallel:  # type: ignore[override]
        self._sharded = FullyShardedDataParallel(module, **self._fsdp_kwargs)
        return self._sharded

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        raise ValueError("disttrain ZeRO under Fabric: set the model and its optimizers up together, "
                         "fabric.setup(model, optimizer), so that the optimizer steps this rank's shards")

    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        if isinstance(module, FullyShardedDataParallel):
            return module.full_state_dict(rank0_only=True)
        return module.state_dict()

    def load_module_state_dict(self, module: nn.Module, state_dict: dict[str, Any], strict: bool = True) -> None:
        if isinstance(module, FullyShardedDataParallel):
            module.load_full_state_dict(state_dict)
        else:
            module.load_state_dict(state_dict, strict=strict)

    def get_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        inner = getattr(optimizer, "optimizer", optimizer)
        if self._sharded is None:
            return inner.state_dict()
        return _sharding.full_optimizer_state(self._sharded, inner)

    def load_checkpoint(self, path: Any, state: Any = None, strict: bool = True,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if isinstance(state, dict) and self._sharded is not None:
            optimizers = {k: v for k, v in state.items() if isinstance(v, torch.optim.Optimizer)}
            rest = {k: v for k, v in state.items() if k not in optimizers}
            remainder = super().load_checkpoint(path, rest, strict=strict, weights_only=weights_only)
            for key, optimizer in optimizers.items():
                if key not in remainder:
                    continue
                _sharding.load_full_optimizer_state(self._sharded, getattr(optimizer, "optimizer", optimizer),
                                                    remainder.pop(key))
            state.update(rest)
            return remainder
        return super().load_checkpoint(path, state, strict=strict, weights_only=weights_only)

    def clip_gradients_norm(self, module: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float,
                            norm_type: float = 2.0, error_if_nonfinite: bool = True) -> torch.Tensor:
        self.precision.unscale_gradients(optimizer)
        if self._sharded is None:
            raise RuntimeError("clip_gradients_norm: no module set up with this strategy")
        norm = self._sharded.clip_grad_norm_(float(max_norm), float(norm_type))
        if error_if_nonfinite and not torch.isfinite(norm):
            raise RuntimeError(f"clip_gradients_norm: the total gradient norm is {norm.item()}")
        return norm

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for stage in (1, 2, 3):
            strategy_registry.register(f"disttrain_zero{stage}", cls, override=True,
                                       description=f"disttrain ZeRO stage {stage} (FullyShardedDataParallel)",
                                       stage=stage)
