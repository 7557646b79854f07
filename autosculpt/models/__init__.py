"""Built-in models: the digits CNN (embedded default), CIFAR-style ResNet-20/56/110, VGG-16,
MobileNetV2 and a small ViT. ``get_model(name, **kwargs)`` builds one by name."""
from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from .cnn import digits_cnn, vgg16
from .mobilenet import mobilenetv2
from .resnet import resnet20, resnet56, resnet110
from .vit import VisionTransformer, vit_tiny

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": digits_cnn,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "vgg16": vgg16,
    "mobilenetv2": mobilenetv2,
    "vit_tiny": vit_tiny,
}
MODEL_NAMES = tuple(_REGISTRY)


def get_model(name: str, **kwargs) -> nn.Module:
    """Builds a built-in model by name (one of ``MODEL_NAMES``); kwargs go to its constructor
    (e.g. ``num_classes``, ``in_chans``)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"name: expected one of {', '.join(MODEL_NAMES)}; got {name!r}")
    return _REGISTRY[name](**kwargs)


__all__ = ["MODEL_NAMES", "get_model", "digits_cnn", "resnet20", "resnet56", "resnet110", "vgg16", "mobilenetv2", "vit_tiny", "VisionTransformer"]
