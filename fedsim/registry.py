"""Name -> object registries with plug-in resolution by import path.

A registry maps short names to classes or factories. Short names come from fedsim's own
modules and from Python entry points that installed packages declare (group
``fedsim.strategies``, ``fedsim.adapters``, ``fedsim.datasets`` or ``fedsim.models``; an
entry point's module is imported only when its name is looked up). Anything else can be
named by an import path ``package.module:Attribute``; fedsim imports only paths a user
wrote in a scenario (never anything read from a checkpoint).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import pkgutil
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class RegistryError(LookupError):
    """A name or import path that does not resolve."""


MOVED_PACKAGES = {"strategies": "fedsim.strategies", "adapters": "fedsim.adapters"}
"""Top-level import names of earlier fedsim versions and where those packages are now."""


def _current_module(module_name: str) -> str:
    """``strategies.x`` -> ``fedsim.strategies.x`` where fedsim has that module (scenarios
    written for earlier versions keep working); any other name is left as it is."""
    top, _, rest = module_name.partition(".")
    if top not in MOVED_PACKAGES:
        return module_name
    moved = MOVED_PACKAGES[top] + (f".{rest}" if rest else "")
    try:
        found = importlib.util.find_spec(moved) is not None
    except ImportError:
        found = False
    return moved if found else module_name


def import_object(path: str) -> object:
    """Import ``package.module:Attribute`` (or ``package.module.Attribute``). Paths into
    fedsim's former top-level packages (``strategies.fedwon:FedWon``) resolve to
    ``fedsim.strategies`` / ``fedsim.adapters``."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise RegistryError(f"'{path}' is not an import path of the form package.module:Name")
    module_name = _current_module(module_name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RegistryError(f"cannot import module '{module_name}' ({exc})") from None
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RegistryError(f"module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """Registry of one kind of plug-in (strategies, adapters, datasets, models).

    ``package`` names a package whose modules are imported on first lookup so that
    their ``@registry.register(...)`` decorators run (one module per method).
    ``entry_points`` names the entry-point group through which installed packages add
    short names (``[project.entry-points."fedsim.strategies"] mine = "mypkg.mod:Mine"``):
    listed on first lookup, imported when their name is looked up.
    """

    def __init__(self, kind: str, package: str | None = None, entry_points: str | None = None) -> None:
        self.kind = kind
        self._package = package
        self._group = entry_points
        self._items: dict[str, T] = {}
        self._entry_points: dict[str, importlib.metadata.EntryPoint] | None = None
        self._loaded = package is None

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise RegistryError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self._package)  # type: ignore[arg-type]
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self._package}.{info.name}")

    def _declared(self, refresh: bool = False) -> dict[str, importlib.metadata.EntryPoint]:
        """Entry points of this registry's group (read once; ``refresh`` reads them again,
        for a package installed after the first lookup). fedsim's own names come first."""
        if self._group is None:
            return {}
        if self._entry_points is None or refresh:
            found: dict[str, importlib.metadata.EntryPoint] = {}
            for ep in importlib.metadata.entry_points(group=self._group):
                found.setdefault(ep.name, ep)  # the first on sys.path wins, as for imports
            self._entry_points = found
        return self._entry_points

    def _from_entry_point(self, name: str) -> T | None:
        """Import the entry point named ``name`` and register what it names under that name."""
        ep = self._declared().get(name) or self._declared(refresh=True).get(name)
        if ep is None:
            return None
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plug-in is the user's bad input, named in one line
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RegistryError(
                f"{self.kind} '{name}': entry point '{ep.value}' (group {self._group}) failed to load ({detail})"
            ) from None
        if name in self._items and self._items[name] is not obj:  # its module registered another object under this name
            raise RegistryError(
                f"{self.kind} '{name}' is registered twice (entry point '{ep.value}' names another object)"
            )
        self._items[name] = obj
        return obj

    def names(self) -> list[str]:
        self._load()
        return sorted(set(self._items) | set(self._declared()))

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items or name in self._declared()

    def get(self, name: str) -> T:
        """Return the registered object (fedsim's own, then an installed package's entry
        point), or import ``name`` if it is an import path."""
        self._load()
        if name in self._items:
            return self._items[name]
        if ":" not in name and (obj := self._from_entry_point(name)) is not None:
            return obj
        if ":" in name or "." in name:
            return import_object(name)  # type: ignore[return-value]
        known = ", ".join(self.names()) or "none"
        raise RegistryError(f"unknown {self.kind} '{name}' (known: {known}; or give package.module:Name)")


def constructor_params(cls: type) -> tuple[set[str], bool]:
    """Keyword names a class's constructor accepts, following ``**kwargs`` up the MRO;
    and whether it accepts any keyword (a ``**kwargs`` all the way up)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        params = inspect.signature(klass.__init__).parameters
        names.update(
            n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"
        )
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return names, False
    return names, True
