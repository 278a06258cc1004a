"""disttrain for Lightning users (``pip install disttrain[lightning]``).

``import disttrain.lightning`` registers these strategy names with both
Lightning's ``Trainer`` and ``Fabric``:

* ``"disttrain_ddp"``: the disttrain backend and disttrain's C++ gradient reducer;
* ``"disttrain_zero1"``, ``"disttrain_zero2"``, ``"disttrain_zero3"``: disttrain's
  FSDP (ZeRO) at that stage, with the LightningModule's optimizers stepping
  this rank's shards;
* ``"disttrain_decentralised"`` (Trainer only): each process is one peer of
  disttrain's decentralised training (no process group; DiLoCo rounds).

Checkpoints are written in disttrain's snapshot format (checksummed, atomic,
in the background) by :class:`SnapshotCheckpointIO`.

Example:
    >>> import lightning, disttrain.lightning
    >>> trainer = lightning.Trainer(accelerator="cpu", devices=2, strategy="disttrain_ddp")
    >>> trainer.fit(model, datamodule)
    >>> trainer.fit(model, datamodule, ckpt_path="last")   # resume
"""

from __future__ import annotations

try:
    import lightning  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("disttrain.lightning needs Lightning: pip install 'disttrain[lightning]' "
                      "(or pip install lightning)") from error

from lightning.fabric.strategies import STRATEGY_REGISTRY as _FABRIC_REGISTRY
from lightning.pytorch.strategies import StrategyRegistry as _TRAINER_REGISTRY

from ._checkpoint_io import SnapshotCheckpointIO, _patch_load_from_checkpoint, is_snapshot, load_checkpoint
from .decentralised import DisttrainDecentralisedStrategy
from .fabric import DisttrainFabricDDPStrategy, DisttrainFabricZeroStrategy
from .strategies import DisttrainDDPStrategy, DisttrainZeroStrategy

__all__ = ["DisttrainDDPStrategy", "DisttrainZeroStrategy", "DisttrainDecentralisedStrategy", "DisttrainFabricDDPStrategy",
           "DisttrainFabricZeroStrategy", "SnapshotCheckpointIO", "is_snapshot", "load_checkpoint",
           "STRATEGY_NAMES"]

#: The names ``import disttrain.lightning`` registers (Trainer and Fabric).
STRATEGY_NAMES = ("disttrain_ddp", "disttrain_zero1", "disttrain_zero2", "disttrain_zero3", "disttrain_decentralised")

DisttrainDDPStrategy.register_strategies(_TRAINER_REGISTRY)
DisttrainZeroStrategy.register_strategies(_TRAINER_REGISTRY)
DisttrainDecentralisedStrategy.register_strategies(_TRAINER_REGISTRY)
DisttrainFabricDDPStrategy.register_strategies(_FABRIC_REGISTRY)
DisttrainFabricZeroStrategy.register_strategies(_FABRIC_REGISTRY)
_patch_load_from_checkpoint()
