"""Models by name: shapes, parameter counts and the two ResNet stems."""

import pytest
import torch

from disttrain import models


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_resnet18_classifies_32x32_images(stem):
    model = models.resnet18(num_classes=10, stem=stem)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_imagenet_stem_has_torchvisions_parameter_count():
    # torchvision.models.resnet18() has 11,689,512 parameters (1000 classes);
    # the stems differ only in the first conv (7x7 against 3x3 kernels).
    assert sum(p.numel() for p in models.resnet18(num_classes=1000, stem="imagenet").parameters()) == 11_689_512
    cifar = sum(p.numel() for p in models.resnet18(num_classes=1000).parameters())
    assert cifar == 11_689_512 - 64 * 3 * (49 - 9)


def test_imagenet_stem_downsamples_4x_before_the_first_block():
    seen = {}
    model = models.resnet18(stem="imagenet")
    model.layer1.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    model(torch.randn(2, 3, 32, 32))
    assert seen["shape"][-2:] == (8, 8)


def test_unknown_stem_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown ResNet stem 'vgg'"):
        models.resnet18(stem="vgg")


@pytest.mark.parametrize("name", ["resnet9000", None, 18, ["mlp"]])
def test_unknown_model_lists_the_choices(name):
    # None, 18, a list: was AttributeError ("'NoneType' object has no attribute 'lower'")
    with pytest.raises(ValueError, match=r"unknown model .*; choose from resnet18, .*, vit_small$"):
        models.get_model(name)


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_model_trains_a_step_with_other_classes(name):
    torch.manual_seed(0)
    if name.startswith("vit_base"):
        model, x = models.get_model(name, num_classes=3, image_size=64), torch.randn(2, 3, 64, 64)
    elif name.startswith("resnet"):
        model, x = models.get_model(name, num_classes=3, in_channels=1), torch.randn(2, 1, 16, 16)
    elif name == "mlp":
        model, x = models.get_model(name, num_classes=3, in_features=64), torch.randn(2, 1, 8, 8)
    else:
        model, x = models.get_model(name, num_classes=3), torch.randn(2, 1, 8, 8)
    out = model(x)
    assert out.shape == (2, 3)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
