"""Shared helpers for the on-disk dataset loaders.

- :class:`DatasetNotFound` and :class:`DataSource`: the one-line "not found" error
  (``data.root: <dataset> not found at <path>: expected <layout>; get it from <url>``).
- :func:`resolve_root`: ``data.root``, else ``$FEDSIM_DATA/<name>``.
- :class:`Options` and :func:`select_domains`: validation of ``data.options`` and
  ``data.domains`` with ``ScenarioError`` messages naming the key.
- :func:`to_rgb_uint8`: resize a batch of images to ``[N, S, S, 3]`` uint8.
- :func:`decode_image`, :func:`scan_class_folders`, :class:`ImageFileArray` (a lazy,
  picklable image reader with an LRU cache) and :func:`maybe_preload`.
- :func:`stratified_split`: seeded per-class train/test split.
- :func:`safe_unpickle`: a restricted unpickler that only builds numpy arrays.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fedsim.data.config import DataConfig
from fedsim.schema import ScenarioError

ENV_VAR = "FEDSIM_DATA"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"})
PRELOAD_AUTO_BYTES = 1 << 30  # ``preload: auto`` decodes up front when the result fits in 1 GiB


# --------------------------------------------------------------------------------------
# Errors and roots


class DatasetNotFound(ScenarioError):
    """The dataset root, or a file the loader needs inside it, does not exist."""

    def __init__(self, dataset: str, path: str | Path, expected: str, url: str) -> None:
        self.dataset = dataset
        self.path = str(path)
        self.expected = expected
        self.url = url
        super().__init__(f"data.root: {dataset} not found at {path}: expected {expected}; get it from {url}")


@dataclass(frozen=True)
class DataSource:
    """What a dataset (or one domain of it) looks like on disk, for error messages."""

    dataset: str
    layout: str
    url: str

    def not_found(self, path: str | Path) -> DatasetNotFound:
        return DatasetNotFound(self.dataset, path, self.layout, self.url)


def resolve_root(cfg: DataConfig, name: str, source: DataSource) -> Path:
    """``cfg.root`` if set, else ``$FEDSIM_DATA/<name>``; raise DatasetNotFound if missing."""
    if cfg.root:
        root = Path(cfg.root).expanduser()
    elif os.environ.get(ENV_VAR):
        root = Path(os.environ[ENV_VAR]).expanduser() / name
    else:
        raise source.not_found(f"<unset> (set data.root or ${ENV_VAR})")
    if not root.is_dir() and not cfg.download:
        raise source.not_found(root)
    return root


def download_error(what: str, url: str, exc: BaseException) -> ScenarioError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ScenarioError(f"data.download: could not download {what} from {url}: {reason}")


# --------------------------------------------------------------------------------------
# data.options and data.domains


class Options:
    """Typed access to ``data.options``; unknown keys and bad values raise ScenarioError."""

    def __init__(self, dataset: str, options: Mapping[str, Any], known: Iterable[str]) -> None:
        self.dataset = dataset
        self._values = dict(options)
        known_set = sorted(set(known))
        for key in self._values:
            if key not in known_set:
                listed = ", ".join(known_set) or "none"
                raise ScenarioError(f"data.options.{key}: unknown option for {dataset} (known: {listed})")

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def _error(self, key: str, what: str) -> ScenarioError:
        return ScenarioError(f"data.options.{key}: must be {what} (got {self._values[key]!r})")

    def bool(self, key: str, default: bool) -> bool:
        if key not in self._values:
            return default
        value = self._values[key]
        if not isinstance(value, bool):
            raise self._error(key, "true or false")
        return value

    def int(self, key: str, default: int | None, low: int | None = None, high: int | None = None) -> int | None:
        if key not in self._values:
            return default
        value = self._values[key]
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and ((low is not None and value < low) or (high is not None and value > high)):
            ok = False
        if not ok:
            lo = "" if low is None else f" >= {low}"
            hi = "" if high is None else f"{' and' if lo else ''} <= {high}"
            raise self._error(key, f"an integer{lo}{hi}")
        return int(value)

    def fraction(self, key: str, default: float) -> float:
        """A float strictly between 0 and 1."""
        if key not in self._values:
            return default
        value = self._values[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < float(value) < 1:
            raise self._error(key, "a number in (0, 1)")
        return float(value)

    def choice(self, key: str, default: str, choices: Sequence[str]) -> str:
        if key not in self._values:
            return default
        value = self._values[key]
        if not isinstance(value, str) or value not in choices:
            raise self._error(key, "one of " + ", ".join(choices))
        return value

    def str_list(self, key: str) -> list[str] | None:
        if key not in self._values:
            return None
        value = self._values[key]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise self._error(key, "a non-empty list of names")
        if len(set(value)) != len(value):
            raise self._error(key, "a list without repeated names")
        return list(value)

    def path(self, key: str) -> Path | None:
        if key not in self._values:
            return None
        value = self._values[key]
        if not isinstance(value, str) or not value:
            raise self._error(key, "a folder path")
        return Path(value).expanduser()

    def preload(self, default: str = "auto") -> str:
        """``preload``: true, false or "auto"; returned as "true" / "false" / "auto"."""
        if "preload" not in self._values:
            return default
        value = self._values["preload"]
        if isinstance(value, bool):
            return "true" if value else "false"
        if value == "auto":
            return "auto"
        raise self._error("preload", 'true, false or "auto"')


def select_domains(dataset: str, known: Sequence[str], requested: Sequence[str] | None) -> list[str]:
    """``requested`` (data.domains) checked against ``known``; None means all, in order."""
    if requested is None:
        return list(known)
    if not requested:
        raise ScenarioError(f"data.domains: empty list for {dataset} (known: {', '.join(known)})")
    seen: set[str] = set()
    for name in requested:
        if name not in known:
            raise ScenarioError(f"data.domains: unknown domain '{name}' for {dataset} (known: {', '.join(known)})")
        if name in seen:
            raise ScenarioError(f"data.domains: domain '{name}' is listed twice")
        seen.add(name)
    return list(requested)


# --------------------------------------------------------------------------------------
# Images


def to_rgb_uint8(images: np.ndarray, size: int, chunk: int = 2048) -> np.ndarray:
    """Images [N, H, W], [N, H, W, 1] or [N, H, W, 3] (uint8) -> uint8 [N, size, size, 3].

    Resizing is bilinear with antialiasing (torch); grayscale is repeated to 3 channels.
    An array already of the target shape is returned as is (no copy).
    """
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected images [N, H, W] or [N, H, W, 1|3], got shape {x.shape}")
    if x.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype}")
    if x.shape[1:3] != (size, size):
        import torch
        import torch.nn.functional as F

        out = np.empty((len(x), size, size, x.shape[-1]), dtype=np.uint8)
        for start in range(0, len(x), chunk):
            block = x[start : start + chunk]
            block = np.ascontiguousarray(block) if block.flags.writeable else np.array(block)  # torch needs writable
            part = torch.from_numpy(block).permute(0, 3, 1, 2).float()
            part = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out[start : start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        x = out
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """Decode one image file to uint8 [size, size, 3] (RGB; aspect ratio is not kept)."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale >= size
            rgb = img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot decode image {path}: {exc}") from exc
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted, hidden files skipped."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def scan_class_folders(
    domain_dir: Path, classes: Sequence[str], source: DataSource, skip: Iterable[str] = ()
) -> tuple[list[Path], np.ndarray]:
    """``domain_dir/<class>/**/image`` for each class in order -> (paths, labels)."""
    skipped = set(skip)
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = domain_dir / name
        if not folder.is_dir():
            raise source.not_found(folder)
        for path in list_images(folder):
            if path.relative_to(domain_dir.parent).as_posix() in skipped:
                continue
            paths.append(path)
            labels.append(label)
    if not paths:
        raise source.not_found(domain_dir / "<class>" / "*.jpg")
    return paths, np.asarray(labels, dtype=np.int64)


def _to_indices(index: Any, length: int) -> np.ndarray | int:
    """Normalize a numpy-style index to an int or an int64 array of non-negative indices."""
    if isinstance(index, int | np.integer) and not isinstance(index, bool):
        i = int(index)
        if not -length <= i < length:
            raise IndexError(f"index {i} is out of bounds for length {length}")
        return i % length
    if isinstance(index, slice):
        return np.arange(*index.indices(length), dtype=np.int64)
    arr = np.asarray(index)
    if arr.dtype == bool:
        if arr.shape != (length,):
            raise IndexError(f"boolean index of shape {arr.shape} does not match length {length}")
        return np.flatnonzero(arr).astype(np.int64)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise IndexError(f"only ints, slices and 1-D integer or boolean arrays are valid indices, got {index!r}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < -length or arr.max() >= length):
        raise IndexError(f"index out of bounds for length {length}")
    return np.where(arr < 0, arr + length, arr)


class ImageFileArray:
    """Lazy uint8 images [N, size, size, 3] read from files on access.

    Indexing follows numpy for the first axis: an int gives [size, size, 3]; a slice, an
    integer array or a boolean mask gives [k, size, size, 3]. Decoded images are kept in a
    small LRU cache (``cache_size`` images). Picklable (the cache is not sent along).
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, paths: Sequence[str | Path], size: int, cache_size: int = 256, workers: int = 4) -> None:
        self.paths: list[str] = [str(p) for p in paths]
        self.size = int(size)
        self.cache_size = int(cache_size)
        self.workers = max(1, int(workers))
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths, "size": self.size, "cache_size": self.cache_size, "workers": self.workers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.size, self.size, 3)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"ImageFileArray(n={len(self)}, size={self.size}, cache_size={self.cache_size})"

    def _load(self, i: int) -> np.ndarray:
        with self._lock:
            hit = self._cache.get(i)
            if hit is not None:
                self._cache.move_to_end(i)
                return hit
        img = decode_image(self.paths[i], self.size)
        img.setflags(write=False)
        if self.cache_size > 0:
            with self._lock:
                self._cache[i] = img
                self._cache.move_to_end(i)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return img

    def __getitem__(self, index: Any) -> np.ndarray:
        idx = _to_indices(index, len(self))
        if isinstance(idx, int):
            return self._load(idx).copy()
        out = np.empty((len(idx), self.size, self.size, 3), dtype=np.uint8)
        if len(idx) >= 8 and self.workers > 1:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                for k, img in enumerate(pool.map(self._load, idx.tolist())):
                    out[k] = img
        else:
            for k, i in enumerate(idx.tolist()):
                out[k] = self._load(i)
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        arr = self.materialize()
        return arr if dtype is None else arr.astype(dtype)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageFileArray:
        """A lazy view of some rows (no decoding)."""
        return ImageFileArray([self.paths[int(i)] for i in indices], self.size, self.cache_size, self.workers)

    def materialize(self, chunk: int = 512) -> np.ndarray:
        """Decode everything into one numpy array (bypasses the cache)."""
        out = np.empty(self.shape, dtype=np.uint8)
        decode: Callable[[str], np.ndarray] = lambda p: decode_image(p, self.size)  # noqa: E731
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for start in range(0, len(self), chunk):
                for k, img in enumerate(pool.map(decode, self.paths[start : start + chunk])):
                    out[start + k] = img
        return out


def maybe_preload(
    images: ImageFileArray, mode: str, budget_bytes: int = PRELOAD_AUTO_BYTES
) -> ImageFileArray | np.ndarray:
    """``mode`` "true": decode now; "false": stay lazy; "auto": decode if it fits the budget."""
    nbytes = len(images) * images.size * images.size * 3
    if mode == "true" or (mode == "auto" and nbytes <= budget_bytes):
        return images.materialize()
    return images


# --------------------------------------------------------------------------------------
# Splits


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int, key: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split -> (train indices, test indices), each sorted.

    Each class with >= 2 samples puts round(n * test_fraction) (at least 1, at most n - 1)
    samples in the test part. ``key`` (e.g. the domain name) is mixed into the seed so
    that a domain's split does not depend on which other domains are loaded.
    """
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    labels = np.asarray(labels)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = min(max(round(len(idx) * test_fraction), 1), len(idx) - 1) if len(idx) >= 2 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    empty = np.empty(0, dtype=np.int64)
    return (
        np.sort(np.concatenate(train)).astype(np.int64) if train else empty,
        np.sort(np.concatenate(test)).astype(np.int64) if test else empty,
    )


# --------------------------------------------------------------------------------------
# Restricted unpickling (CIFAR python batches)


def _numpy_global(module: str, name: str) -> Any:
    """numpy.core.* (pickles from numpy 1.x / Python 2) and numpy._core.* (numpy 2)."""
    suffix = module.split(".", 2)[-1] if module.startswith(("numpy.core.", "numpy._core.")) else None
    candidates = [f"numpy._core.{suffix}", f"numpy.core.{suffix}"] if suffix else [module]
    for mod_name in candidates:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        if hasattr(mod, name):
            return getattr(mod, name)
    raise pickle.UnpicklingError(f"global '{module}.{name}' is not available")


SAFE_PICKLE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves numpy's array-reconstruction globals.

    Plain containers (dict, list, str, bytes, numbers) need no globals; anything else
    (``os.system``, ``builtins.eval``, arbitrary classes) raises ``UnpicklingError``.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in SAFE_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is forbidden")
        if module == "_codecs":
            import codecs

            return codecs.encode
        return _numpy_global(module, name)


def safe_unpickle(data: bytes | Path, encoding: str = "latin1") -> Any:
    """Load a pickle of containers and numpy arrays; refuse any other global."""
    raw = data.read_bytes() if isinstance(data, Path) else data
    return RestrictedUnpickler(io.BytesIO(raw), encoding=encoding).load()
