"""disttrain strategies for Lightning's ``Trainer``.

``"disttrain_ddp"``: the disttrain backend and disttrain's C++ gradient
reducer (:class:`disttrain.DistributedDataParallel`) in place of PyTorch's.
``"disttrain_zero1"`` / ``"disttrain_zero2"`` / ``"disttrain_zero3"``:
:class:`disttrain.FullyShardedDataParallel` at that stage, with the
LightningModule's optimizers stepping this rank's shards only. Checkpoints go
through :class:`SnapshotCheckpointIO` (checksummed, atomic, written in the
background) unless another ``CheckpointIO`` is given.
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import timedelta
from typing import Any, Generator, Literal, Mapping

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.strategy import _ForwardRedirection
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from torch import nn

from ..ddp import DistributedDataParallel
from .. import snapshot
from ..fsdp import MANIFEST, FullyShardedDataParallel, read_sharded_checkpoint
from . import _sharding
from ._checkpoint_io import SnapshotCheckpointIO, plain, restore

log = logging.getLogger("disttrain.lightning")

BACKEND = "disttrain"


def wait_for_writes(strategy: Any) -> None:
    """Every rank waits until rank 0's background checkpoint write is on disk
    (a load right after a save must see the file on every rank)."""
    wait = getattr(strategy.checkpoint_io, "wait", None)
    if wait is not None:
        wait()
    strategy.barrier()


class _DisttrainForwardRedirection(_ForwardRedirection):
    # Manual optimization runs backward inside training_step, that is inside
    # the wrapper's forward: the reducer must not be armed after that forward
    # (pre_backward arms it before each manual backward instead).
    def on_after_inner_forward(self, wrapper_module: nn.Module, original_module: Any) -> None:
        if isinstance(wrapper_module, DistributedDataParallel) and not original_module.automatic_optimization:
            wrapper_module.require_backward_grad_sync = False

    def on_after_outer_forward(self, wrapper_module: nn.Module, original_module: Any) -> None:
        if isinstance(wrapper_module, DistributedDataParallel) and not original_module.automatic_optimization:
            wrapper_module.require_backward_grad_sync = True


class _DisttrainStrategyBase(DDPStrategy):
    """What both disttrain strategies change in Lightning's DDPStrategy: the
    backend, the checkpoint format, no PyTorch DDP wrapper."""

    def __init__(self, *, accelerator: Any = None, parallel_devices: list[torch.device] | None = None,
                 cluster_environment: Any = None, checkpoint_io: Any = None, precision_plugin: Any = None,
                 process_group_backend: str | None = BACKEND, timeout: timedelta | None = default_pg_timeout,
                 start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
                 async_checkpoint: bool = True):
        if process_group_backend is None:
            process_group_backend = BACKEND
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment,
                         checkpoint_io=checkpoint_io if checkpoint_io is not None
                         else SnapshotCheckpointIO(async_write=async_checkpoint),
                         precision_plugin=precision_plugin, process_group_backend=process_group_backend,
                         timeout=timeout, start_method=start_method)
        self._forward_redirection = _DisttrainForwardRedirection()

    def setup_distributed(self) -> None:
        if self._process_group_backend == BACKEND:
            from ..distributed import register_backend
            register_backend()
        super().setup_distributed()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        wait_for_writes(self)
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def _register_ddp_hooks(self) -> None:
        pass  # PyTorch DDP communication hooks: not for disttrain's reducer

    def _interrupted(self) -> bool:
        module = self.lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        return trainer is None or trainer.state.status == TrainerStatus.INTERRUPTED


class DisttrainDDPStrategy(_DisttrainStrategyBase):
    """Data-parallel training with disttrain's backend and C++ reducer.

    ``Trainer(strategy="disttrain_ddp")`` after ``import disttrain.lightning``,
    or this class for options.

    Args:
        bucket_cap_mb: gradient bucket size in MiB (default: 25, or one bucket
            where the cores are all computing; see DistributedDataParallel's overlap).
        compression: ``"bf16"`` or ``"fp16"`` to all-reduce gradients in half
            precision; None (default) for full precision.
        gradient_as_bucket_view: gradients are views into their buckets (one
            copy less per step).
        find_unused_parameters: allow parameters without a gradient in some steps.
        broadcast_buffers: broadcast buffers (batch-norm statistics) from rank 0
            at every forward (default True).
        process_group_backend: ``"disttrain"`` (default); any other
            ``torch.distributed`` backend also drives the reducer.
        async_checkpoint: write checkpoints in the background (default True).
        start_method, timeout, ...: as for Lightning's ``DDPStrategy``.

    Example:
        >>> import disttrain.lightning
        >>> trainer = lightning.Trainer(accelerator="cpu", devices=2, strategy="disttrain_ddp")
        >>> trainer = lightning.Trainer(devices=2, strategy=DisttrainDDPStrategy(compression="bf16"))
    """

    strategy_name = "disttrain_ddp"

    def __init__(self, *, bucket_cap_mb: float | None = None, compression: str | None = None,
                 gradient_as_bucket_view: bool = False, find_unused_parameters: bool = False,
                 broadcast_buffers: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self._disttrain_ddp_kwargs = dict(bucket_cap_mb=bucket_cap_mb, compression=compression,
                                          gradient_as_bucket_view=gradient_as_bucket_view,
                                          find_unused_parameters=find_unused_parameters,
                                          broadcast_buffers=broadcast_buffers)

    def _setup_model(self, model: nn.Module) -> DistributedDataParallel:  # type: ignore[override]
        return DistributedDataParallel(model, **self._disttrain_ddp_kwargs)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        if isinstance(self.model, DistributedDataParallel):
            with self.model.no_sync():
                yield None
        else:
            yield None

    def pre_backward(self, closure_loss: torch.Tensor) -> None:
        module = self.lightning_module
        if isinstance(self.model, DistributedDataParallel) and module is not None \
                and not module.automatic_optimization and self.model.require_backward_grad_sync:
            self.model.prepare_for_backward(closure_loss)

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        pass

    def teardown(self) -> None:
        if isinstance(self.model, DistributedDataParallel):
            self.model = self.lightning_module
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register("disttrain_ddp", cls, description="disttrain backend and C++ DDP reducer",
                                   override=True)
        strategy_registry.register("disttrain_ddp_spawn", cls, description="disttrain_ddp, processes spawned",
                                   start_method="spawn", override=True)


class DisttrainZeroStrategy(_DisttrainStrategyBase):
    """ZeRO stages 1-3 (:class:`disttrain.FullyShardedDataParallel`) for the Trainer.

    The LightningModule's ``configure_optimizers`` builds its optimizers on the
    module's parameters as usual; the strategy then points them at this rank's
    flat shards (same optimizer objects, so schedulers keep working), and
    gathers the stage 1/2 parameters after each step. Gradient clipping by norm
    (``Trainer(gradient_clip_val=...)``) uses the global norm over all ranks.

    ``trainer.strategy.lightning_module_state_dict()`` returns the full state
    dict with the plain module's keys (on rank 0; ``{}`` elsewhere).
    Checkpoints hold the full model and optimizer state (gathered), so they
    load at any world size and with ``"disttrain_ddp"`` too. After ``fit`` the
    LightningModule holds ordinary full parameters again.

    Args:
        stage: 1, 2 or 3.
        auto_wrap: which submodules become units (see
            :class:`disttrain.FullyShardedDataParallel`); each unit is stepped by
            exactly one optimizer parameter group.
        mixed_precision: ``"bf16"`` / ``"fp16"`` on the wire, or None.
        prefetch, backward_prefetch: stage 3 gathers ahead (see FSDP).
        activation_checkpointing_policy: units whose forward is recomputed in
            backward instead of keeping activations, as Lightning's
            ``FSDPStrategy`` names it: a set of module classes (e.g.
            ``{Block}``), True (every wrapped unit) or a callable
            ``policy(module) -> bool``; None (default): none. FSDP's
            ``activation_checkpointing``.
        lean_backward: stage 3: backward's worst moment holds fewer copies
            of a unit, at the cost of overlapping reductions with computation
            less (see FSDP's ``lean_backward``); default False.
        async_checkpoint, start_method, timeout, ...: as for :class:`DisttrainDDPStrategy`.

    Not supported (a ValueError at set-up): manual optimization (its backward
    runs inside the sharded forward), a unit whose parameters are spread over
    several optimizers or parameter groups.

    Example:
        >>> trainer = lightning.Trainer(devices=2, strategy="disttrain_zero3")
        >>> trainer = lightning.Trainer(devices=2, strategy=DisttrainZeroStrategy(stage=3, auto_wrap={Block}))
    """

    def __init__(self, stage: int = 3, *, auto_wrap: Any = None, mixed_precision: Any = None,
                 prefetch: bool = True, backward_prefetch: str = "post", state_dict_type: str = "full",
                 activation_checkpointing_policy: Any = None, lean_backward: bool = False, **kwargs: Any):
        if isinstance(stage, bool) or stage not in (1, 2, 3):
            raise ValueError(f"DisttrainZeroStrategy: stage must be 1, 2 or 3, got {stage!r}")
        if state_dict_type not in ("full", "sharded"):
            raise ValueError(f"DisttrainZeroStrategy: state_dict_type must be 'full' or 'sharded', "
                             f"got {state_dict_type!r}")
        super().__init__(**kwargs)
        self.stage = stage
        self.state_dict_type = state_dict_type
        self._loaded_sharded = False
        self._fsdp_kwargs = dict(stage=stage, auto_wrap=auto_wrap, mixed_precision=mixed_precision,
                                 prefetch=prefetch, backward_prefetch=backward_prefetch,
                                 activation_checkpointing=activation_checkpointing_policy,
                                 lean_backward=lean_backward)

    @property
    def strategy_name(self) -> str:
        return f"disttrain_zero{self.stage}"

    def setup(self, trainer: Any) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        assert module is not None
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and self._layer_sync:
            self.model = self._layer_sync.apply(self.model)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if fitting:
            if not module.automatic_optimization:
                raise ValueError(f"{self.strategy_name}: manual optimization is not supported with ZeRO (its backward "
                                 "runs inside the sharded forward); use automatic optimization or 'disttrain_ddp'")
            names_by_id = {id(p): n for n, p in self.model.named_parameters()}
            self.setup_optimizers(trainer)  # built on the full parameters, retargeted below
            self.model = FullyShardedDataParallel(self.model, **self._fsdp_kwargs)
            inner = [o._optimizer if isinstance(o, LightningOptimizer) else o for o in self.optimizers]
            _sharding.retarget_optimizers(self.model, inner, names_by_id)
        else:
            _sync_module_states(self.model)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)

    def setup_precision_plugin(self) -> None:
        super().setup_precision_plugin()
        # A norm over this rank's shards is not the model's: clip by the global norm.
        plugin = self.precision_plugin
        plugin.clip_grad_by_norm = self._clip_grad_by_norm  # type: ignore[method-assign]

    def _clip_grad_by_norm(self, optimizer: Any, clip_val: float) -> None:
        if not isinstance(self.model, FullyShardedDataParallel):
            raise RuntimeError(f"{self.strategy_name}: gradient clipping outside fit")
        self.model.clip_grad_norm_(float(clip_val))

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the model is wrapped when the checkpoint loads: sharded checkpoints load shard by shard

    def _writes_sharded(self) -> bool:
        return self.state_dict_type == "sharded" and isinstance(self.model, FullyShardedDataParallel)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._writes_sharded():
            return {}  # save_checkpoint writes the shards themselves
        if isinstance(self.model, FullyShardedDataParallel):
            return self.model.full_state_dict(rank0_only=True)
        return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        if self._writes_sharded():
            return {}
        if isinstance(self.model, FullyShardedDataParallel):
            return _sharding.full_optimizer_state(self.model, optimizer)
        return optimizer.state_dict()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not self._writes_sharded():
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        if storage_options is not None:
            raise TypeError(f"{self.strategy_name}: storage_options is not supported")
        assert isinstance(self.model, FullyShardedDataParallel)
        optimizers = [o._optimizer if isinstance(o, LightningOptimizer) else o for o in self.optimizers]
        if len(optimizers) > 1:
            raise ValueError(f"{self.strategy_name}: a sharded checkpoint holds one optimizer, the module has "
                             f"{len(optimizers)}; use state_dict_type='full'")
        path = self.broadcast(os.fspath(filepath))
        if self.global_rank == 0 and os.path.isfile(path):
            os.unlink(path)  # a full checkpoint of the same name before
        extra = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        self.model.sharded_state_dict(path, optimizers[0] if optimizers else None, extra=plain(extra))

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        wait_for_writes(self)
        path = self.broadcast(os.fspath(checkpoint_path))
        self._loaded_sharded = False
        if not os.path.isdir(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        allow_pickle = weights_only is not True
        if isinstance(self.model, FullyShardedDataParallel):  # fitting: each rank reads what its shard needs
            optimizers = [o._optimizer if isinstance(o, LightningOptimizer) else o for o in self.optimizers]
            self.model.load_sharded_state_dict(path, optimizers[0] if optimizers else None)
            self._loaded_sharded = True
            checkpoint = restore(snapshot.load(os.path.join(path, MANIFEST)).get("extra"), allow_pickle, path)
            # Loaded above; the placeholders keep Lightning's restore (which checks for them) going.
            return {**checkpoint, "state_dict": {}, "optimizer_states": [{} for _ in optimizers]}
        state_dict, extra = read_sharded_checkpoint(path)  # testing, validating: the full model
        return {**restore(extra, allow_pickle, path), "state_dict": state_dict}

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if self._loaded_sharded:
            return
        if isinstance(self.model, FullyShardedDataParallel):
            self.model.load_full_state_dict(checkpoint["state_dict"])
        else:
            super().load_model_state_dict(checkpoint, strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if self._loaded_sharded:
            return
        states = checkpoint["optimizer_states"]
        if len(states) != len(self.optimizers):
            raise ValueError(f"{self.strategy_name}: the checkpoint holds {len(states)} optimizer states, the "
                             f"module configures {len(self.optimizers)}")
        for optimizer, state in zip(self.optimizers, states):
            inner = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
            if isinstance(self.model, FullyShardedDataParallel):
                _sharding.load_full_optimizer_state(self.model, inner, state)
            else:
                inner.load_state_dict(state)

    def teardown(self) -> None:
        if isinstance(self.model, FullyShardedDataParallel):
            if not self._interrupted():
                _sharding.unwrap(self.model)  # collective: only when every rank got here normally
            self.model = self.lightning_module
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for stage in (1, 2, 3):
            strategy_registry.register(f"disttrain_zero{stage}", cls,
                                       description=f"disttrain ZeRO stage {stage} (FullyShardedDataParallel)",
                                       stage=stage, override=True)

