"""fedsim: federated learning and test-time adaptation simulator on Flower.

``fedsim.run`` and ``fedsim.adapt`` are the Python API (:mod:`fedsim.api`); sweeps are
``fedsim.api.sweep`` (``fedsim.sweep`` is the sweep library's module, so that name is taken).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "adapt", "run"]

# The API's names resolve on first use: importing fedsim.api imports torch, Flower and Ray
# (seconds), and this package is imported by every command, `fedsim --version` included,
# which must answer at once. importlib (not an import statement) because the ground floor
# does not depend on the API; the API is found by name only when asked for.
_API = frozenset({"adapt", "run"})


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module("fedsim.api"), name)
    raise AttributeError(f"module 'fedsim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API)
