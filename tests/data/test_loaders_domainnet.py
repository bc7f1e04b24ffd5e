"""domainnet: official split files, lazy image arrays, class subsets relabelled."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from fixtures_datasets import DOMAINNET_CLASSES, image_label_check, write_domainnet

from fedsim.config import DataConfig, ScenarioError
from fedsim.data.base import DATASETS, MultiDomainDataset
from fedsim.data.loaders._files import DatasetNotFound, ImageFileArray

POSITION = {name: pos for pos, name in enumerate(DOMAINNET_CLASSES)}  # colour code of each class


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("domainnet")
    write_domainnet(path, per_class=3, test_per_class=1)
    return path


def load(**kwargs: object) -> MultiDomainDataset:
    return DATASETS.get("domainnet")(DataConfig(dataset="domainnet", **kwargs))


def test_full_label_space_is_lazy(root: Path) -> None:
    ds = load(root=str(root), image_size=20)
    assert list(ds.domains) == ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
    assert ds.num_classes == 345 and ds.class_names[27] == "bird" and ds.class_names[344] == "zebra"
    split = ds.domains["real"]
    assert isinstance(split.x_train, ImageFileArray) and isinstance(split.x_test, ImageFileArray)
    assert split.x_train.shape == (33, 20, 20, 3) and len(split.x_test) == 11
    assert sorted(set(split.y_train.tolist())) == sorted(DOMAINNET_CLASSES.values())
    batch = split.x_train[np.array([32, 0, 5])]
    assert batch.shape == (3, 20, 20, 3) and batch.dtype == np.uint8
    names = [ds.class_names[y] for y in split.y_train[[32, 0, 5]]]
    assert image_label_check(batch, np.array([POSITION[n] for n in names]))
    assert split.x_train[4:10].shape == (6, 20, 20, 3)
    clone = pickle.loads(pickle.dumps(split.x_train))
    assert np.array_equal(clone[7], split.x_train[7])


def test_fedbn10_subset_relabelled(root: Path) -> None:
    ds = load(
        root=str(root), domains=["sketch", "clipart"], options={"subset": "fedbn10", "preload": True}, image_size=12
    )
    assert list(ds.domains) == ["sketch", "clipart"]
    assert ds.num_classes == 10 and ds.class_names[0] == "bird" and ds.class_names[9] == "zebra"
    split = ds.domains["clipart"]
    assert isinstance(split.x_train, np.ndarray) and split.x_train.shape == (30, 12, 12, 3)
    assert list(np.bincount(split.y_train)) == [3] * 10 and list(np.bincount(split.y_test)) == [1] * 10
    code = np.array([POSITION[ds.class_names[y]] for y in split.y_train])
    assert image_label_check(split.x_train, code)


def test_classes_option(root: Path) -> None:
    ds = load(root=str(root), domains=["real"], options={"classes": ["zebra", "aircraft_carrier"]})
    split = ds.domains["real"]
    assert ds.class_names == ["zebra", "aircraft_carrier"] and ds.num_classes == 2
    assert sorted(split.y_train.tolist()) == [0, 0, 0, 1, 1, 1]
    code = np.array([POSITION[ds.class_names[y]] for y in split.y_test])
    assert image_label_check(split.x_test[:], code)
    with pytest.raises(ScenarioError, match=r"^data\.options\.classes: unknown class 'unicorn' for domainnet"):
        load(root=str(root), domains=["real"], options={"classes": ["zebra", "unicorn"]})
    with pytest.raises(ScenarioError, match=r"^data\.options\.subset: give either"):
        load(root=str(root), options={"classes": ["zebra"], "subset": "fedbn10"})
    with pytest.raises(ScenarioError, match=r"^data\.options\.subset: must be one of fedbn10"):
        load(root=str(root), options={"subset": "top10"})


def test_not_found(root: Path, tmp_path: Path) -> None:
    with pytest.raises(
        DatasetNotFound,
        match=r"^data\.root: domainnet not found at .*clipart_train\.txt: expected .*; get it from http://ai\.bu\.edu/M3SDA/$",
    ):
        load(root=str(tmp_path))
    with pytest.raises(
        ScenarioError,
        match=r"^data\.domains: unknown domain 'photo' for domainnet \(known: clipart, infograph, painting, quickdraw, real, sketch\)$",
    ):
        load(root=str(root), domains=["photo"])
