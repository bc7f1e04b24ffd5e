"""Former module of ``econtrol``, now :mod:`fedsim.strategies.compressed.econtrol`. Kept only so that a
scenario naming the strategy by its old import path ``strategies.econtrol:EControl`` still resolves;
use the name ``econtrol`` or ``fedsim.strategies.compressed.econtrol:EControl``."""

from fedsim.strategies.compressed.econtrol import EControl

__all__ = ["EControl"]
