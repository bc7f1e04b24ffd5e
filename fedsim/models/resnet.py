"""torchvision's ResNet-18 adapted to small images, with swappable normalization."""

from __future__ import annotations

from torch import nn

from fedsim.models.layers import UnitRangeToSigned, conv2d, norm2d


def _swap_layers(module: nn.Module, normalization: str) -> None:
    """Replace every BatchNorm2d by the chosen normalization, and every conv by a scaled WS
    conv when normalization is none (FedWon's normalization-free ResNet)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, norm2d(normalization, child.num_features))
        elif isinstance(child, nn.Conv2d) and normalization == "none":
            new = conv2d(
                "none",
                child.in_channels,
                child.out_channels,
                child.kernel_size[0],
                child.stride[0],
                child.padding[0],
                child.bias is not None,
            )
            setattr(module, name, new)
        else:
            _swap_layers(child, normalization)


class ResNet18Small(nn.Module):
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 28-64 px images."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, normalization: str = "bn"
    ) -> None:
        super().__init__()
        # Imported here: torchvision pulls in torch._dynamo (~1-3 s), which every process
        # importing fedsim.models (each CLI call, each Ray actor) would otherwise pay.
        from torchvision.models import resnet18

        net = resnet18(weights=None, num_classes=num_classes)
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        _swap_layers(net, normalization)
        self.prep = UnitRangeToSigned()
        self.net = net

    def forward(self, x):
        return self.net(self.prep(x))
