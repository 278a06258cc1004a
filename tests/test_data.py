"""The embedded default data set: scikit-learn's digits, read without importing scikit-learn
(its import cost every process that trains on them about a second)."""

import subprocess
import sys

import numpy as np
import torch

from disttrain import data


def test_digits_are_load_digits_values():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, targets = data._digits_arrays()
    assert np.array_equal(images, bunch.images) and images.dtype == bunch.images.dtype
    assert np.array_equal(targets, bunch.target)
    train, test = data.digits(train=True), data.digits(train=False)
    assert len(train) + len(test) == 1797 and len(test) == int(1797 * 0.2)
    x, y = train.tensors
    assert x.shape[1:] == (1, 8, 8) and float(x.min()) >= 0 and float(x.max()) <= 1 and y.dtype == torch.long
    # The same split on every call (every rank must see the same one).
    assert torch.equal(data.digits(train=True).tensors[1], y)


def test_digits_do_not_import_sklearn():
    code = "import sys; from disttrain import data; data.digits(); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_cifar10_batch_that_is_not_a_pickle_names_the_file(tmp_path):
    import pytest

    from disttrain import data

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp_path / name).write_bytes(b"\x80\x02garbage")  # a pickle's start, then nothing that unpickles
    with pytest.raises(ValueError, match="data_batch_1' is not a CIFAR-10 python-pickle batch"):
        data.CIFAR10(str(tmp_path), train=True)
