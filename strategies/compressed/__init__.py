"""Compressed-communication strategies (docs/compression.md): one module per method, each
holding its equations, states, client step and server step, readable against its paper.

* :mod:`~fedsim.strategies.compressed.compressors`: the compressors (a registry of plug-ins);
* :mod:`~fedsim.strategies.compressed.base`: the compressed-uplink protocol every method shares;
* :mod:`~fedsim.strategies.compressed.plain` (``compressed``), :mod:`~fedsim.strategies.compressed.ef21`
  (``ef21``), :mod:`~fedsim.strategies.compressed.econtrol` (``econtrol``): the methods.

A new method is one new module here (docs/extending.md); every public module of this
package is imported with it, so its ``@STRATEGIES.register`` runs when fedsim looks up a
strategy name.
"""

import importlib
import pkgutil

# the pre-package import path ``fedsim.strategies.compressed:Compressed`` keeps resolving
from fedsim.strategies.compressed.plain import Compressed

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Compressed"]
