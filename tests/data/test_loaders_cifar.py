"""cifar10 (restricted unpickling of the python batches) and cifar10c (.npy memory maps)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures_datasets import (
    CIFAR_NAMES,
    image_label_check,
    write_cifar10,
    write_cifar10c,
    write_malicious_cifar_batch,
)

from fedsim.config import DataConfig, ScenarioError
from fedsim.data.base import DATASETS, MultiDomainDataset
from fedsim.data.loaders._files import DatasetNotFound
from fedsim.data.loaders.cifar10c import CORRUPTIONS, load_cifar10c


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cifar")
    write_cifar10(path, per_batch=20, n_test=30)
    write_cifar10c(path, corruptions=("gaussian_noise", "fog"), n=20)
    return path


def load(name: str, **kwargs: object) -> MultiDomainDataset:
    return DATASETS.get(name)(DataConfig(dataset=name, **kwargs))


def test_cifar10(root: Path) -> None:
    ds = load("cifar10", root=str(root), image_size=32)
    assert list(ds.domains) == ["cifar10"] and ds.num_classes == 10 and ds.class_names == CIFAR_NAMES
    split = ds.domains["cifar10"]
    assert split.x_train.shape == (100, 32, 32, 3) and split.x_test.shape == (30, 32, 32, 3)
    assert split.x_train.dtype == np.uint8 and split.y_train.dtype == np.int64
    assert image_label_check(split.x_train, split.y_train, tol=0) and image_label_check(
        split.x_test, split.y_test, tol=0
    )
    small = load("cifar10", root=str(root), image_size=16).domains["cifar10"]
    assert small.x_train.shape == (100, 16, 16, 3) and image_label_check(small.x_train, small.y_train)


def test_cifar10_refuses_malicious_pickle(root: Path, tmp_path: Path) -> None:
    shutil.copytree(root / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    write_malicious_cifar_batch(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(
        ScenarioError,
        match=r"^data\.root: .*data_batch_3: refused to unpickle \(global '(posix|nt|os)\.getcwd' is forbidden\)",
    ):
        load("cifar10", root=str(tmp_path))


def test_cifar10_not_found(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetNotFound,
        match=r"^data\.root: cifar10 not found at .*: expected <root>/cifar-10-batches-py/.*; get it from https://www\.cs\.toronto\.edu/~kriz/cifar\.html",
    ):
        load("cifar10", root=str(tmp_path / "none"))
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DatasetNotFound, match=r"cifar-10-batches-py/data_batch_1: expected"):
        load("cifar10", root=str(tmp_path))
    with pytest.raises(
        ScenarioError, match=r"^data\.domains: unknown domain 'cifar100' for cifar10 \(known: cifar10\)$"
    ):
        load("cifar10", root=str(tmp_path), domains=["cifar100"])


def test_load_cifar10c(root: Path) -> None:
    for severity in (1, 3, 5):
        x, y = load_cifar10c(root, "fog", severity)
        assert x.shape == (20, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
        assert isinstance(x, np.memmap)  # only this severity is read
        assert np.all(x[:, 0, 0, 0] == 100 + severity)
        assert image_label_check(x, y)
    x, _ = load_cifar10c(root / "CIFAR-10-C", "gaussian_noise", 2)
    assert np.all(x[:, 0, 0, 0] == 2)
    with pytest.raises(ScenarioError, match=r"^data\.options\.severity: must be an integer in 1\.\.5"):
        load_cifar10c(root, "fog", 6)
    with pytest.raises(ScenarioError, match=r"^data\.domains: unknown corruption 'rain'"):
        load_cifar10c(root, "rain", 1)
    with pytest.raises(
        DatasetNotFound,
        match=r"^data\.root: cifar10c not found at .*CIFAR-10-C/snow\.npy: expected .*; get it from https://zenodo\.org/records/2535967$",
    ):
        load_cifar10c(root, "snow", 1)


def test_cifar10c_dataset(root: Path) -> None:
    ds = load(
        "cifar10c", root=str(root), image_size=32, options={"corruptions": ["fog", "gaussian_noise"], "severity": 4}
    )
    assert list(ds.domains) == ["fog", "gaussian_noise"] and ds.num_classes == 10
    fog, noise = ds.domains["fog"], ds.domains["gaussian_noise"]
    assert fog.x_train is noise.x_train and fog.x_train.shape == (100, 32, 32, 3)  # clean train, shared
    assert fog.x_test.shape == (20, 32, 32, 3) and np.all(np.asarray(fog.x_test)[:, 0, 0, 0] == 104)
    assert image_label_check(fog.x_test, fog.y_test)
    ds = load("cifar10c", root=str(root), domains=["gaussian_noise"], image_size=16)
    split = ds.domains["gaussian_noise"]
    assert split.x_test.shape == (20, 16, 16, 3) and split.x_train.shape == (100, 16, 16, 3)
    assert "severity 5" in ds.notes


def test_cifar10c_options(root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match=r"CIFAR-10-C/shot_noise\.npy: expected"):
        load("cifar10c", root=str(root))  # default: all 15 standard corruptions (fixture has 2)
    assert len(CORRUPTIONS) == 15
    with pytest.raises(ScenarioError, match=r"^data\.options\.corruptions: unknown corruption 'rain'"):
        load("cifar10c", root=str(root), options={"corruptions": ["rain"]})
    with pytest.raises(ScenarioError, match=r"^data\.domains: give either data\.domains or data\.options\.corruptions"):
        load("cifar10c", root=str(root), domains=["fog"], options={"corruptions": ["gaussian_noise"]})
    with pytest.raises(ScenarioError, match=r"^data\.options\.severity: must be an integer >= 1 and <= 5"):
        load("cifar10c", root=str(root), domains=["fog"], options={"severity": 0})
    # clean CIFAR-10 from another folder
    shutil.copytree(root / "CIFAR-10-C", tmp_path / "CIFAR-10-C")
    with pytest.raises(DatasetNotFound, match=r"^data\.root: cifar10 not found"):
        load("cifar10c", root=str(tmp_path), domains=["fog"])
    ds = load("cifar10c", root=str(tmp_path), domains=["fog"], options={"cifar10_root": str(root)}, image_size=32)
    assert ds.domains["fog"].x_train.shape == (100, 32, 32, 3)
