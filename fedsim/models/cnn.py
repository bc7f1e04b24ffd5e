"""CNNs for small images: the FedBN Digits-Five CNN and a lighter default."""

from __future__ import annotations

from torch import nn

from fedsim.models.layers import UnitRangeToSigned, conv2d, norm1d, norm2d


class DigitsCNN(nn.Module):
    """The CNN of FedBN's Digits-Five experiments: conv 64-64-128 (5x5), fc 2048-512.

    Each conv/fc is followed by the chosen normalization and ReLU; max-pool after the first
    two convs. Input [B, C, H, W] in [0, 1]; output logits [B, num_classes].
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, image_size: int = 28, normalization: str = "bn"
    ) -> None:
        super().__init__()
        n = normalization
        self.prep = UnitRangeToSigned()
        self.features = nn.Sequential(
            conv2d(n, in_channels, 64, 5, padding=2),
            norm2d(n, 64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            conv2d(n, 64, 64, 5, padding=2),
            norm2d(n, 64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            conv2d(n, 64, 128, 5, padding=2),
            norm2d(n, 128),
            nn.ReLU(inplace=True),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * side * side, 2048),
            norm1d(n, 2048),
            nn.ReLU(inplace=True),
            nn.Linear(2048, 512),
            norm1d(n, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(self.prep(x)))


class SmallCNN(nn.Module):
    """A light CNN for fast experiments: conv 32-64-64 (3x3), fc 128, norm after each layer.

    About 10x cheaper than :class:`DigitsCNN` at 28x28; used by the default scenario so
    that it finishes in minutes on two CPU cores. Input [B, C, H, W] in [0, 1].
    ``pool`` (default 2): side of the average pooling before the classifier; 1 is global
    average pooling, as in ResNets, after which a single image's per-channel normalization
    (test-batch BN at batch size 1) leaves almost no information.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 28,
        normalization: str = "bn",
        width: int = 32,
        pool: int = 2,
    ) -> None:
        super().__init__()
        if pool < 1:
            raise ValueError(f"cnn-small: pool must be >= 1 (got {pool})")
        n, w = normalization, width
        self.prep = UnitRangeToSigned()
        self.features = nn.Sequential(
            conv2d(n, in_channels, w, 3, padding=1),
            norm2d(n, w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            conv2d(n, w, 2 * w, 3, padding=1),
            norm2d(n, 2 * w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            conv2d(n, 2 * w, 2 * w, 3, padding=1),
            norm2d(n, 2 * w),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(pool),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * w * pool * pool, 128),
            norm1d(n, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(self.prep(x)))
