"""The built-in digits5 dataset: shapes, determinism, cache, pool split, domain shift."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedsim.config import DataConfig, ScenarioError
from fedsim.data.base import DATASETS, MultiDomainDataset
from fedsim.data.loaders import digits5
from fedsim.data.loaders.digits5 import (
    DOMAINS,
    base_split,
    build_digits5,
    build_domain_split,
    draw_from_pool,
    load_digits5,
)
from fedsim.data.show import save_domain_grid

SMALL = {"train_per_domain": 300, "test_per_domain": 100}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> MultiDomainDataset:
    """All five domains, small, built once for the module in a private cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDSIM_CACHE", str(tmp_path_factory.mktemp("cache")))
        return build_digits5(**SMALL)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path))
    return tmp_path


# --------------------------------------------------------------------------------------
# Shapes, dtypes, labels


def test_shapes_dtypes_and_balanced_labels(small: MultiDomainDataset) -> None:
    assert small.name == "digits5"
    assert list(small.domains) == list(DOMAINS)
    assert small.num_classes == 10 and small.image_size == 28 and small.channels == 3
    assert small.class_names == [str(c) for c in range(10)]
    assert "scikit-learn" in small.notes
    for part in small.domains.values():
        for x, y, n in ((part.x_train, part.y_train, 300), (part.x_test, part.y_test, 100)):
            assert isinstance(x, np.ndarray) and x.shape == (n, 28, 28, 3) and x.dtype == np.uint8
            assert y.shape == (n,) and y.dtype == np.int64
            np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, n // 10))
            assert x.std() > 20  # not blank


def test_other_image_size_and_uneven_counts(cache: Path) -> None:
    ds = build_digits5(image_size=32, train_per_domain=23, test_per_domain=12, domains=["syn", "usps"])
    assert list(ds.domains) == ["syn", "usps"] and ds.image_size == 32
    part = ds.domains["usps"]
    assert part.x_train.shape == (23, 32, 32, 3) and part.x_test.shape == (12, 32, 32, 3)
    # 23 = 10 * 2 + 3: the first three classes get one more.
    np.testing.assert_array_equal(np.bincount(part.y_train, minlength=10), [3, 3, 3] + [2] * 7)


# --------------------------------------------------------------------------------------
# Determinism


def test_same_arguments_give_identical_arrays_and_seed_changes_them(tmp_path: Path) -> None:
    a = build_digits5(train_per_domain=40, test_per_domain=20, cache_dir=tmp_path / "a")
    b = build_digits5(train_per_domain=40, test_per_domain=20, cache_dir=tmp_path / "b")
    c = build_digits5(train_per_domain=40, test_per_domain=20, seed=1, cache_dir=tmp_path / "c")
    for name in DOMAINS:
        pa, pb, pc = a.domains[name], b.domains[name], c.domains[name]
        assert pa.x_train.tobytes() == pb.x_train.tobytes() and pa.x_test.tobytes() == pb.x_test.tobytes()
        np.testing.assert_array_equal(pa.y_train, pb.y_train)
        assert not np.array_equal(pa.x_train, pc.x_train)
    # A subset builds each domain exactly as the full set does (seeds are per domain).
    only = build_digits5(train_per_domain=40, test_per_domain=20, cache_dir=tmp_path / "d", domains=["svhn", "mnist"])
    assert list(only.domains) == ["svhn", "mnist"]
    np.testing.assert_array_equal(only.domains["svhn"].x_train, a.domains["svhn"].x_train)


def test_train_and_test_parts_differ() -> None:
    x_train, _ = build_domain_split("mnist", "train", 20, 28, 0)
    x_test, _ = build_domain_split("mnist", "test", 20, 28, 0)
    assert not np.array_equal(x_train, x_test)


# --------------------------------------------------------------------------------------
# Cache


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_cache_round_trip(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = build_digits5(train_per_domain=30, test_per_domain=10, domains=["mnist", "syn"])
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and all(f.startswith(digits5.BUILDER_VERSION) and f.endswith(".npz") for f in files)
    assert any("syn-28px-train30-test10-seed0" in f for f in files)
    assert _no_temp_files(cache)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("should have loaded from the cache")

    monkeypatch.setattr(digits5, "build_domain_split", refuse)
    second = build_digits5(train_per_domain=30, test_per_domain=10, domains=["mnist", "syn"])
    for name in ("mnist", "syn"):
        np.testing.assert_array_equal(first.domains[name].x_train, second.domains[name].x_train)
        np.testing.assert_array_equal(first.domains[name].y_test, second.domains[name].y_test)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-shape"])
def test_corrupt_cache_file_is_rebuilt(cache: Path, damage: str) -> None:
    first = build_digits5(train_per_domain=30, test_per_domain=10, domains=["usps"])
    (path,) = cache.iterdir()
    if damage == "garbage":
        path.write_bytes(b"not an npz file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        np.savez(path, x_train=np.zeros((2, 2), np.uint8), y_train=np.zeros(2, np.int64),
                 x_test=np.zeros((2, 2), np.uint8), y_test=np.zeros(2, np.int64))  # fmt: skip
    again = build_digits5(train_per_domain=30, test_per_domain=10, domains=["usps"])
    np.testing.assert_array_equal(first.domains["usps"].x_train, again.domains["usps"].x_train)
    # ... and the file was repaired.
    with np.load(path) as data:
        np.testing.assert_array_equal(data["x_train"], first.domains["usps"].x_train)


def test_interrupted_write_leaves_no_file(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(digits5.np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        build_digits5(train_per_domain=20, test_per_domain=10, domains=["mnist"])
    assert list(cache.iterdir()) == []


# --------------------------------------------------------------------------------------
# Base pools


def test_base_pools_are_disjoint_stratified_and_seeded() -> None:
    _, labels = digits5._base_digits()
    train, test = base_split(0)
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(len(labels)))
    test_share = np.bincount(labels[test], minlength=10) / np.bincount(labels, minlength=10)
    assert np.all(np.abs(test_share - digits5.BASE_TEST_FRACTION) < 0.02)
    np.testing.assert_array_equal(base_split(0)[1], test)
    assert not np.array_equal(base_split(1)[1], test)


def test_draws_stay_in_their_pool_and_class() -> None:
    _, base_labels = digits5._base_digits()
    train, test = base_split(0)
    rng = np.random.default_rng(0)
    wanted = digits5._balanced_labels(1500, rng)  # more than the pool: members get reused
    for pool in (train, test):
        drawn = draw_from_pool(pool, base_labels, wanted, rng)
        assert np.isin(drawn, pool).all()
        np.testing.assert_array_equal(base_labels[drawn], wanted)
        # Every member of a class is used once before any is used twice.
        counts = np.bincount(drawn, minlength=len(base_labels))[pool]
        for c in range(10):
            in_class = counts[base_labels[pool] == c]
            assert in_class.max() - in_class.min() <= 1


# --------------------------------------------------------------------------------------
# Domain shift


def test_domain_colour_statistics_differ(small: MultiDomainDataset) -> None:
    stats = {}
    for name, part in small.domains.items():
        x = part.x_train.astype(np.float32)
        stats[name] = (x.mean(), x.std(axis=-1).mean())  # brightness, colourfulness
    assert stats["mnist"][1] == 0 and stats["usps"][1] == 0  # grayscale
    assert stats["usps"][0] > stats["mnist"][0] + 15  # digit fills the frame
    assert min(stats[d][1] for d in ("mnistm", "svhn", "syn")) > 10  # colour
    assert stats["syn"][1] > stats["svhn"][1] + 10  # saturated vs muted colours
    assert stats["mnistm"][0] > stats["mnist"][0] + 40  # photo background


def _summary(x: np.ndarray) -> np.ndarray:
    """Per-image style features: channel means/stds, colourfulness, edge energy, darkness."""
    x = x.astype(np.float32) / 255
    return np.concatenate(
        [
            x.mean(axis=(1, 2)),
            x.std(axis=(1, 2)),
            x.std(axis=-1).mean(axis=(1, 2))[:, None],
            np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3))[:, None],
            (x.max(axis=-1) < 0.05).mean(axis=(1, 2))[:, None],
        ],
        axis=1,
    )


def test_domains_are_recognisable_from_style(small: MultiDomainDataset) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x_train = np.concatenate([_summary(p.x_train) for p in small.domains.values()])
    y_train = np.repeat(np.arange(len(DOMAINS)), 300)
    x_test = np.concatenate([_summary(p.x_test) for p in small.domains.values()])
    y_test = np.repeat(np.arange(len(DOMAINS)), 100)
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=1000).fit(scaler.transform(x_train), y_train)
    predicted = clf.predict(scaler.transform(x_test))
    for i, name in enumerate(DOMAINS):
        assert (predicted[y_test == i] == i).mean() > 0.8, name


def test_classifier_trained_on_mnist_drops_on_colour_domains(small: MultiDomainDataset) -> None:
    """Nearest class mean on grey pixels: learnable in-domain, much worse under shift."""

    def grey(x: np.ndarray) -> np.ndarray:
        return (x.astype(np.float32) / 255).mean(axis=-1).reshape(len(x), -1)

    src = small.domains["mnist"]
    means = np.stack([grey(src.x_train)[src.y_train == c].mean(axis=0) for c in range(10)])

    def accuracy(name: str) -> float:
        part = small.domains[name]
        dist = ((grey(part.x_test)[:, None, :] - means[None]) ** 2).sum(axis=-1)
        return float((dist.argmin(axis=1) == part.y_test).mean())

    in_domain = accuracy("mnist")
    assert in_domain > 0.45
    for name in ("mnistm", "svhn", "syn"):
        assert accuracy(name) < in_domain - 0.2, name


# --------------------------------------------------------------------------------------
# Scenario entry point and the picture


def test_repeated_domains_are_refused_by_the_schema() -> None:
    with pytest.raises(ValueError, match="domains must be distinct \\(repeated: mnist\\)"):
        DataConfig(domains=["mnist", "mnist"])


def test_registered_loader_reads_config(cache: Path) -> None:
    assert DATASETS.get("digits5") is load_digits5
    cfg = DataConfig(
        domains=["usps", "mnist"], image_size=16, options={"train_per_domain": 20, "test_per_domain": 10, "seed": 3}
    )
    ds = load_digits5(cfg)
    assert list(ds.domains) == ["usps", "mnist"] and ds.image_size == 16
    assert ds.domains["mnist"].x_train.shape == (20, 16, 16, 3)
    direct = build_digits5(image_size=16, train_per_domain=20, test_per_domain=10, seed=3, domains=["mnist"])
    np.testing.assert_array_equal(ds.domains["mnist"].x_train, direct.domains["mnist"].x_train)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"domains": ["mnist", "x"]},
            "data.domains: unknown domain 'x' for digits5 (known: mnist, usps, mnistm, svhn, syn)",
        ),
        ({"options": {"size": 3}}, "data.options.size: unknown option"),
        ({"options": {"train_per_domain": "many"}}, "data.options.train_per_domain: must be an integer"),
        ({"options": {"seed": -1}}, "data.options.seed: must be >= 0"),
    ],
)
def test_bad_config_raises_scenario_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ScenarioError) as err:
        load_digits5(DataConfig(**kwargs))
    assert str(err.value).startswith(message)


def test_save_domain_grid(small: MultiDomainDataset, tmp_path: Path) -> None:
    from PIL import Image

    out = save_domain_grid(small, tmp_path / "sub" / "grid.png", per_domain=12, split="test")
    assert out == tmp_path / "sub" / "grid.png"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > img.height > 100
