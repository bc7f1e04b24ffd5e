"""Plug-ins for tests/broken/: each is wrong in one way a user's plug-in can be
(named by import path ``broken_plugins:...``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

from typing import Any

from fedsim.strategies.fedavg import FedAvg


class RaisingStrategy(FedAvg):
    """A strategy whose constructor fails."""

    def __init__(self, **kwargs: Any) -> None:
        raise RuntimeError("needs a licence server")


def dict_loader(cfg: Any) -> dict:
    """A dataset loader returning the wrong type."""
    return {"red": [1, 2, 3]}


def not_a_model(**kwargs: Any) -> int:
    """A model factory returning something that is not an nn.Module."""
    return 42
