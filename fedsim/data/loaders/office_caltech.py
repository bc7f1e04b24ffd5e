"""Office-Caltech10: amazon, caltech, dslr, webcam; the 10 classes shared by Office-31 and Caltech-256.

Layout: ``<root>/<domain>/<class>/*.jpg`` (``<root>/<domain>/images/<class>/`` also
works). There are no official splits: each domain is split per class with a seeded
stratified split (``options.test_fraction``, default 0.2; ``options.split_seed``,
default 0). Images are decoded lazily or preloaded (``options.preload``).
"""

from __future__ import annotations

from pathlib import Path

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

NAME = "office-caltech10"
DOMAINS = ("amazon", "caltech", "dslr", "webcam")
CLASSES = (
    "back_pack",
    "bike",
    "calculator",
    "headphones",
    "keyboard",
    "laptop_computer",
    "monitor",
    "mouse",
    "mug",
    "projector",
)
SOURCE = DataSource(
    NAME,
    "<root>/{amazon,caltech,dslr,webcam}/{back_pack,bike,...,projector}/*.jpg",
    "https://github.com/med-air/FedBN (office_caltech_10_dataset.zip)",
)
OPTIONS = ("test_fraction", "split_seed", "preload", "cache_size")


def domain_folder(root: Path, domain: str) -> Path:
    folder = root / domain
    if not (folder / CLASSES[0]).is_dir() and (folder / "images" / CLASSES[0]).is_dir():
        return folder / "images"  # Office-31 style <domain>/images/<class>
    if not folder.is_dir():
        raise SOURCE.not_found(folder)
    return folder


@DATASETS.register(NAME)
def load_office_caltech10(cfg: DataConfig) -> MultiDomainDataset:
    opts = Options(NAME, cfg.options, OPTIONS)
    test_fraction = opts.fraction("test_fraction", 0.2)
    seed = opts.int("split_seed", 0, 0)
    preload = opts.preload("auto")
    cache_size = opts.int("cache_size", 256, 0)
    domains = select_domains(NAME, DOMAINS, cfg.domains)
    root = resolve_root(cfg, NAME, SOURCE)
    splits: dict[str, DomainSplit] = {}
    for domain in domains:
        paths, labels = scan_class_folders(domain_folder(root, domain), CLASSES, SOURCE)
        train_idx, test_idx = stratified_split(labels, test_fraction, seed or 0, key=domain)
        images = ImageFileArray(paths, cfg.image_size, cache_size=cache_size or 0)
        splits[domain] = DomainSplit(
            x_train=maybe_preload(images.subset(train_idx), preload),
            y_train=labels[train_idx],
            x_test=maybe_preload(images.subset(test_idx), preload),
            y_test=labels[test_idx],
        )
    return MultiDomainDataset(
        name=NAME,
        domains=splits,
        num_classes=len(CLASSES),
        image_size=cfg.image_size,
        class_names=list(CLASSES),
        notes=f"seeded stratified split (split_seed {seed}, test_fraction {test_fraction}); root {root}",
    )
