"""Data sets by name. The embedded default, scikit-learn's digits (1,797 8x8
grey images, shipped with scikit-learn), needs no download."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def digits(train: bool = True, test_fraction: float = 0.2, seed: int = 0) -> TensorDataset:
    """The digits data set as ``(N, 1, 8, 8)`` float images in [0, 1] and labels.

    The train/test split is fixed by ``seed`` so every rank sees the same split.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    index = order[n_test:] if train else order[:n_test]
    return TensorDataset(images[index], labels[index])
