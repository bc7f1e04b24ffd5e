"""Former module of ``econtrol``, now :mod:`strategies.compressed.econtrol`. Kept only so that a
scenario naming the strategy by its old import path ``strategies.econtrol:EControl`` still resolves;
use the name ``econtrol`` or ``strategies.compressed.econtrol:EControl``."""

from strategies.compressed.econtrol import EControl

__all__ = ["EControl"]
