"""A Lightning + Hydra experiment template on disttrain's strategies.

    python examples/lightning_hydra/train.py experiment=digits_ddp
    python examples/lightning_hydra/train.py experiment=digits_zero3 trainer.max_epochs=10
    python examples/lightning_hydra/train.py experiment=cifar10_ddp data.root=~/data/cifar10

Several nodes: run the same command on each node with MASTER_ADDR,
MASTER_PORT and NODE_RANK set and ``trainer.num_nodes=N`` (``trainer.devices``
processes per node), or under torchrun / Slurm (Lightning detects them).

Writes to the Hydra run folder: TensorBoard logs (``tensorboard/``),
checkpoints (``checkpoints/best-*.ckpt``, ``last.ckpt``, disttrain snapshots),
and ``metrics.json`` with the test metrics of the best checkpoint.
"""

from __future__ import annotations

import json
import math
import os

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, random_split

import disttrain.lightning  # noqa: F401  (registers "disttrain_ddp", "disttrain_zero1".."disttrain_zero3")
from disttrain import data as datasets
from disttrain import models

SHAPES = {"digits": (1, 8), "cifar10": (3, 32)}  # channels, image size


class DataModule(L.LightningDataModule):
    def __init__(self, name: str, root: str | None, batch_size: int, val_fraction: float, num_workers: int,
                 seed: int):
        super().__init__()
        if name not in SHAPES:
            raise ValueError(f"data.name must be one of {sorted(SHAPES)}, got {name!r}")
        if name != "digits" and not root:
            raise ValueError(f"data.name={name} reads its files from data.root=/path (nothing is downloaded)")
        self.name, self.root, self.batch_size = name, root, batch_size
        self.val_fraction, self.num_workers, self.seed = val_fraction, num_workers, seed

    def _load(self, train: bool) -> Dataset:
        if self.name == "digits":
            return datasets.digits(train=train)
        return datasets.get_dataset(self.name, root=os.path.expanduser(self.root or ""), train=train)

    def setup(self, stage: str) -> None:
        full = self._load(train=True)
        n_val = int(len(full) * self.val_fraction)  # type: ignore[arg-type]
        self.train_set, self.val_set = random_split(full, [len(full) - n_val, n_val],  # type: ignore[arg-type]
                                                    generator=torch.Generator().manual_seed(self.seed))
        self.test_set = self._load(train=False)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)


def build_model(name: str, kwargs: dict, data_name: str, resize: int | None) -> torch.nn.Module:
    channels, size = SHAPES[data_name]
    kwargs = {"num_classes": 10, **kwargs}
    if name == "mlp":
        kwargs.setdefault("in_features", channels * (resize or size) ** 2)
    else:
        kwargs.setdefault("in_channels", channels)
    if name == "vit_small" or name.startswith("vit_base"):
        kwargs.setdefault("image_size", resize or size)
    return models.get_model(name, **kwargs)


class Classifier(L.LightningModule):
    def __init__(self, name: str, kwargs: dict, data_name: str, resize: int | None, lr: float, weight_decay: float):
        super().__init__()
        self.save_hyperparameters()
        self.net = build_model(name, kwargs, data_name, resize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.resize:
            x = F.interpolate(x, size=self.hparams.resize, mode="bilinear", align_corners=False)
        return self.net(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log(f"{stage}/loss", loss, sync_dist=stage != "train", prog_bar=True)
        self.log(f"{stage}/acc", acc, sync_dist=stage != "train", prog_bar=stage != "train")
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_train_start(self) -> None:
        # The cosine schedule lasts trainer.max_epochs of this run. A run resumed with more epochs
        # restored the checkpoint's T_max and lr and trained the epochs past it at lr 0 (cosine's
        # minimum); the schedule is stretched here, after the restore (any checkpoint format).
        length = max(1, self.trainer.max_epochs or 1)
        for config in self.trainer.lr_scheduler_configs:
            schedule = config.scheduler
            if not isinstance(schedule, torch.optim.lr_scheduler.CosineAnnealingLR) or schedule.T_max == length:
                continue
            schedule.T_max = length
            t, low = schedule.last_epoch, schedule.eta_min
            lrs = [low + (base - low) * (1 + math.cos(math.pi * t / length)) / 2 for base in schedule.base_lrs]
            for group, lr in zip(schedule.optimizer.param_groups, lrs):
                group["lr"] = lr
            schedule._last_lr = lrs

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


# The types of the template's settings: an override of another type (trainer.max_epochs=abc) is one
# line here, before any process starts, not a TypeError deep inside Lightning in every process.
_INT, _FLOAT, _STR, _DICT = "a whole number", "a number", "a string", "a mapping"
SETTINGS = {"seed": _INT, "data.name": _STR, "data.batch_size": _INT, "data.val_fraction": _FLOAT,
            "data.num_workers": _INT, "model.name": _STR, "model.kwargs": _DICT, "model.resize": _INT,
            "model.lr": _FLOAT, "model.weight_decay": _FLOAT, "trainer.max_epochs": _INT, "trainer.num_nodes": _INT,
            "trainer.log_every_n_steps": _INT, "trainer.gradient_clip_val": _FLOAT}
NULLABLE = {"data.root", "model.resize", "trainer.gradient_clip_val"}


def config_problems(cfg: DictConfig) -> list[str]:
    """Settings of the wrong type, as ``key=value (expected ...)``."""
    problems = []
    for key, kind in SETTINGS.items():
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        if value is None and key in NULLABLE:
            continue
        ok = {_INT: isinstance(value, int) and not isinstance(value, bool),
              _FLOAT: isinstance(value, (int, float)) and not isinstance(value, bool),
              _STR: isinstance(value, str), _DICT: isinstance(value, DictConfig)}[kind]
        if not ok:
            problems.append(f"{key}={value!r} (expected {kind}{' or null' if key in NULLABLE else ''})")
    root = OmegaConf.select(cfg, "data.root")
    if root is not None and not isinstance(root, str):
        problems.append(f"data.root={root!r} (expected a path or null)")
    return problems


def strategy_from(config) -> object:
    if isinstance(config, str):
        return config
    return hydra.utils.instantiate(config)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> dict:
    problems = config_problems(cfg)
    if problems:
        raise SystemExit(f"train.py: bad setting(s): {'; '.join(problems)}")
    L.seed_everything(cfg.seed, workers=True)
    out = cfg.output_dir
    datamodule = DataModule(cfg.data.name, cfg.data.root, cfg.data.batch_size, cfg.data.val_fraction,
                            cfg.data.num_workers, cfg.seed)
    model = Classifier(cfg.model.name, OmegaConf.to_container(cfg.model.kwargs), cfg.data.name, cfg.model.resize,
                       cfg.model.lr, cfg.model.weight_decay)
    checkpoints = ModelCheckpoint(dirpath=os.path.join(out, "checkpoints"), filename="best-{epoch:02d}",
                                  monitor="val/acc", mode="max", save_last=True)
    trainer_cfg = OmegaConf.to_container(cfg.trainer)
    trainer_cfg["strategy"] = strategy_from(cfg.trainer.strategy)
    trainer = L.Trainer(**trainer_cfg, callbacks=[checkpoints],
                        logger=TensorBoardLogger(out, name="tensorboard", version=""))
    trainer.fit(model, datamodule=datamodule, ckpt_path="last" if os.path.exists(
        os.path.join(out, "checkpoints", "last.ckpt")) else None)
    best = checkpoints.best_model_path
    test_metrics = trainer.test(model, datamodule=datamodule, ckpt_path=best or None)[0]
    metrics = {"best_checkpoint": best, "best_val_acc": float(checkpoints.best_model_score or 0.0),
               **{k: float(v) for k, v in test_metrics.items()}}
    if trainer.is_global_zero:
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
