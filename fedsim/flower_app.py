"""Flower app folders: the ``pyproject.toml`` that ``flwr run`` reads, naming fedsim's
installed ServerApp and ClientApp (``<apps_module>:server_app`` / ``:client_app``) and the
run-config keys they read, so the folder holds no code of its own."""

from __future__ import annotations

import json
from pathlib import Path

from fedsim import __version__

ConfigValue = str | bool | int


def _toml(value: ConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, int) else json.dumps(value)


def app_pyproject(
    name: str, description: str, apps_module: str, config: dict[str, ConfigValue], dependencies: list[str]
) -> str:
    """The app's ``pyproject.toml`` text; ``config`` gives each run-config key its default."""
    deps = ", ".join(json.dumps(d) for d in dependencies)
    keys = "".join(f"{k} = {_toml(v)}\n" for k, v in config.items())
    return f"""[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "{__version__}"
description = {json.dumps(description)}
license = "Apache-2.0"
dependencies = [{deps}]

[tool.flwr.app]
publisher = "fedsim"

[tool.flwr.app.components]
serverapp = "{apps_module}:server_app"
clientapp = "{apps_module}:client_app"

[tool.flwr.app.config]
{keys}"""


def write_app_folder(folder: Path, pyproject: str) -> Path:
    """``folder`` (created if needed) holding only ``pyproject.toml``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(pyproject)
    return folder
