"""Test-time adapters: one module per method, registered in :data:`ADAPTERS`.

Build one with :func:`build_adapter` (settings override the defaults key by key; an
unknown setting is a ``TypeError`` naming it).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fedsim.adapters.base import Adapter, SplitAdapter, adapter_settings
from fedsim.registry import Registry, RegistryError

ADAPTERS: Registry = Registry("adapter", "fedsim.adapters", entry_points="fedsim.adapters")


def adapter_class(name: str) -> type[Adapter]:
    """The Adapter class of a registered name or import path; ValueError (one line) if it is none."""
    try:
        cls = ADAPTERS.get(name)
    except RegistryError as exc:
        raise ValueError(str(exc)) from None
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise ValueError(f"'{name}' is not a subclass of fedsim.adapters.base.Adapter")
    return cls


def build_adapter(name: str, model: nn.Module, **settings: Any) -> Adapter:
    """Build adapter ``name`` (registered name or ``package.module:Class``) around ``model``."""
    cls = ADAPTERS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise TypeError(f"'{name}' is not an Adapter class")
    known = adapter_settings(cls)
    unknown = [k for k in settings if k not in known]
    if unknown:
        raise TypeError(
            f"adapter '{name}' has no setting(s) {', '.join(map(repr, unknown))} (settings: {', '.join(known) or 'none'})"
        )
    return cls(model, **settings)


__all__ = ["ADAPTERS", "Adapter", "SplitAdapter", "adapter_class", "adapter_settings", "build_adapter"]
