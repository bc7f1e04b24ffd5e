"""A scenario file read and overridden, before any validation: bounded reading of the YAML
file (:mod:`fedsim.safe_yaml`) and ``key.sub=value`` overrides.

Light on purpose (no torch, Flower or Ray): ``fedsim run`` reads the runtime section with it
before the heavy imports (:mod:`fedsim.cli.prestart`); :mod:`fedsim.scenario` validates.
"""

from __future__ import annotations

import copy
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from fedsim import safe_yaml
from fedsim.schema import ScenarioError, short_repr, short_source

MAX_OVERRIDE = 10_000


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value). Values are parsed as YAML scalars
    under the same bounds as a scenario file (:mod:`fedsim.safe_yaml`)."""
    shown = short_repr(text)[1:-1]
    if len(text) > MAX_OVERRIDE:
        raise ScenarioError(f"override '{shown}': longer than {MAX_OVERRIDE} characters")
    if "=" not in text:
        raise ScenarioError(f"override '{shown}': expected key.sub=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ScenarioError(f"override '{shown}': empty key")
    try:
        value = safe_yaml.load(raw) if raw.strip() else ""
    except safe_yaml.YAMLInputError as exc:
        raise ScenarioError(f"override '{shown}': {exc}") from None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """``raw`` with each override set: ``key.sub=value`` texts (values parsed as YAML
    scalars) or, from Python, a mapping ``{"key.sub": value}`` (values taken as they are)."""
    out = copy.deepcopy(raw)
    if isinstance(overrides, dict):
        items = []
        for key, value in overrides.items():
            text = f"{key}={short_repr(value)}"
            if not isinstance(key, str) or not key.strip() or any(not part for part in key.strip().split(".")):
                raise ScenarioError(f"override {short_repr(key)}: expected a key like section.sub")
            items.append((key.strip().split("."), copy.deepcopy(value), text))
    else:
        items = [(*parse_override(text), text) for text in overrides]
    for path, value, text in items:
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if isinstance(child, str) and part == "runtime":
                child = {"name": child}
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise ScenarioError(f"override '{short_repr(text)[1:-1]}': '{part}' is not a section")
            node[part] = child
            node = child
        node[path[-1]] = value
    return out


def read_text_file(path: Path) -> str:
    """The text of a regular file of at most safe_yaml.MAX_BYTES; ScenarioError (one
    line naming the file) for anything else. A FIFO, device or folder is refused before it
    is read (reading a FIFO would block forever)."""
    source = short_source(str(path))
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ScenarioError(f"{source}: file not found") from None
    except ValueError:  # embedded NUL byte
        raise ScenarioError(f"{source}: a file name must not contain a NUL byte") from None
    except OSError as exc:
        raise ScenarioError(f"{source}: cannot read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ScenarioError(f"{source}: is a folder, expected a scenario YAML file")
    if not stat.S_ISREG(info.st_mode):
        raise ScenarioError(f"{source}: not a regular file (a FIFO, socket or device); expected a scenario YAML file")
    if info.st_size > safe_yaml.MAX_BYTES:
        raise ScenarioError(
            f"{source}: larger than {safe_yaml.MAX_BYTES // 1_000_000} MB; a scenario is a small text file"
        )
    try:
        # O_NONBLOCK: should the path have become a FIFO since the stat, open does not block
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ScenarioError(f"{source}: cannot read: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ScenarioError(f"{source}: not a regular file; expected a scenario YAML file")
        try:
            data = fh.read(safe_yaml.MAX_BYTES + 1)
        except OSError as exc:
            raise ScenarioError(f"{source}: cannot read: {exc.strerror or exc}") from None
    if len(data) > safe_yaml.MAX_BYTES:
        raise ScenarioError(
            f"{source}: larger than {safe_yaml.MAX_BYTES // 1_000_000} MB; a scenario is a small text file"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ScenarioError(f"{source}: not a UTF-8 text file") from None


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    source = short_source(str(path))
    text = read_text_file(path)
    try:
        raw = safe_yaml.load(text)
    except safe_yaml.YAMLInputError as exc:
        raise ScenarioError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ScenarioError(f"{source}: {where}YAML syntax error: {problem}") from None
    if raw is None:
        raise ScenarioError(f"{source}: the file is empty (or only comments); a scenario needs at least one section")
    if not isinstance(raw, dict):
        raise ScenarioError(f"{source}: (top level): expected a mapping of sections, got {type(raw).__name__}")
    return raw
