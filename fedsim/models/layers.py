"""Normalization factory and the scaled weight-standardized convolution (FedWon)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

RELU_GAMMA = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))  # ~1.7139, keeps ReLU activations unit-variance


class ScaledWSConv2d(nn.Conv2d):
    """Conv2d with scaled weight standardization (Brock et al. 2021; FedWon).

    Per output channel i with fan-in N = C_in * k * k:
    ``W_hat[i] = gain[i] * gamma * (W[i] - mean(W[i])) / (std(W[i]) * sqrt(N))``
    with a learnable ``gain`` [C_out] initialised to 1 and ``gamma`` the ReLU constant.
    ``std`` is the population std with ``eps`` added to the variance.
    """

    def __init__(self, *args, gamma: float = RELU_GAMMA, eps: float = 1e-4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels))
        self.gamma = gamma
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        fan_in = w[0].numel()
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        scale = self.gain.view(-1, 1, 1, 1) * self.gamma / torch.sqrt((var + self.eps) * fan_in)
        return (w - mean) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


def conv2d(
    normalization: str, in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = True
) -> nn.Conv2d:
    """A plain conv, or a scaled WS conv when the model has no normalization (FedWon)."""
    cls = ScaledWSConv2d if normalization == "none" else nn.Conv2d
    return cls(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=bias)


def norm2d(normalization: str, channels: int, groups: int = 32) -> nn.Module:
    """Normalization after a conv: bn, gn (``groups`` or fewer), ln (GroupNorm with 1 group), none."""
    if normalization == "bn":
        return nn.BatchNorm2d(channels)
    if normalization == "gn":
        g = math.gcd(channels, groups)
        return nn.GroupNorm(g, channels)
    if normalization == "ln":
        return nn.GroupNorm(1, channels)
    if normalization == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalization '{normalization}'")


def norm1d(normalization: str, features: int) -> nn.Module:
    """Normalization after a linear layer; gn/ln both become LayerNorm here."""
    if normalization == "bn":
        return nn.BatchNorm1d(features)
    if normalization in ("gn", "ln"):
        return nn.LayerNorm(features)
    if normalization == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalization '{normalization}'")


NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


def is_norm_layer(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) or isinstance(module, nn.modules.batchnorm._NormBase)


class UnitRangeToSigned(nn.Module):
    """Maps inputs in [0, 1] to [-1, 1]; fixed, so it is neither trained nor sent."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.5) / 0.5
