"""Lightning Fabric on disttrain: your own training loop, disttrain's strategies.

    python examples/lightning_fabric.py                       # disttrain_ddp, 2 processes
    python examples/lightning_fabric.py --strategy disttrain_zero3 --epochs 5

Fabric starts the second process itself (it re-runs this script). The loop
accumulates two micro-batches per step (without communication for the first
under disttrain_ddp), clips by the global norm, and saves a checkpoint that
a second run resumes from.
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import disttrain.lightning  # noqa: F401  (registers "disttrain_ddp", "disttrain_zero1".."disttrain_zero3")
from disttrain import data, models


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="disttrain_ddp")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--checkpoint", default="fabric_example.ckpt")
    args = p.parse_args()

    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=args.strategy)
    fabric.launch()
    fabric.seed_everything(0)
    model = models.small_cnn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer = fabric.setup(model, optimizer)  # ZeRO: the optimizer now steps this rank's shards
    train = fabric.setup_dataloaders(DataLoader(data.digits(train=True), batch_size=32, shuffle=True))
    test = fabric.setup_dataloaders(DataLoader(data.digits(train=False), batch_size=128))

    state = {"model": model, "optimizer": optimizer, "epoch": 0}
    if os.path.exists(args.checkpoint):
        fabric.load(args.checkpoint, state)
        fabric.print(f"resumed after epoch {state['epoch']}")

    accumulate = 2
    while state["epoch"] < args.epochs:
        model.train()
        for i, (x, y) in enumerate(train):
            last = (i + 1) % accumulate == 0
            syncable = args.strategy == "disttrain_ddp"
            with fabric.no_backward_sync(model, enabled=syncable and not last):
                fabric.backward(F.cross_entropy(model(x), y) / accumulate)
            if last:
                fabric.clip_gradients(model, optimizer, max_norm=1.0)
                optimizer.step()
                optimizer.zero_grad()
        state["epoch"] += 1
        model.eval()
        correct = total = torch.zeros(())
        with torch.no_grad():
            for x, y in test:
                correct = correct + (model(x).argmax(1) == y).sum()
                total = total + len(y)
        accuracy = fabric.all_reduce(correct, reduce_op="sum") / fabric.all_reduce(total, reduce_op="sum")
        fabric.print(f"epoch {state['epoch']}: test accuracy {accuracy.item():.3f}")
        fabric.save(args.checkpoint, state)  # a disttrain snapshot, written in the background


if __name__ == "__main__":
    main()
