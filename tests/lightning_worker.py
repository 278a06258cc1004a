"""Lightning Trainer runs on CPU processes, for tests/test_lightning.py.

    python tests/lightning_worker.py --strategy disttrain_ddp --out params.pt
    python tests/lightning_worker.py --strategy disttrain_zero1 --out a.pt --then --strategy disttrain_ddp --out b.pt

Lightning's own launcher starts the other processes (it re-runs this script),
or torchrun does (``--devices`` then counts processes per node). Rank 0 writes
the LightningModule's final ``state_dict`` to ``--out``.

``--then`` separates runs that share one launch (one set of processes, each
importing Lightning once): each is a fresh Trainer, model, optimizer and
data loader, seeded as a launch of its own would be; the process group of
the first run is kept by the later ones. Rank 0 prints ``RUN_MARKER`` and the
run's index on stdout and stderr before each run, so a caller can tell the
runs' logs apart.
"""

from __future__ import annotations

import argparse
import os
import sys

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

import disttrain.lightning  # registers the disttrain strategy names
from disttrain import data, models


class Classifier(L.LightningModule):
    def __init__(self, model: str = "mlp", optimizer: str = "sgd", lr: float = 0.05, manual: bool = False,
                 clip: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.net = models.vit_small() if model == "vit" else models.mlp(hidden=64)
        self.automatic_optimization = not manual

    def forward(self, x):
        return self.net(x.view(-1, 1, 8, 8))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        if not self.automatic_optimization:  # the same steps as automatic optimization, by hand
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            if self.hparams.clip:
                self.clip_gradients(opt, gradient_clip_val=self.hparams.clip, gradient_clip_algorithm="norm")
            opt.step()
            if self.trainer.is_last_batch:
                self.lr_schedulers().step()
        return loss

    def configure_optimizers(self):
        if self.hparams.optimizer == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr * 0.1)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)}


class KillAt(Callback):
    """Kills this process with SIGKILL when rank ``rank`` reaches ``step`` (first attempt only)."""

    def __init__(self, rank: int, step: int, marker: str):
        self.rank, self.step, self.marker = rank, step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), 9)


def strategy(name: str):
    if name == "ddp_gloo":
        return DDPStrategy(process_group_backend="gloo")
    if name == "ddp_disttrain":
        return DDPStrategy(process_group_backend="disttrain")
    if name.endswith("_sharded"):  # disttrain_zero<stage>_sharded: sharded checkpoints
        return disttrain.lightning.DisttrainZeroStrategy(stage=int(name[len("disttrain_zero")]),
                                                         state_dict_type="sharded")
    if name == "disttrain_zero3_lowmem":  # per-Linear units, each checkpointed, lean backward
        return disttrain.lightning.DisttrainZeroStrategy(stage=3, auto_wrap={torch.nn.Linear},
                                                         activation_checkpointing_policy=True, lean_backward=True)
    return name


RUN_MARKER = "lightning_worker: run"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="disttrain_ddp")
    p.add_argument("--model", default="mlp")
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batches", type=int, default=5, help="training batches per epoch")
    p.add_argument("--clip", type=float, default=0.0)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--manual", action="store_true")
    p.add_argument("--ckpt-dir")
    p.add_argument("--resume", action="store_true", help="fit(ckpt_path='last')")
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-step", type=int, default=-1)
    p.add_argument("--out")
    return p


def split_runs(argv: list[str]) -> list[list[str]]:
    """The runs' argument lists: ``argv`` split at each ``--then``."""
    runs: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--then":
            runs.append([])
        else:
            runs[-1].append(arg)
    return runs


def main() -> None:
    runs = [parser().parse_args(argv) for argv in split_runs(sys.argv[1:])]
    for index, args in enumerate(runs):
        if len(runs) > 1 and int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
            for stream in (sys.stdout, sys.stderr):
                print(f"{RUN_MARKER} {index}", file=stream, flush=True)
        train(args)


def train(args: argparse.Namespace) -> None:
    L.seed_everything(0, workers=True)
    loader = DataLoader(data.digits(train=True), batch_size=16, shuffle=True)
    model = Classifier(args.model, args.optimizer, manual=args.manual, clip=args.clip if args.manual else 0.0)
    callbacks: list[Callback] = []
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, save_last=True, save_top_k=-1,
                                         every_n_epochs=1))
    if args.kill_rank >= 0:
        callbacks.append(KillAt(args.kill_rank, args.kill_step, os.path.join(args.ckpt_dir, "killed")))
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes,
                        strategy=strategy(args.strategy), max_epochs=args.epochs, limit_train_batches=args.batches,
                        limit_val_batches=0, logger=False, enable_checkpointing=bool(args.ckpt_dir),
                        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=None if args.manual else args.clip or None, accumulate_grad_batches=args.accumulate,
                        deterministic=True)
    trainer.fit(model, loader, ckpt_path="last" if args.resume else None)
    if trainer.global_rank == 0 and args.out:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, args.out)


if __name__ == "__main__":
    main()
