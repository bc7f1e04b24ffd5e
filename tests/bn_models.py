"""Small BatchNorm CNNs shared by the adapter and TTA tests (``from bn_models import small_bn_cnn``)."""

from __future__ import annotations

import torch
from torch import nn


def small_bn_cnn(seed: int = 0, width: int = 8, num_classes: int = 10, calibrate: bool = True) -> nn.Module:
    """Conv-BN2d-ReLU x2, pooled, Linear-BN1d-ReLU-Linear; running stats from random inputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # default init, seeded, without touching the global state
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, 16),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Linear(16, num_classes),
        )
    with torch.no_grad():
        if calibrate:
            model.train()
            for _ in range(10):
                model(torch.rand(32, 3, 16, 16, generator=gen))
    return model.eval()
