"""What ``pip install`` installs: one top-level package, ``fedsim``, with every package folder
of the repository under it (strategies/ and adapters/ as fedsim.strategies / fedsim.adapters)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package_folder_under_fedsim() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, folders = set(config["packages"]), config["package-dir"]
    assert all(name == "fedsim" or name.startswith("fedsim.") for name in listed)
    found = set()
    for package, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *parts)))
    assert found == listed


def test_the_method_packages_import_under_fedsim() -> None:
    import fedsim.adapters
    import fedsim.strategies

    assert Path(fedsim.strategies.__file__).resolve().parent == ROOT / "strategies"
    assert Path(fedsim.adapters.__file__).resolve().parent == ROOT / "adapters"
    assert "fedavg" in fedsim.strategies.STRATEGIES.names() and "cema" in fedsim.adapters.ADAPTERS.names()


def test_former_import_paths_resolve_to_the_fedsim_modules() -> None:
    from fedsim.registry import import_object
    from fedsim.strategies.compressed.ef21 import EF21
    from fedsim.strategies.fedwon import FedWon

    assert import_object("strategies.fedwon:FedWon") is FedWon
    assert import_object("strategies.ef21:EF21") is EF21
    assert import_object("fedsim.adapters.tent:Tent") is import_object("adapters.tent:Tent")
