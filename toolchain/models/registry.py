"""Model registry: torchvision classifiers adapted to small inputs, and CIFAR ResNets.

Builders import torch/torchvision lazily so that validating a recipe (which checks
model names) stays fast. Every builder takes (num_classes, cifar_stem, **kwargs): the
recipe's `kwargs:` go to the underlying constructor. Other references (torchvision/...,
timm/..., package.module:callable) are resolved by resolve.py.
"""

from __future__ import annotations

from ..registry import Registry

MODELS: Registry = Registry("model")

# Families of the Malihi & Heidemann study, used by tests and the study matrix.
FAMILIES = {
    "resnet": ["resnet18", "resnet34", "resnet50", "cifar_resnet20", "cifar_resnet32", "cifar_resnet56"],
    "densenet": ["densenet121"],
    "efficientnet": ["efficientnet_b0"],
    "mobilenet": ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large"],
}


def build_model(name: str, num_classes: int, cifar_stem: bool = False, **kwargs):
    return MODELS.get(name)(num_classes=num_classes, cifar_stem=cifar_stem, **kwargs)


def _stride1_first_conv(features) -> None:
    """CIFAR stem for torchvision's Sequential-of-blocks models: first conv stride 1."""
    features[0][0].stride = (1, 1)


def _resnet(builder_name: str):
    def build(num_classes: int, cifar_stem: bool = False, **kwargs):
        import torch.nn as nn
        import torchvision.models as tvm

        model = getattr(tvm, builder_name)(weights=None, num_classes=num_classes, **kwargs)
        if cifar_stem:
            model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        return model

    return build


def _features_model(builder_name: str):
    def build(num_classes: int, cifar_stem: bool = False, **kwargs):
        import torchvision.models as tvm

        model = getattr(tvm, builder_name)(weights=None, num_classes=num_classes, **kwargs)
        if cifar_stem:
            _stride1_first_conv(model.features)
        return model

    return build


def _densenet(num_classes: int, cifar_stem: bool = False, **kwargs):
    import torch.nn as nn
    import torchvision.models as tvm

    # memory_efficient=False: checkpointed blocks do not trace for ONNX/NNI.
    model = tvm.densenet121(weights=None, num_classes=num_classes, **{"memory_efficient": False, **kwargs})
    if cifar_stem:
        model.features.conv0 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.features.pool0 = nn.Identity()
    return model


for _name in ("resnet18", "resnet34", "resnet50"):
    MODELS.register(_name)(_resnet(_name))
for _name in ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0"):
    MODELS.register(_name)(_features_model(_name))
MODELS.register("densenet121")(_densenet)


def _cifar_resnet(depth: int):
    def build(num_classes: int, cifar_stem: bool = True, **kwargs):
        from .cifar_resnet import CifarResNet

        return CifarResNet(depth=depth, num_classes=num_classes, **kwargs)

    return build


for _depth in (20, 32, 56):
    MODELS.register(f"cifar_resnet{_depth}")(_cifar_resnet(_depth))
