"""CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019): corrupted CIFAR-10 test sets.

Layout: ``<root>/CIFAR-10-C/<corruption>.npy`` (uint8 [50000, 32, 32, 3]: severities 1..5,
10,000 images each, in order) and ``<root>/CIFAR-10-C/labels.npy``. Files are opened with
``mmap_mode="r"``, so only the requested severity is read.

- :func:`load_cifar10c` gives one (corruption, severity) stream, e.g. for test-time
  adaptation.
- The ``cifar10c`` dataset has one domain per corruption (``data.domains`` or
  ``options.corruptions``; default the 15 standard ones) at ``options.severity``
  (default 5). Each domain's train part is the clean CIFAR-10 training set (from
  ``<root>/cifar-10-batches-py`` or ``options.cifar10_root``; shared, not copied) and
  its test part is the corrupted test set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedsim.data.base import DATASETS, CorruptedSource, DomainSplit, ImageArray, MultiDomainDataset
from fedsim.data.config import DataConfig
from fedsim.data.loaders._files import DataSource, Options, resolve_root, select_domains, to_rgb_uint8
from fedsim.data.loaders.cifar10 import load_cifar10_arrays
from fedsim.schema import ScenarioError
from fedsim.tta.config import CORRUPTIONS  # the 15 standard corruptions: one .npy file each

NAME = "cifar10c"
FOLDER = "CIFAR-10-C"
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS = CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES = 5
SOURCE = DataSource(
    NAME,
    f"<root>/{FOLDER}/<corruption>.npy (uint8 [50000, 32, 32, 3]) and <root>/{FOLDER}/labels.npy",
    "https://zenodo.org/records/2535967",
)


def cifar10c_folder(root: str | Path) -> Path:
    """``root/CIFAR-10-C``, or ``root`` itself when it already holds ``labels.npy``."""
    root = Path(root).expanduser()
    if (root / FOLDER).is_dir():
        return root / FOLDER
    if (root / "labels.npy").is_file():
        return root
    raise SOURCE.not_found(root / FOLDER)


def load_cifar10c(root: str | Path, corruption: str, severity: int) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10-C stream: (images uint8 [10000, 32, 32, 3], labels int64 [10000]).

    ``root`` is the folder holding ``CIFAR-10-C/`` (or that folder itself). The images are a
    read-only memory map of the requested severity (nothing else is read from disk).
    """
    if corruption not in ALL_CORRUPTIONS:
        raise ScenarioError(
            f"data.domains: unknown corruption '{corruption}' for {NAME} (known: {', '.join(ALL_CORRUPTIONS)})"
        )
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer) or not 1 <= severity <= SEVERITIES:
        raise ScenarioError(f"data.options.severity: must be an integer in 1..{SEVERITIES} (got {severity!r})")
    folder = cifar10c_folder(root)
    path = folder / f"{corruption}.npy"
    label_path = folder / "labels.npy"
    for p in (path, label_path):
        if not p.is_file():
            raise SOURCE.not_found(p)
    images = np.load(path, mmap_mode="r")
    labels = np.load(label_path, mmap_mode="r")
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8 or len(images) % SEVERITIES:
        raise ScenarioError(f"data.root: {path}: expected uint8 [5 * N, 32, 32, 3], got {images.dtype} {images.shape}")
    if len(labels) != len(images):
        raise ScenarioError(f"data.root: {label_path}: {len(labels)} labels for {len(images)} images in {path.name}")
    n = len(images) // SEVERITIES
    start = (int(severity) - 1) * n
    return images[start : start + n], np.asarray(labels[start : start + n], dtype=np.int64)


@DATASETS.register(NAME)
def load_cifar10c_dataset(cfg: DataConfig) -> MultiDomainDataset:
    opts = Options(NAME, cfg.options, ("severity", "corruptions", "cifar10_root"))
    severity = opts.int("severity", SEVERITIES, 1, SEVERITIES) or SEVERITIES
    corruptions = opts.str_list("corruptions")
    if corruptions is not None:
        for name in corruptions:
            if name not in ALL_CORRUPTIONS:
                raise ScenarioError(
                    f"data.options.corruptions: unknown corruption '{name}' (known: {', '.join(ALL_CORRUPTIONS)})"
                )
        if cfg.domains is not None and list(cfg.domains) != corruptions:
            raise ScenarioError("data.domains: give either data.domains or data.options.corruptions, not both")
    domains = select_domains(
        NAME, ALL_CORRUPTIONS, cfg.domains if cfg.domains is not None else corruptions or list(CORRUPTIONS)
    )
    root = resolve_root(cfg, NAME, SOURCE)
    folder = cifar10c_folder(root)
    for corruption in domains:  # fail fast, before reading clean CIFAR-10
        if not (folder / f"{corruption}.npy").is_file():
            raise SOURCE.not_found(folder / f"{corruption}.npy")
    clean_root = opts.path("cifar10_root") or root
    x_train, y_train, _, _, names = load_cifar10_arrays(clean_root, download=cfg.download)
    x_train = to_rgb_uint8(x_train, cfg.image_size)

    splits: dict[str, DomainSplit] = {}
    for corruption in domains:
        images, labels = load_cifar10c(folder, corruption, severity)
        x_test: ImageArray = images if cfg.image_size == 32 else to_rgb_uint8(images, cfg.image_size)
        splits[corruption] = DomainSplit(x_train=x_train, y_train=y_train, x_test=x_test, y_test=labels)
    return MultiDomainDataset(
        name=NAME,
        domains=splits,
        num_classes=10,
        image_size=cfg.image_size,
        class_names=names,
        notes=f"train: clean CIFAR-10 (shared); test: CIFAR-10-C severity {severity}; root {root}",
        corrupted_source=_corrupted_source(folder, cfg.image_size),
    )


def _corrupted_source(folder: Path, size: int) -> CorruptedSource:
    """Test streams read corruption shifts from the CIFAR-10-C files, resized like the domains."""

    def read(corruption: str, severity: int) -> tuple[ImageArray, np.ndarray]:
        images, labels = load_cifar10c(folder, corruption, severity)
        return (images if size == 32 else to_rgb_uint8(np.asarray(images), size)), labels

    return read
