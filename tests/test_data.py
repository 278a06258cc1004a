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


def _cifar_batches(folder, labels_of=lambda name: [0, 1, 2, 3]):
    import pickle

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": np.zeros((4, 3072), dtype=np.uint8), b"labels": labels_of(name)}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_batch_whose_labels_do_not_match_its_images_names_the_file(tmp_path):
    import pytest

    # Two labels for four images: the concatenated labels paired every later image with another's label.
    _cifar_batches(tmp_path, lambda name: [0, 1] if name == "data_batch_2" else [0, 1, 2, 3])
    with pytest.raises(ValueError, match="data_batch_2' is not a CIFAR-10 .*4 images but 2 labels"):
        data.CIFAR10(str(tmp_path), train=True)
    _cifar_batches(tmp_path, lambda name: [0, 1, 2, 10])  # class 10 of 0..9
    with pytest.raises(ValueError, match="test_batch' is not a CIFAR-10 .*labels 0 to 10, expected 0 to 9"):
        data.CIFAR10(str(tmp_path), train=False)
    _cifar_batches(tmp_path)
    assert len(data.CIFAR10(str(tmp_path), train=True)) == 20


def _images(folder, names):
    from PIL import Image

    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (255, 0, 0)).save(path)


def test_image_folder_test_split_uses_the_training_class_indices(tmp_path):
    import pytest

    # test/ without class 'a': its 'b' was class 0 there and class 1 in training, a silently wrong evaluation.
    _images(tmp_path, ["train/a/0.png", "train/b/0.png", "test/b/0.png"])
    train, test = data.ImageFolder(str(tmp_path), True, 4), data.ImageFolder(str(tmp_path), False, 4)
    assert train.classes == test.classes == ["a", "b"] and [int(test[i][1]) for i in range(len(test))] == [1]
    _images(tmp_path, ["test/c/0.png"])  # a class training never saw
    with pytest.raises(ValueError, match="class folder.* c of .* not in"):
        data.ImageFolder(str(tmp_path), False, 4)


def test_image_folder_with_train_alone_is_split_by_fraction(tmp_path):
    # train/ and no test/ nor val/: the test set was root's one "class" train/, and no images in it.
    _images(tmp_path, [f"train/{c}/{i}.png" for c in "ab" for i in range(5)])
    train, test = data.ImageFolder(str(tmp_path), True, 4), data.ImageFolder(str(tmp_path), False, 4)
    assert train.classes == test.classes == ["a", "b"]
    assert len(train) == 8 and len(test) == 2 and sorted(int(test[i][1]) for i in range(2)) == [0, 1]
    assert not {p for p, _ in train.samples} & {p for p, _ in test.samples}


def test_digits_test_fraction_outside_0_1_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="test_fraction 1.5"):
        data.digits(test_fraction=1.5)
    with pytest.raises(ValueError, match="test_fraction -0.1"):
        data.digits(train=False, test_fraction=-0.1)
    assert len(data.digits(test_fraction=0.0)) == 1797 and len(data.digits(train=False, test_fraction=1.0)) == 1797
