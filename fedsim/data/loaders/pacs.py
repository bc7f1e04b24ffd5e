"""PACS: art_painting, cartoon, photo, sketch; 7 classes (Li et al., ICCV 2017).

Images: ``<images>/<domain>/<class>/*.jpg|png`` where ``<images>`` is the root, or its
``images/`` or ``kfold/`` subfolder. Official split files ``<domain>_train_kfold.txt``,
``<domain>_crossval_kfold.txt`` and ``<domain>_test_kfold.txt`` (lines
``art_painting/dog/pic_001.jpg 1``, 1-based labels) are looked for in the root and in
its ``splits/``, ``pacs_label/`` and ``image_list/`` subfolders.

``options.split``: ``official`` (train = train_kfold; test = crossval_kfold, or, without
it, the test_kfold entries that are not in train_kfold: the official test_kfold lists
the whole domain, for leave-one-domain-out evaluation), ``random`` (seeded stratified
split of the image folders, ``test_fraction`` / ``split_seed``), or ``auto`` (default:
official where a domain's files exist, else random).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedsim.data.base import DATASETS, DomainSplit, MultiDomainDataset
from fedsim.data.config import DataConfig
from fedsim.data.loaders._files import (
    DataSource,
    ImageFileArray,
    Options,
    maybe_preload,
    resolve_root,
    scan_class_folders,
    select_domains,
    stratified_split,
)
from fedsim.schema import ScenarioError

NAME = "pacs"
DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
SOURCE = DataSource(
    NAME,
    "<root>/{art_painting,cartoon,photo,sketch}/{dog,elephant,giraffe,guitar,horse,house,person}/*.jpg|png "
    "(optionally <domain>_{train,crossval,test}_kfold.txt)",
    "https://dali-dl.github.io/project_iccv2017.html",
)
SPLIT_DIRS = (".", "splits", "pacs_label", "image_list")
# Unreadable file in the official release (skipped, as Dassl does).
BAD_FILES = ("sketch/dog/n02103406_4068-1.png",)
OPTIONS = ("split", "test_fraction", "split_seed", "preload", "cache_size")


def image_root(root: Path) -> Path:
    for sub in ("images", "kfold"):
        if any((root / sub / d).is_dir() for d in DOMAINS):
            return root / sub
    return root


def find_split_file(root: Path, domain: str, kind: str) -> Path | None:
    for sub in SPLIT_DIRS:
        path = (root if sub == "." else root / sub) / f"{domain}_{kind}_kfold.txt"
        if path.is_file():
            return path
    return None


def read_split_file(path: Path, images: Path) -> tuple[list[Path], np.ndarray]:
    """Lines ``relative/path.jpg <1-based label>`` -> (absolute paths, 0-based labels)."""
    paths: list[Path] = []
    labels: list[int] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ScenarioError(f"data.root: {path}:{lineno}: expected 'relative/path.jpg label', got {line.strip()!r}")
        rel, label = parts[0].lstrip("/"), int(parts[1])
        if not 1 <= label <= len(CLASSES):
            raise ScenarioError(f"data.root: {path}:{lineno}: label {label} is not in 1..{len(CLASSES)}")
        if rel in BAD_FILES:
            continue
        paths.append(images / rel)
        labels.append(label - 1)
    return paths, np.asarray(labels, dtype=np.int64)


def official_split(
    root: Path, images: Path, domain: str
) -> tuple[list[Path], np.ndarray, list[Path], np.ndarray] | None:
    train_file = find_split_file(root, domain, "train")
    if train_file is None:
        return None
    train_paths, train_labels = read_split_file(train_file, images)
    crossval = find_split_file(root, domain, "crossval")
    if crossval is not None:
        test_paths, test_labels = read_split_file(crossval, images)
    else:
        test_file = find_split_file(root, domain, "test")
        if test_file is None:
            raise SOURCE.not_found(train_file.parent / f"{domain}_crossval_kfold.txt")
        all_paths, all_labels = read_split_file(test_file, images)
        in_train = set(train_paths)
        keep = [i for i, p in enumerate(all_paths) if p not in in_train]
        test_paths, test_labels = [all_paths[i] for i in keep], all_labels[keep]
    for path in train_paths[:1] + test_paths[:1]:
        if not path.is_file():
            raise SOURCE.not_found(path)
    return train_paths, train_labels, test_paths, test_labels


@DATASETS.register(NAME)
def load_pacs(cfg: DataConfig) -> MultiDomainDataset:
    opts = Options(NAME, cfg.options, OPTIONS)
    split = opts.choice("split", "auto", ("auto", "official", "random"))
    test_fraction = opts.fraction("test_fraction", 0.2)
    seed = opts.int("split_seed", 0, 0) or 0
    preload = opts.preload("auto")
    cache_size = opts.int("cache_size", 256, 0) or 0
    domains = select_domains(NAME, DOMAINS, cfg.domains)
    root = resolve_root(cfg, NAME, SOURCE)
    images = image_root(root)
    splits: dict[str, DomainSplit] = {}
    used: dict[str, str] = {}
    for domain in domains:
        official = None if split == "random" else official_split(root, images, domain)
        if official is None and split == "official":
            raise SOURCE.not_found(root / f"{domain}_train_kfold.txt")
        if official is not None:
            train_paths, y_train, test_paths, y_test = official
            x_train = ImageFileArray(train_paths, cfg.image_size, cache_size)
            x_test = ImageFileArray(test_paths, cfg.image_size, cache_size)
            used[domain] = "official"
        else:
            if not (images / domain).is_dir():
                raise SOURCE.not_found(images / domain)
            paths, labels = scan_class_folders(images / domain, CLASSES, SOURCE, skip=BAD_FILES)
            train_idx, test_idx = stratified_split(labels, test_fraction, seed, key=domain)
            everything = ImageFileArray(paths, cfg.image_size, cache_size)
            x_train, y_train = everything.subset(train_idx), labels[train_idx]
            x_test, y_test = everything.subset(test_idx), labels[test_idx]
            used[domain] = "random"
        splits[domain] = DomainSplit(
            x_train=maybe_preload(x_train, preload),
            y_train=y_train,
            x_test=maybe_preload(x_test, preload),
            y_test=y_test,
        )
    described = ", ".join(f"{d}: {s}" for d, s in used.items())
    return MultiDomainDataset(
        name=NAME,
        domains=splits,
        num_classes=len(CLASSES),
        image_size=cfg.image_size,
        class_names=list(CLASSES),
        notes=f"splits ({described}; random = split_seed {seed}, test_fraction {test_fraction}); root {root}",
    )
