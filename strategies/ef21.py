"""Former module of ``ef21``, now :mod:`fedsim.strategies.compressed.ef21`. Kept only so that a
scenario naming the strategy by its old import path ``strategies.ef21:EF21`` still resolves;
use the name ``ef21`` or ``fedsim.strategies.compressed.ef21:EF21``."""

from fedsim.strategies.compressed.ef21 import EF21

__all__ = ["EF21"]
