"""digits-five: torchvision formats (MNIST idx, USPS bz2, SVHN .mat) and FedBN's npz / pickles."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures_datasets import image_label_check, write_digits_five, write_fedbn_pickles

from fedsim.config import DataConfig, ScenarioError
from fedsim.data.base import DATASETS, MultiDomainDataset
from fedsim.data.loaders._files import DatasetNotFound


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("digits5")
    write_digits_five(path)
    return path


def load(**kwargs: object) -> MultiDomainDataset:
    return DATASETS.get("digits-five")(DataConfig(dataset="digits-five", **kwargs))


def test_all_domains(root: Path) -> None:
    ds = load(root=str(root))
    assert list(ds.domains) == ["mnist", "usps", "svhn", "mnistm", "syn"]
    assert ds.num_classes == 10 and ds.image_size == 28 and ds.class_names == [str(i) for i in range(10)]
    for name, split in ds.domains.items():
        assert isinstance(split.x_train, np.ndarray)
        assert split.x_train.shape == (30, 28, 28, 3) and split.x_test.shape == (20, 28, 28, 3), name
        assert split.x_train.dtype == np.uint8 and split.y_train.dtype == np.int64
        assert sorted(set(split.y_train.tolist())) == list(range(10))
        gray = name in ("mnist", "usps")
        assert image_label_check(split.x_train, split.y_train, rgb=not gray), name
        assert image_label_check(split.x_test, split.y_test, rgb=not gray), name
    # SVHN stores the digit 0 as label 10
    assert ds.domains["svhn"].y_train.min() == 0


def test_domain_selection_resize_and_train_parts(root: Path) -> None:
    ds = load(root=str(root), domains=["syn", "usps"], image_size=16, options={"train_parts": 5})
    assert list(ds.domains) == ["syn", "usps"]
    assert ds.domains["usps"].x_train.shape == (15, 16, 16, 3)
    assert ds.domains["syn"].x_train.shape == (15, 16, 16, 3) and ds.domains["syn"].x_test.shape == (20, 16, 16, 3)
    assert image_label_check(ds.domains["syn"].x_train, ds.domains["syn"].y_train)
    with pytest.raises(
        ScenarioError,
        match=r"^data\.domains: unknown domain 'mnist_m' for digits-five \(known: mnist, usps, svhn, mnistm, syn\)$",
    ):
        load(root=str(root), domains=["mnist_m"])
    with pytest.raises(ScenarioError, match=r"^data\.options\.percent: unknown option for digits-five"):
        load(root=str(root), options={"percent": 0.1})
    with pytest.raises(ScenarioError, match=r"^data\.options\.train_parts: must be an integer >= 1 and <= 10"):
        load(root=str(root), options={"train_parts": 11})


def test_fedbn_pickles_need_opt_in(tmp_path: Path) -> None:
    write_fedbn_pickles(tmp_path, "MNIST_M", per_part=4, parts=10, n_test=6)
    with pytest.raises(
        ScenarioError, match=r"^data\.options\.allow_pickle: digits-five domain mnistm is only in FedBN's pickle format"
    ):
        load(root=str(tmp_path), domains=["mnistm"])
    ds = load(root=str(tmp_path), domains=["mnistm"], options={"allow_pickle": True})
    split = ds.domains["mnistm"]
    assert split.x_train.shape == (40, 28, 28, 3) and split.x_test.shape == (6, 28, 28, 3)
    assert image_label_check(split.x_train, split.y_train)
    ds = load(root=str(tmp_path), domains=["mnistm"], options={"allow_pickle": True, "train_parts": 1})
    assert len(ds.domains["mnistm"].y_train) == 4


def test_fedbn_format_fallback_for_mnist(tmp_path: Path, root: Path) -> None:
    # FedBN's release has MNIST/ too; without the torchvision raw files it is used instead.
    shutil.copytree(root / "MNIST_M", tmp_path / "MNIST")
    ds = load(root=str(tmp_path), domains=["mnist"])
    assert ds.domains["mnist"].x_train.shape == (30, 28, 28, 3)


def test_not_found(tmp_path: Path, root: Path) -> None:
    with pytest.raises(
        DatasetNotFound, match=r"^data\.root: digits-five not found at .*nowhere: expected .*; get it from "
    ):
        load(root=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFound) as info:
        load(root=str(tmp_path), domains=["svhn"])
    msg = str(info.value)
    assert msg.startswith(
        f"data.root: digits-five (svhn) not found at {tmp_path / 'SVHN'}: expected SVHN/train_32x32.mat"
    )
    assert "http://ufldl.stanford.edu/housenumbers/" in msg and "\n" not in msg
    (tmp_path / "SynthDigits").mkdir()
    np.savez(tmp_path / "SynthDigits" / "train.npz", images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.zeros(2))
    with pytest.raises(DatasetNotFound, match=r"SynthDigits/test\.npz: expected"):
        load(root=str(tmp_path), domains=["syn"])
