import pytest
import torch

from toolchain.models.registry import FAMILIES, MODELS, build_model
from toolchain.registry import UnknownNameError


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registry_model_runs_on_32x32(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121", "efficientnet_b0"])
def test_cifar_stem_keeps_more_resolution(name):
    from toolchain.metrics import count_macs

    plain, cifar = build_model(name, 10), build_model(name, 10, cifar_stem=True)
    assert count_macs(cifar, (1, 3, 32, 32)) > 3 * count_macs(plain, (1, 3, 32, 32))


def test_families_are_registered():
    for names in FAMILIES.values():
        for name in names:
            assert name in MODELS


def test_unknown_model_suggests():
    with pytest.raises(UnknownNameError, match="Did you mean 'resnet18'"):
        MODELS.get("resnet19")
