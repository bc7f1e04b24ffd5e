"""office-caltech10: per-domain class folders, seeded stratified split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures_datasets import OFFICE_CLASSES, image_label_check, write_office_caltech

from fedsim.config import DataConfig, ScenarioError
from fedsim.data.base import DATASETS, MultiDomainDataset
from fedsim.data.loaders._files import DatasetNotFound, ImageFileArray


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("office")
    write_office_caltech(path, per_class=5)
    return path


def load(**kwargs: object) -> MultiDomainDataset:
    return DATASETS.get("office-caltech10")(DataConfig(dataset="office-caltech10", **kwargs))


def test_load_and_split(root: Path) -> None:
    ds = load(root=str(root), image_size=24)
    assert list(ds.domains) == ["amazon", "caltech", "dslr", "webcam"]
    assert ds.num_classes == 10 and ds.class_names == list(OFFICE_CLASSES)
    for split in ds.domains.values():
        assert isinstance(split.x_train, np.ndarray)  # preload: auto, small
        assert split.x_train.shape == (40, 24, 24, 3) and split.x_test.shape == (10, 24, 24, 3)
        assert list(np.bincount(split.y_test, minlength=10)) == [1] * 10
        assert image_label_check(split.x_train, split.y_train) and image_label_check(split.x_test, split.y_test)


def test_seeded_split(root: Path) -> None:
    a = load(root=str(root), domains=["dslr"], options={"split_seed": 1, "test_fraction": 0.4, "preload": False})
    b = load(
        root=str(root), domains=["webcam", "dslr"], options={"split_seed": 1, "test_fraction": 0.4, "preload": False}
    )
    c = load(root=str(root), domains=["dslr"], options={"split_seed": 2, "test_fraction": 0.4, "preload": False})
    xa, xb, xc = a.domains["dslr"].x_test, b.domains["dslr"].x_test, c.domains["dslr"].x_test
    assert isinstance(xa, ImageFileArray) and isinstance(xb, ImageFileArray) and isinstance(xc, ImageFileArray)
    assert len(xa) == 20 and list(b.domains) == ["webcam", "dslr"]
    assert xa.paths == xb.paths  # independent of which other domains are loaded
    assert xa.paths != xc.paths
    assert not set(xa.paths) & set(a.domains["dslr"].x_train.paths)  # type: ignore[union-attr]


def test_errors(root: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ScenarioError,
        match=r"^data\.domains: unknown domain 'Amazon' for office-caltech10 \(known: amazon, caltech, dslr, webcam\)$",
    ):
        load(root=str(root), domains=["Amazon"])
    with pytest.raises(ScenarioError, match=r"^data\.options\.test_fraction: must be a number in \(0, 1\)"):
        load(root=str(root), options={"test_fraction": 1.5})
    with pytest.raises(
        DatasetNotFound,
        match=r"^data\.root: office-caltech10 not found at .*: expected <root>/\{amazon,caltech,dslr,webcam\}/.*; get it from https://github.com/med-air/FedBN",
    ):
        load(root=str(tmp_path / "missing"))
    (tmp_path / "amazon" / "back_pack").mkdir(parents=True)
    with pytest.raises(DatasetNotFound, match=r"not found at .*amazon/bike: expected"):
        load(root=str(tmp_path), domains=["amazon"])
