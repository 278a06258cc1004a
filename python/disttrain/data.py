"""Data sets by name. The embedded default, scikit-learn's digits (1,797 8x8
grey images, shipped with scikit-learn), needs no download; CIFAR-10 (standard on-disk format) and image folders are
read from a local folder."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset


def _digits_arrays() -> tuple[Any, Any]:
    """scikit-learn's digits as (images (1797, 8, 8) float64, targets int64), the values
    ``sklearn.datasets.load_digits`` returns. Read from the file it reads (the CSV shipped in
    scikit-learn, 0.1 s) without importing scikit-learn, whose import costs every process that
    trains on the digits about a second; through ``load_digits`` where that file is not found."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            table = np.loadtxt(path, delimiter=",")
            if table.shape == (1797, 65):
                return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def digits(train: bool = True, test_fraction: float = 0.2, seed: int = 0) -> TensorDataset:
    """The digits data set as ``(N, 1, 8, 8)`` float images in [0, 1] and labels.

    The train/test split is fixed by ``seed`` so every rank sees the same split.
    """
    if not 0 <= test_fraction <= 1:
        raise ValueError(f"digits: test_fraction {test_fraction!r}: expected a fraction from 0 to 1")
    pixels, targets = _digits_arrays()
    images = torch.tensor(pixels, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(targets, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    index = order[n_test:] if train else order[:n_test]
    return TensorDataset(images[index], labels[index])


# --- CIFAR-10 in its standard on-disk format ---------------------------------------------------

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)


class CIFAR10(Dataset):
    """CIFAR-10 from the python-pickle batches of ``cifar-10-python.tar.gz``
    (``data_batch_1`` ... ``data_batch_5``, ``test_batch``), unpacked under ``root``
    (either ``root/cifar-10-batches-py/`` or ``root/`` itself). Nothing is downloaded.

    Images stay uint8 in memory (150 MB for the training set) and are
    normalised per sample to ``(3, 32, 32)`` float.

    Args:
        root: folder holding the batches.
        train: the five training batches, or the test batch.

    Example:
        >>> train = CIFAR10("~/data/cifar10", train=True)
        >>> image, label = train[0]
    """

    classes = CIFAR10_CLASSES

    def __init__(self, root: str, train: bool = True):
        import os
        import pickle

        root = os.path.expanduser(root)
        folder = os.path.join(root, "cifar-10-batches-py")
        folder = folder if os.path.isdir(folder) else root
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
        if missing:
            raise FileNotFoundError(f"CIFAR-10: {', '.join(missing)} not found in '{folder}'; unpack "
                                    "cifar-10-python.tar.gz there (disttrain downloads nothing)")
        images, labels = [], []
        for name in names:
            path = os.path.join(folder, name)
            try:
                with open(path, "rb") as f:
                    batch = pickle.load(f, encoding="bytes")
                images.append(torch.as_tensor(batch[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
                labels.append(torch.as_tensor(batch[b"labels"], dtype=torch.long).reshape(-1))
                # A short label list would pair every later batch's images with another image's label.
                if len(labels[-1]) != len(images[-1]):
                    raise ValueError(f"{len(images[-1])} images but {len(labels[-1])} labels")
                if len(labels[-1]) and not 0 <= int(labels[-1].min()) <= int(labels[-1].max()) < len(CIFAR10_CLASSES):
                    raise ValueError(f"labels {int(labels[-1].min())} to {int(labels[-1].max())}, expected 0 to "
                                     f"{len(CIFAR10_CLASSES) - 1}")
            except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, IndexError,
                    RuntimeError) as e:
                raise ValueError(f"CIFAR-10: '{path}' is not a CIFAR-10 python-pickle batch ({type(e).__name__}: "
                                 f"{e}); expected the files of cifar-10-python.tar.gz") from None
        self.images = torch.cat(images)
        self.labels = torch.cat(labels)
        self._mean = torch.tensor(_CIFAR_MEAN).view(3, 1, 1)
        self._std = torch.tensor(_CIFAR_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = (self.images[index].float() / 255.0 - self._mean) / self._std
        return image, self.labels[index]


# --- image folders ------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".webp", ".tif", ".tiff")


class ImageFolder(Dataset):
    """Images in one folder per class (``root/<class>/<image>``), read with PIL,
    converted to RGB, resized to ``image_size`` and scaled to [0, 1].

    Class indices follow the sorted folder names of the training split, for the
    test split too. If ``root`` has ``train/`` and ``test/`` (or ``val/``)
    subfolders they are the split; otherwise (class folders in ``root``, or in
    ``train/`` alone) a fixed fraction of each class (chosen by ``seed``) is the
    test set.

    Args:
        root: the folder.
        train: training or test part.
        image_size: side of the square images produced.
        test_fraction, seed: split when there are no train/test subfolders.

    Example:
        >>> data = ImageFolder("~/data/flowers", train=True, image_size=64)
        >>> data.classes[data[0][1]]
    """

    def __init__(self, root: str, train: bool = True, image_size: int = 32, test_fraction: float = 0.2,
                 seed: int = 0):
        import os

        root = os.path.expanduser(root)
        held_out = next((s for s in ("test", "val") if os.path.isdir(os.path.join(root, s))), None)
        # train/ and test/ (or val/): the split. train/ alone: its class folders, split by fraction as a
        # root's would be (not root itself, whose one "class" would be train/).
        train_base = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
        use_subfolders = train_base != root and held_out is not None
        base = os.path.join(root, held_out) if use_subfolders and not train and held_out is not None else train_base
        if not os.path.isdir(base):
            raise FileNotFoundError(f"ImageFolder: '{base}' is not a folder")

        def class_folders(folder: str) -> list[str]:
            return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))

        # Class indices are the training split's, for the test split too: a test/ without one of
        # train/'s classes must not shift every later class's index.
        self.classes = class_folders(train_base)
        if not self.classes:
            raise FileNotFoundError(f"ImageFolder: no class folders in '{train_base}'")
        if base != train_base:
            extra = sorted(set(class_folders(base)) - set(self.classes))
            if extra:
                raise ValueError(f"ImageFolder: class folder(s) {', '.join(extra)} of '{base}' are not in "
                                 f"'{train_base}'; the two splits need the same classes")
        self.samples: list[tuple[str, int]] = []
        generator = torch.Generator().manual_seed(seed)
        found = 0  # images before the split by fraction
        for label, name in enumerate(self.classes):
            folder = os.path.join(base, name)
            if not os.path.isdir(folder):  # a class the test split does not have
                continue
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
            found += len(files)
            if not use_subfolders:
                order = torch.randperm(len(files), generator=generator).tolist()
                n_test = int(len(files) * test_fraction)
                chosen = order[n_test:] if train else order[:n_test]
                files = [files[i] for i in sorted(chosen)]
            self.samples += [(os.path.join(folder, f), label) for f in files]
        if not self.samples:
            held = (f"; the test split is {test_fraction:g} of each class's images, rounded down: none here "
                    "(add images, or train/ and test/ folders)" if found and not use_subfolders and not train else "")
            raise FileNotFoundError(f"ImageFolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under '{base}'{held}")
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
            data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        data = data.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float() / 255.0
        return data, torch.tensor(label)


DATASETS = ("digits", "cifar10", "imagefolder")


def get_dataset(name: str, root: str | None = None, train: bool = True, image_size: int = 32):
    """A data set by name: ``digits`` (embedded), ``cifar10`` or ``imagefolder`` (from ``root``).

    Returns:
        ``(dataset, num_classes, input_shape)`` with ``input_shape`` = ``(C, H, W)``.
    """
    if name == "digits":
        return digits(train), 10, (1, 8, 8)
    if root is None:
        raise ValueError(f"data set '{name}' needs a data folder (-d/--data)")
    if name == "cifar10":
        return CIFAR10(root, train), 10, (3, 32, 32)
    if name == "imagefolder":
        data = ImageFolder(root, train, image_size)
        return data, len(data.classes), (3, image_size, image_size)
    raise ValueError(f"unknown data set '{name}'; choose from {', '.join(DATASETS)}")
