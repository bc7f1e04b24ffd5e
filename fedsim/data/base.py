"""Multi-domain datasets: the in-memory form every loader returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedsim.registry import Registry


class ImageArray(Protocol):
    """uint8 images [N, H, W, C]: a numpy array, or a lazy reader with the same indexing."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: Any) -> np.ndarray: ...


@dataclass
class DomainSplit:
    """One domain's train and test parts.

    x_*: uint8 images [N, H, W, C] (numpy array or lazy ImageArray), all domains the same
    H, W, C. y_*: int64 labels [N] in [0, num_classes).
    """

    x_train: ImageArray
    y_train: np.ndarray
    x_test: ImageArray
    y_test: np.ndarray


CorruptedSource = Callable[[str, int], tuple[ImageArray, np.ndarray]]
"""``(corruption, severity) -> (uint8 images [N, H, W, C], int64 labels [N])``."""


@dataclass
class MultiDomainDataset:
    """Domains in a fixed order, sharing one label space and one image shape.

    Optional capability: ``corrupted_source``, for a dataset that ships pre-corrupted test
    sets (CIFAR-10-C): test streams then read a corruption shift from it instead of
    generating the corruption.
    """

    name: str
    domains: dict[str, DomainSplit]
    num_classes: int
    image_size: int
    channels: int = 3
    class_names: list[str] = field(default_factory=list)
    notes: str = ""
    corrupted_source: CorruptedSource | None = None


# Loaders: callable(cfg: fedsim.data.config.DataConfig) -> MultiDomainDataset
DATASETS: Registry = Registry("dataset", "fedsim.data.loaders", entry_points="fedsim.datasets")
