"""Fabric with each disttrain strategy in one launch, for tests/test_lightning.py.

    python tests/lightning_fabric_worker.py OUT_DIR

Trains the same MLP with ``disttrain_ddp``, ``disttrain_zero1``,
``disttrain_zero2``, ``disttrain_zero3`` and ZeRO-3 with its memory options
(``disttrain_zero3_lowmem``: a unit per Linear, each checkpointed, lean
backward) (Adam, gradient clipping by norm,
two accumulation micro-batches per step), saves and reloads a Fabric
checkpoint, and has rank 0 train the same model alone on both ranks' data
as the reference. Rank 0 writes ``OUT_DIR/results.pt``.
"""

from __future__ import annotations

import os
import sys

import lightning as L
import torch
import torch.nn.functional as F

import disttrain.lightning  # registers the strategy names
from disttrain import data, models

STEPS, BATCH, CLIP = 4, 16, 0.5


def batches(rank: int, world: int):
    x, y = data.digits(train=True).tensors
    for step in range(STEPS):
        for micro in range(2):
            start = ((step * 2 + micro) * world + rank) * BATCH
            yield x[start:start + BATCH], y[start:start + BATCH], micro == 1


def build():
    torch.manual_seed(0)
    model = models.mlp(hidden=32)
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def fabric_strategy(name: str):
    if name == "disttrain_zero3_lowmem":
        return disttrain.lightning.DisttrainFabricZeroStrategy(stage=3, auto_wrap={torch.nn.Linear},
                                                               activation_checkpointing_policy=True,
                                                               lean_backward=True)
    return name


def train(strategy: str, out_dir: str) -> dict[str, torch.Tensor]:
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=fabric_strategy(strategy))
    fabric.launch()
    model, optimizer = build()
    model, optimizer = fabric.setup(model, optimizer)
    if strategy == "disttrain_zero3_lowmem":  # the options reached the engine: three units, all checkpointed
        assert len(fabric.strategy._sharded._checkpointed) == 3, fabric.strategy._sharded._checkpointed
    for x, y, last in batches(fabric.global_rank, fabric.world_size):
        with fabric.no_backward_sync(model, enabled=not last and strategy == "disttrain_ddp"):
            fabric.backward(F.cross_entropy(model(x), y) / 2)
        if last:
            fabric.clip_gradients(model, optimizer, max_norm=CLIP)
            optimizer.step()
            optimizer.zero_grad()
    path = os.path.join(out_dir, f"{strategy}.ckpt")
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": STEPS})
    fabric.barrier()
    # Reload into a fresh set-up: the parameters and Adam's moments must come back.
    model2, optimizer2 = build()
    model2, optimizer2 = fabric.setup(model2, optimizer2)
    loaded = {"model": model2, "optimizer": optimizer2, "step": 0}
    fabric.load(path, loaded)
    assert loaded["step"] == STEPS, loaded["step"]
    full = fabric.strategy.get_module_state_dict(model._forward_module)
    full2 = fabric.strategy.get_module_state_dict(model2._forward_module)
    if fabric.global_rank == 0:
        for k in full:
            assert torch.equal(full[k], full2[k]), k
    exp = [s.get("exp_avg") for s in optimizer.optimizer.state.values()]
    exp2 = [s.get("exp_avg") for s in optimizer2.optimizer.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(exp, exp2)) and len(exp) == len(exp2) > 0
    return {k: v.clone() for k, v in full.items()}


def reference() -> dict[str, torch.Tensor]:
    model, optimizer = build()
    for step in range(STEPS):
        for micro in range(2):
            parts = [b for b in zip(*[list(batches(r, 2))[step * 2 + micro][:2] for r in range(2)])]
            x, y = torch.cat(parts[0]), torch.cat(parts[1])
            (F.cross_entropy(model(x), y) / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict()


def main() -> None:
    out_dir = sys.argv[1]
    results = {}
    for strategy in ("disttrain_ddp", "disttrain_zero1", "disttrain_zero2", "disttrain_zero3",
                     "disttrain_zero3_lowmem"):
        results[strategy] = train(strategy, out_dir)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        results["reference"] = reference()
        torch.save(results, os.path.join(out_dir, "results.pt"))


if __name__ == "__main__":
    main()
