"""pacs: class folders with a seeded split, or the official kfold split files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures_datasets import PACS_CLASSES, image_label_check, write_pacs

from fedsim.config import DataConfig, ScenarioError
from fedsim.data.base import DATASETS, MultiDomainDataset
from fedsim.data.loaders._files import DatasetNotFound


def load(**kwargs: object) -> MultiDomainDataset:
    return DATASETS.get("pacs")(DataConfig(dataset="pacs", **kwargs))


def check_images(ds: MultiDomainDataset) -> None:
    for split in ds.domains.values():
        for x, y in ((split.x_train, split.y_train), (split.x_test, split.y_test)):
            x = np.asarray(x)
            color = [i for i in range(len(y)) if not np.allclose(x[i, ..., 0], x[i, ..., 2], atol=3)]
            assert image_label_check(x[color], y[color])  # (grayscale sketches are skipped)


def test_random_split(tmp_path: Path) -> None:
    write_pacs(tmp_path, per_class=5)
    ds = load(root=str(tmp_path), image_size=20)
    assert list(ds.domains) == ["art_painting", "cartoon", "photo", "sketch"]
    assert ds.num_classes == 7 and ds.class_names == list(PACS_CLASSES)
    for split in ds.domains.values():
        assert split.x_train.shape == (28, 20, 20, 3) and split.x_test.shape == (7, 20, 20, 3)
        assert list(np.bincount(split.y_test, minlength=7)) == [1] * 7
    assert "random" in ds.notes
    check_images(ds)
    with pytest.raises(DatasetNotFound, match=r"art_painting_train_kfold\.txt: expected"):
        load(root=str(tmp_path), options={"split": "official"})


def test_official_split_files(tmp_path: Path) -> None:
    write_pacs(tmp_path, per_class=5, splits=True)
    ds = load(root=str(tmp_path), domains=["sketch", "photo"], image_size=16, options={"preload": False})
    assert list(ds.domains) == ["sketch", "photo"] and "sketch: official" in ds.notes
    split = ds.domains["photo"]
    assert len(split.x_train) == 28 and len(split.x_test) == 7
    assert split.x_train[np.array([0, 5])].shape == (2, 16, 16, 3)
    # 1-based labels in the files -> 0-based; the crossval file (last image per class) is the test part
    assert list(split.y_test) == list(range(7))
    assert all(p.endswith("img_004.jpg") for p in split.x_test.paths)  # type: ignore[union-attr]
    check_images(ds)


def test_official_without_crossval_uses_test_minus_train(tmp_path: Path) -> None:
    write_pacs(tmp_path, per_class=4, splits=True, crossval=False)
    ds = load(root=str(tmp_path), domains=["cartoon"])
    split = ds.domains["cartoon"]
    assert len(split.y_train) == 21 and list(split.y_test) == list(range(7))


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"^data\.domains: unknown domain 'art' for pacs"):
        load(root=str(tmp_path), domains=["art"])
    with pytest.raises(ScenarioError, match=r"^data\.options\.split: must be one of auto, official, random"):
        load(root=str(tmp_path), options={"split": "kfold"})
    with pytest.raises(
        DatasetNotFound, match=r"^data\.root: pacs not found at .*art_painting: expected .*; get it from https://"
    ):
        load(root=str(tmp_path))
