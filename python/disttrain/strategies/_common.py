"""What the strategies share: how an epoch is dealt out between processes,
and the evaluation of a model on a loader."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn


def split_epoch(num_samples: int, parts: int, part: int, epoch: int, seed: int, shuffle: bool = True) -> torch.Tensor:
    """The sample indices of ``part`` (0-based, of ``parts``) in ``epoch``: one
    permutation per epoch (seeded by ``seed + epoch``; the identity without
    ``shuffle``) dealt round-robin, so the parts are disjoint, together hold
    every sample exactly once (no padding) and differ in size by at most one."""
    if shuffle:
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch))
    else:
        order = torch.arange(num_samples)
    return order[part::parts]


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(input, target)`` of a loader's batch."""
    if isinstance(batch, Mapping):
        raise ValueError("batches must be (input, target) pairs, got a mapping")
    return batch[0], batch[1]


def evaluate(model: nn.Module, loader: Iterable[Any], loss_fn: Callable[..., torch.Tensor] | None = None,
             threads: int | None = None) -> tuple[float, float, int]:
    """``(mean loss, top-1 accuracy, samples)`` of ``model`` over ``loader``,
    without gradients, in eval mode; the model's mode (and, with ``threads``,
    torch's thread count) is restored afterwards. Without ``loss_fn`` the loss
    is not computed (NaN); it must accept ``reduction="sum"``. An empty loader
    gives 0 samples, accuracy 0 and loss NaN."""
    was_training, saved_threads = model.training, torch.get_num_threads()
    model.eval()
    if threads is not None:
        torch.set_num_threads(threads)
    total, correct, loss_sum = 0, 0, 0.0
    try:
        with torch.no_grad():
            for batch in loader:
                x, y = split_batch(batch)
                out = model(x)
                if loss_fn is not None:
                    loss_sum += float(loss_fn(out, y, reduction="sum"))
                correct += int((out.argmax(1) == y).sum())
                total += len(y)
    finally:
        torch.set_num_threads(saved_threads)
        model.train(was_training)
    mean_loss = loss_sum / total if loss_fn is not None and total else math.nan
    return mean_loss, correct / max(total, 1), total
