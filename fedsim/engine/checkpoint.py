"""Per-round checkpoints: global arrays, strategy state, the driver's counters.

Layout: ``checkpoints/round_0007/{global,strategy}.safetensors + meta.json + manifest.json``.
A checkpoint is written into a hidden temp folder and renamed into place; ``manifest.json``
is written last and lists every other file with its size and sha256 and every array with
its dtype and shape, so a folder whose manifest is missing or disagrees with its files (a
kill mid-write, a truncated copy, a hand edit) is never loaded: :func:`intact_checkpoints`
reports it and falls back to the next older one. ``meta.json`` also holds the scenario
fingerprint (:func:`scenario_fingerprint`) that a resume compares with ``scenario.yaml``.

Checkpoint contents are data: nothing here unpickles (arrays are safetensors, everything
else is JSON) and nothing read from a checkpoint is imported or names code to run; the
generic strategy-state loader restores only the strategy's own instance attributes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedsim.arrays import NamedArrays, atomic_write_bytes, load_arrays, numpy_to_record, record_to_numpy, save_arrays
from fedsim.config import Scenario

KEEP = 2  # checkpoints kept on disk: the newest, and one to fall back to if it is damaged
MANIFEST = "manifest.json"
FILES = ("global.safetensors", "strategy.safetensors", "meta.json")
# Sections that define the experiment: a resume refuses a scenario.yaml that changed any of
# them. rounds (continue longer), name, runtime, device, adaptation and edge may change.
FINGERPRINT_KEYS = ("seed", "data", "model", "client", "strategy", "evaluation", "faults")


class CheckpointDamaged(ValueError):
    """A checkpoint folder that cannot be trusted; the message is one line naming the file."""


@dataclass
class Checkpoint:
    round: int
    arrays: NamedArrays
    strategy_arrays: NamedArrays
    meta: dict[str, Any]


# -- strategy state -------------------------------------------------------------------
# fedsim strategies implement state_dict() / load_state_dict(); for any other Flower
# strategy (e.g. FedAdam's moments) the numpy-valued and scalar attributes are saved.

_SCALARS = (int, float, str, bool, type(None))
_KINDS = ("ndarray", "arrayrecord", "dict")
# Attributes the engine reads from a strategy (the client hooks are an import path): they
# come from the strategy's code and the scenario, never from a checkpoint.
_ENGINE_ATTRS = frozenset({"client_hooks", "client_config", "validate_shapes"})


def strategy_state(strategy: object) -> tuple[NamedArrays, dict[str, Any]]:
    if hasattr(strategy, "state_dict"):
        arrays, scalars = strategy.state_dict()  # type: ignore[attr-defined]
        return dict(arrays), dict(scalars)
    arrays: NamedArrays = {}
    scalars: dict[str, Any] = {}
    for name, value in vars(strategy).items():
        if isinstance(value, np.ndarray):
            arrays[f"{name}"] = value
            scalars[f"__kind__.{name}"] = "ndarray"
        elif isinstance(value, ArrayRecord):
            for k, v in record_to_numpy(value).items():
                arrays[f"{name}/{k}"] = v
            scalars[f"__kind__.{name}"] = "arrayrecord"
        elif isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
            for k, v in value.items():
                arrays[f"{name}/{k}"] = v
            scalars[f"__kind__.{name}"] = "dict"
        elif isinstance(value, _SCALARS):
            scalars[name] = value
    return arrays, scalars


def _check_restorable(strategy: object, name: str) -> None:
    """Only instance state may come from a checkpoint: ``vars(strategy)`` is what was
    saved, so a name that is a class attribute (a method, ``client_hooks``) or one the
    engine interprets was not written by fedsim and is refused."""
    if not name.isidentifier() or name.startswith("__") or name in _ENGINE_ATTRS or hasattr(type(strategy), name):
        raise ValueError(
            f"strategy state '{name}' is not instance state of {type(strategy).__name__} (refused: checkpoint contents are data)"
        )


def load_strategy_state(strategy: object, arrays: NamedArrays, scalars: dict[str, Any]) -> None:
    """Restore what :func:`strategy_state` saved; ValueError/TypeError on anything else."""
    if not isinstance(scalars, dict):
        raise ValueError("strategy state is not a JSON object")
    if hasattr(strategy, "load_state_dict"):
        strategy.load_state_dict(arrays, scalars)  # type: ignore[attr-defined]
        return
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        name, _, sub = key.partition("/")
        _check_restorable(strategy, name)
        grouped.setdefault(name, {})[sub] = value
    for key, value in scalars.items():
        if key.startswith("__kind__."):
            name = key[len("__kind__.") :]
            _check_restorable(strategy, name)
            parts = grouped.get(name, {})
            if value == "ndarray":
                if name not in arrays:
                    raise ValueError(f"strategy state '{name}' has no array")
                setattr(strategy, name, arrays[name])
            elif value == "arrayrecord":
                setattr(strategy, name, numpy_to_record(parts))
            elif value == "dict":
                setattr(strategy, name, dict(parts))
            else:
                raise ValueError(f"strategy state '{name}' has unknown kind {value!r} (known: {', '.join(_KINDS)})")
        elif hasattr(strategy, key) and isinstance(getattr(strategy, key), _SCALARS):
            _check_restorable(strategy, key)
            if not isinstance(value, _SCALARS):
                raise ValueError(f"strategy state '{key}' is a {type(value).__name__}, expected a scalar")
            setattr(strategy, key, value)


# -- scenario fingerprint ---------------------------------------------------------------


def scenario_fingerprint(scenario: Scenario) -> dict[str, Any]:
    """The experiment-defining sections of a validated scenario, as JSON values."""
    dumped = scenario.model_dump(mode="json")
    return {key: dumped[key] for key in FINGERPRINT_KEYS}


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: saved -> current`` for every leaf that differs (dotted keys, sorted)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "(absent)"), current.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(fingerprint_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def _shape(a: np.ndarray) -> tuple[int, ...]:
    return tuple(np.shape(a)) or (1,)  # a 0-d tensor travels as shape [1] in Flower's records


def array_differences(saved: NamedArrays, model: NamedArrays) -> list[str]:
    """Names and shapes of checkpoint arrays that do not fit the scenario's model."""
    out = [f"{k}: missing from the checkpoint" for k in model if k not in saved]
    out += [f"{k}: not in the scenario's model" for k in saved if k not in model]
    out += [
        f"{k}: shape {_shape(saved[k])} -> {_shape(model[k])}"
        for k in model
        if k in saved and _shape(saved[k]) != _shape(model[k])
    ]
    return out


# -- files --------------------------------------------------------------------------------


def _round_dir(root: Path, rnd: int) -> Path:
    return root / f"round_{rnd:05d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _array_index(arrays: NamedArrays) -> dict[str, dict[str, Any]]:
    return {k: {"dtype": str(np.asarray(v).dtype), "shape": list(np.shape(v))} for k, v in sorted(arrays.items())}


def save_checkpoint(root: Path, ckpt: Checkpoint) -> None:
    root.mkdir(parents=True, exist_ok=True)
    final = _round_dir(root, ckpt.round)
    tmp = root / f".tmp_round_{ckpt.round:05d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_arrays(tmp / "global.safetensors", ckpt.arrays)
    save_arrays(tmp / "strategy.safetensors", ckpt.strategy_arrays)
    atomic_write_bytes(tmp / "meta.json", json.dumps({"round": ckpt.round, **ckpt.meta}).encode())
    files: dict[str, dict[str, Any]] = {
        name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in FILES
    }
    files["global.safetensors"]["arrays"] = _array_index(ckpt.arrays)
    files["strategy.safetensors"]["arrays"] = _array_index(ckpt.strategy_arrays)
    # last: its presence says every file above is complete
    atomic_write_bytes(tmp / MANIFEST, json.dumps({"format": 1, "round": ckpt.round, "files": files}).encode())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for old in complete_rounds(root)[:-KEEP]:
        shutil.rmtree(_round_dir(root, old), ignore_errors=True)


def checkpoint_rounds(root: Path) -> list[int]:
    """Rounds with a ``round_NNNNN`` folder, intact or not (sorted)."""
    if not root.exists():
        return []
    rounds = []
    for path in root.iterdir():
        name, _, num = path.name.partition("_")
        if name == "round" and num.isdigit() and path.is_dir():
            rounds.append(int(num))
    return sorted(rounds)


def complete_rounds(root: Path) -> list[int]:
    """Rounds whose checkpoint has a manifest (written last); not yet verified."""
    return [r for r in checkpoint_rounds(root) if (_round_dir(root, r) / MANIFEST).is_file()]


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointDamaged(f"{path}: unreadable {what} ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise CheckpointDamaged(f"{path}: {what} is not a JSON object")
    return value


def read_checkpoint(folder: Path) -> Checkpoint:
    """Load one checkpoint folder, verifying it against its manifest (CheckpointDamaged if not)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointDamaged(
            f"{manifest_path}: missing (checkpoint incomplete, or written before fedsim kept manifests)"
        )
    manifest = _read_json(manifest_path, "manifest")
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(FILES):
        raise CheckpointDamaged(f"{manifest_path}: does not list exactly {', '.join(FILES)}")
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointDamaged(f"{path}: missing")
        if (
            not isinstance(entry, dict)
            or path.stat().st_size != entry.get("bytes")
            or _sha256(path) != entry.get("sha256")
        ):
            raise CheckpointDamaged(f"{path}: size or sha256 differs from {MANIFEST} (file damaged)")
    loaded = {}
    for name in ("global.safetensors", "strategy.safetensors"):
        try:
            arrays = load_arrays(folder / name)
        except OSError as exc:
            raise CheckpointDamaged(str(exc)) from None
        if _array_index(arrays) != files[name].get("arrays"):
            raise CheckpointDamaged(f"{folder / name}: array names, dtypes or shapes differ from {MANIFEST}")
        loaded[name] = arrays
    meta = _read_json(folder / "meta.json", "meta")
    rnd = meta.get("round")
    if not isinstance(rnd, int) or folder.name != f"round_{rnd:05d}" or manifest.get("round") != rnd:
        raise CheckpointDamaged(f"{folder / 'meta.json'}: round {rnd!r} does not match the folder {folder.name}")
    for key, kind in (("totals", dict), ("strategy", dict)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointDamaged(f"{folder / 'meta.json'}: key '{key}' missing or not a JSON object")
    return Checkpoint(rnd, loaded["global.safetensors"], loaded["strategy.safetensors"], meta)


def intact_checkpoints(root: Path) -> Iterator[Checkpoint | CheckpointDamaged]:
    """Every checkpoint folder, newest first: the loaded checkpoint, or why it is damaged."""
    for rnd in reversed(checkpoint_rounds(root)):
        try:
            yield read_checkpoint(_round_dir(root, rnd))
        except CheckpointDamaged as exc:
            yield exc


def load_latest(root: Path) -> Checkpoint | None:
    """The newest intact checkpoint; damaged or incomplete ones are skipped."""
    for item in intact_checkpoints(root):
        if isinstance(item, Checkpoint):
            return item
    return None


def global_arrays_to_record(arrays: NamedArrays) -> ArrayRecord:
    return numpy_to_record(arrays)
