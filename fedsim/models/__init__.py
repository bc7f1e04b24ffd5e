"""Model registry: a name (or an import path to a user's nn.Module class/factory)."""

from __future__ import annotations

import torch
from torch import nn

from fedsim.models.cnn import DigitsCNN, SmallCNN
from fedsim.models.layers import is_norm_layer
from fedsim.models.resnet import ResNet18Small
from fedsim.registry import Registry

MODELS: Registry = Registry("model", entry_points="fedsim.models")
MODELS.register("cnn-small")(SmallCNN)
MODELS.register("fedbn-cnn")(DigitsCNN)
MODELS.register("resnet18")(ResNet18Small)


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    normalization: str = "bn",
    args: dict | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Build a model; ``seed`` makes the initial weights reproducible without touching
    the global RNG of the caller."""
    factory = MODELS.get(name)
    kwargs = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size, normalization=normalization)
    kwargs.update(args or {})
    if seed is None:
        return factory(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(**kwargs)


def norm_state_keys(model: nn.Module) -> set[str]:
    """state_dict keys that belong to normalization layers (FedBN keeps these local)."""
    keys: set[str] = set()
    for prefix, module in model.named_modules():
        if is_norm_layer(module):
            for key in module.state_dict():
                keys.add(f"{prefix}.{key}" if prefix else key)
    return keys


__all__ = ["MODELS", "build_model", "norm_state_keys", "DigitsCNN", "SmallCNN", "ResNet18Small"]
