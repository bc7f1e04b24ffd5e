"""CIFAR-10 from torchvision's on-disk format (the "python version" of the dataset).

Layout: ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``. The
batches are pickles of dicts of numpy arrays; they are read with a restricted unpickler
that only rebuilds numpy arrays (never ``pickle.load`` on the file). ``data.download:
true`` fetches and extracts the official archive with torchvision's downloader.
One domain, ``cifar10``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.data.base import DATASETS, DomainSplit, MultiDomainDataset
from fedsim.data.config import DataConfig
from fedsim.data.loaders._files import (
    DataSource,
    Options,
    download_error,
    resolve_root,
    safe_unpickle,
    select_domains,
    to_rgb_uint8,
)
from fedsim.schema import ScenarioError

NAME = "cifar10"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
SOURCE = DataSource(
    NAME,
    f"<root>/{FOLDER}/{{data_batch_1..5,test_batch}} (CIFAR-10 python version)",
    f"{URL} (or data.download: true)",
)


def _get(d: dict[Any, Any], key: str) -> Any:
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    raise KeyError(key)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (uint8 [N, 32, 32, 3], int64 [N])."""
    try:
        batch = safe_unpickle(path)
        data = np.asarray(_get(batch, "data"), dtype=np.uint8)
        labels = np.asarray(_get(batch, "labels"), dtype=np.int64)
    except pickle.UnpicklingError as exc:
        raise ScenarioError(f"data.root: {path}: refused to unpickle ({exc}); not a CIFAR-10 batch") from None
    except (KeyError, TypeError, ValueError, EOFError) as exc:
        raise ScenarioError(f"data.root: {path}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ScenarioError(
            f"data.root: {path}: expected data [N, 3072] and N labels, got {data.shape} and {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def class_names(folder: Path) -> list[str]:
    meta = folder / "batches.meta"
    if meta.is_file():
        try:
            names = _get(safe_unpickle(meta), "label_names")
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError):
            pass
    return list(CLASS_NAMES)


def download_cifar10(root: Path) -> None:
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except Exception as exc:  # network and checksum errors
        raise download_error("CIFAR-10", CIFAR10.url, exc) from None


def load_cifar10_arrays(
    root: Path, download: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(x_train, y_train, x_test, y_test, class names) at 32x32 from ``root``."""
    folder = root / FOLDER
    names = (*TRAIN_BATCHES, TEST_BATCH)
    if not all((folder / n).is_file() for n in names):
        if download:
            download_cifar10(root)
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise SOURCE.not_found(folder / missing[0] if folder.is_dir() else folder)
    train = [read_batch(folder / n) for n in TRAIN_BATCHES]
    x_test, y_test = read_batch(folder / TEST_BATCH)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return x_train, y_train, x_test, y_test, class_names(folder)


@DATASETS.register(NAME)
def load_cifar10(cfg: DataConfig) -> MultiDomainDataset:
    Options(NAME, cfg.options, ())
    domains = select_domains(NAME, (NAME,), cfg.domains)
    root = resolve_root(cfg, NAME, SOURCE)
    x_train, y_train, x_test, y_test, names = load_cifar10_arrays(root, cfg.download)
    split = DomainSplit(
        x_train=to_rgb_uint8(x_train, cfg.image_size),
        y_train=y_train,
        x_test=to_rgb_uint8(x_test, cfg.image_size),
        y_test=y_test,
    )
    return MultiDomainDataset(
        name=NAME,
        domains={d: split for d in domains},
        num_classes=10,
        image_size=cfg.image_size,
        class_names=names,
        notes=f"official train/test batches; root {root}",
    )
