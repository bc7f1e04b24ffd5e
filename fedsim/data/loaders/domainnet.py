"""DomainNet (Peng et al., ICCV 2019): clipart, infograph, painting, quickdraw, real, sketch.

Layout: ``<root>/<domain>/<class>/*.jpg`` with the official split files
``<root>/<domain>_train.txt`` and ``<root>/<domain>_test.txt`` (lines
``clipart/aircraft_carrier/clipart_001_000018.jpg 0``, 0-based labels over 345 classes).

Images are returned as lazy :class:`ImageFileArray` objects (decoded and resized on
access, LRU cache of ``options.cache_size`` images) unless ``options.preload`` is true or
"auto". ``options.classes`` (list of class folder names) or ``options.subset: fedbn10``
(the 10 classes of FedBN / FedWon) keep only those classes, relabelled 0..k-1 in the
order given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedsim.data.base import DATASETS, DomainSplit, MultiDomainDataset
from fedsim.data.config import DataConfig
from fedsim.data.loaders._files import DataSource, ImageFileArray, Options, maybe_preload, resolve_root, select_domains
from fedsim.schema import ScenarioError

NAME = "domainnet"
DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
SUBSETS: dict[str, tuple[str, ...]] = {
    # FedBN (Li et al., ICLR 2021) and FedWon (Zhuang & Lyu, ICLR 2024): 10 classes.
    "fedbn10": (
        "bird",
        "feather",
        "headphones",
        "ice_cream",
        "teapot",
        "tiger",
        "whale",
        "windmill",
        "wine_glass",
        "zebra",
    ),
}
SOURCE = DataSource(
    NAME,
    "<root>/<domain>/<class>/*.jpg and <root>/<domain>_{train,test}.txt for domain in "
    "clipart, infograph, painting, quickdraw, real, sketch",
    "http://ai.bu.edu/M3SDA/",
)
OPTIONS = ("classes", "subset", "preload", "cache_size")


class SplitList:
    """One split file: relative paths, labels and each line's class folder name."""

    def __init__(self, path: Path, root: Path) -> None:
        self.paths: list[str] = []
        labels: list[int] = []
        self.class_of_line: list[str] = []
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise ScenarioError(
                    f"data.root: {path}:{lineno}: expected 'relative/path.jpg label', got {line.strip()!r}"
                )
            rel = parts[0].lstrip("/")
            self.paths.append(str(root / rel))
            labels.append(int(parts[1]))
            self.class_of_line.append(Path(rel).parent.name)
        self.labels = np.asarray(labels, dtype=np.int64)
        if not self.paths:
            raise ScenarioError(f"data.root: {path}: empty split file")
        if not Path(self.paths[0]).is_file():
            raise SOURCE.not_found(self.paths[0])


def read_domain(root: Path, domain: str) -> tuple[SplitList, SplitList]:
    out: list[SplitList] = []
    for part in ("train", "test"):
        path = root / f"{domain}_{part}.txt"
        if not path.is_file():
            raise SOURCE.not_found(path)
        out.append(SplitList(path, root))
    return out[0], out[1]


def label_names(lists: list[SplitList]) -> list[str]:
    """Class names indexed by the official labels (from the folder of each listed file)."""
    names: dict[int, str] = {}
    for split in lists:
        for label, name in zip(split.labels.tolist(), split.class_of_line, strict=True):
            known = names.setdefault(label, name)
            if known != name:
                raise ScenarioError(f"data.root: {NAME}: label {label} is used for both '{known}' and '{name}'")
    size = max(names) + 1
    return [names.get(i, f"class_{i}") for i in range(size)]


@DATASETS.register(NAME)
def load_domainnet(cfg: DataConfig) -> MultiDomainDataset:
    opts = Options(NAME, cfg.options, OPTIONS)
    classes = opts.str_list("classes")
    subset = opts.choice("subset", "", tuple(SUBSETS)) if "subset" in opts else None
    if classes is not None and subset is not None:
        raise ScenarioError("data.options.subset: give either data.options.classes or data.options.subset, not both")
    if subset is not None:
        classes = list(SUBSETS[subset])
    preload = opts.preload("false")
    cache_size = opts.int("cache_size", 256, 0) or 0
    domains = select_domains(NAME, DOMAINS, cfg.domains)
    root = resolve_root(cfg, NAME, SOURCE)
    lists = {d: read_domain(root, d) for d in domains}
    all_lists = [s for pair in lists.values() for s in pair]

    if classes is None:
        class_names = label_names(all_lists)
    else:
        seen = {name for s in all_lists for name in s.class_of_line}
        for name in classes:
            if name not in seen:
                raise ScenarioError(
                    f"data.options.classes: unknown class '{name}' for {NAME} (not in the split files of {', '.join(domains)})"
                )
        class_names = list(classes)
    new_label = {name: i for i, name in enumerate(class_names)}

    splits: dict[str, DomainSplit] = {}
    for domain, pair in lists.items():
        parts: list[tuple[ImageFileArray | np.ndarray, np.ndarray]] = []
        for split in pair:
            if classes is None:
                keep = np.arange(len(split.paths))
                labels = split.labels
            else:
                keep = np.asarray([i for i, n in enumerate(split.class_of_line) if n in new_label], dtype=np.int64)
                labels = np.asarray([new_label[split.class_of_line[i]] for i in keep], dtype=np.int64)
            images = ImageFileArray([split.paths[i] for i in keep], cfg.image_size, cache_size)
            parts.append((maybe_preload(images, preload), labels))
        splits[domain] = DomainSplit(x_train=parts[0][0], y_train=parts[0][1], x_test=parts[1][0], y_test=parts[1][1])

    chosen = "all classes" if classes is None else (f"subset {subset}" if subset else f"{len(class_names)} classes")
    return MultiDomainDataset(
        name=NAME,
        domains=splits,
        num_classes=len(class_names),
        image_size=cfg.image_size,
        class_names=class_names,
        notes=f"official train/test split files; {chosen}; root {root}",
    )
