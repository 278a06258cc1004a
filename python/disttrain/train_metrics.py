"""Per-epoch metrics of the trainer: ``metrics.csv`` with the columns of the
epoch logs the advisor learns from (../shared/data/epoch-logs), so a run of
``disttrain train`` is one more row set for it."""

from __future__ import annotations

import csv
from typing import IO, Any, Mapping, Sequence

from ._atomic import umask, write_atomically

#: Column order of the reference epoch logs; the first, unnamed column is the epoch.
COLUMNS = [
    "", "epoch_timings", "test_acc", "test_error", "test_timings", "train_acc", "train_loss", "config_index",
    "model_name", "num_of_paramters", "num_of_layers", "model_type", "gpu", "is_distributed",
    "distributed_strategy", "num_of_nodes", "num_of_gpus", "rank", "dataset", "num_workers_data_loader",
    "distribute_data", "num_epochs", "batch_size", "learning_rate", "momentum", "weight_decay", "gamma",
    "milestones", "lr_scheduler", "optimizer", "criterion",
]

# history key -> CSV column
_PER_EPOCH = {"epoch_time": "epoch_timings", "test_time": "test_timings", "train_acc": "train_acc",
              "test_acc": "test_acc", "train_loss": "train_loss", "test_loss": "test_error"}


def write_metrics_csv(path: str, history: Mapping[str, Sequence[float]], configuration: Mapping[str, Any]) -> None:
    """Rewrites ``path`` from the whole history (atomically: a resumed run
    rewrites it from its snapshot, so no epoch appears twice)."""
    rows = len(history["train_loss"])

    def fill(f: IO[str]) -> None:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for epoch in range(rows):
            row = {"": epoch, **{col: history[key][epoch] for key, col in _PER_EPOCH.items()}}
            writer.writerow([row.get(c, configuration.get(c, "")) for c in COLUMNS])

    # fsynced before the rename, so that a crash never loses epochs the snapshot already has
    write_atomically(path, fill, mode=0o666 & ~umask())


def describe_run(model, optimizer, scheduler, loss_fn, world_size: int, local_world_size: int, backend: str,
                 batch_size: int, num_workers: int, epochs: int | None, device: str,
                 base_lr: float) -> dict[str, Any]:
    """The configuration columns a trainer knows by itself; the CLI adds
    ``model_name``, ``dataset`` and ``config_index``."""
    group = optimizer.param_groups[0]
    milestones = getattr(scheduler, "milestones", None)
    return {
        "num_of_paramters": sum(p.numel() for p in model.parameters()),
        "num_of_layers": sum(1 for m in model.modules() if next(m.parameters(recurse=False), None) is not None),
        "model_type": "cnn" if any("Conv" in type(m).__name__ for m in model.modules()) else "mlp",
        "gpu": device,
        "is_distributed": world_size > 1,
        "distributed_strategy": backend if world_size > 1 else "None",
        "num_of_nodes": max(1, world_size // max(1, local_world_size)),
        "num_of_gpus": world_size,
        "rank": 0,
        "num_workers_data_loader": num_workers,
        "distribute_data": True,
        "num_epochs": epochs if epochs is not None else "",
        "batch_size": batch_size,
        "learning_rate": base_lr,
        "momentum": group.get("momentum", ""),
        "weight_decay": group.get("weight_decay", ""),
        "gamma": getattr(scheduler, "gamma", ""),
        "milestones": ",".join(str(m) for m in sorted(milestones)) if milestones else "",
        "lr_scheduler": type(scheduler).__name__ if scheduler is not None else "",
        "optimizer": type(optimizer).__name__,
        "criterion": type(loss_fn).__name__,
    }
