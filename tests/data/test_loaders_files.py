"""Shared loader helpers: lazy image array, resize, splits, options, errors, safe unpickling."""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fixtures_datasets import Malicious, label_rgb, write_jpg

from fedsim.config import DataConfig, ScenarioError
from fedsim.data.loaders._files import (
    DatasetNotFound,
    DataSource,
    ImageFileArray,
    Options,
    maybe_preload,
    resolve_root,
    safe_unpickle,
    select_domains,
    stratified_split,
    to_rgb_uint8,
)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("imgs")
    paths = []
    for i in range(12):
        path = root / f"img_{i:02d}.{'png' if i % 3 == 0 else 'jpg'}"
        write_jpg(path, i % 10, size=(20 + i, 30), mode="L" if i == 6 else "RGB")
        paths.append(path)
    return paths


def expected_mean(i: int) -> np.ndarray:
    v = label_rgb(i % 10)
    return np.asarray((v[0],) * 3 if i == 6 else v, dtype=np.float64)


def test_image_file_array_indexing(image_files: list[Path]) -> None:
    arr = ImageFileArray(image_files, 16, cache_size=4)
    assert len(arr) == 12 and arr.shape == (12, 16, 16, 3) and arr.dtype == np.uint8
    one = arr[3]
    assert one.shape == (16, 16, 3) and one.dtype == np.uint8
    assert np.allclose(one.mean(axis=(0, 1)), expected_mean(3), atol=3)
    assert np.array_equal(arr[-1], arr[11])
    assert np.array_equal(arr[np.int64(5)], arr[5])
    sl = arr[2:8:2]
    assert sl.shape == (3, 16, 16, 3)
    for k, i in enumerate(range(2, 8, 2)):
        assert np.array_equal(sl[k], arr[i])
    picked = arr[np.array([11, 0, 6, 0, -2])]
    assert picked.shape == (5, 16, 16, 3)
    for k, i in enumerate([11, 0, 6, 0, 10]):
        assert np.allclose(picked[k].mean(axis=(0, 1)), expected_mean(i), atol=3)
    assert arr[[1, 2]].shape == (2, 16, 16, 3)
    assert arr[np.array([], dtype=np.int64)].shape == (0, 16, 16, 3)
    mask = np.zeros(12, dtype=bool)
    mask[[1, 4]] = True
    assert np.array_equal(arr[mask], arr[[1, 4]])
    assert np.array_equal(np.asarray(arr), arr[:])
    # big enough to use the thread pool
    assert np.array_equal(arr[np.arange(12)], np.stack([arr[i] for i in range(12)]))
    with pytest.raises(IndexError):
        arr[12]
    with pytest.raises(IndexError):
        arr[np.array([0, 12])]
    with pytest.raises(IndexError):
        arr[np.array([0.5])]


def test_image_file_array_cache_subset_pickle(image_files: list[Path]) -> None:
    arr = ImageFileArray(image_files, 8, cache_size=3)
    arr[np.arange(6)]
    assert len(arr._cache) == 3 and list(arr._cache) == [3, 4, 5]
    got = arr[0]
    got[:] = 0  # callers get copies; the cache is not modified
    assert arr[0].max() > 0
    sub = arr.subset([7, 2])
    assert len(sub) == 2 and np.array_equal(sub[0], arr[7]) and np.array_equal(sub[1], arr[2])
    clone = pickle.loads(pickle.dumps(arr))
    assert len(clone._cache) == 0 and np.array_equal(clone[4], arr[4])
    assert isinstance(maybe_preload(arr, "true"), np.ndarray)
    assert maybe_preload(arr, "false") is arr
    assert isinstance(maybe_preload(arr, "auto"), np.ndarray)
    assert maybe_preload(arr, "auto", budget_bytes=10) is arr
    assert np.array_equal(maybe_preload(arr, "true"), arr[:])


def test_decode_error_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(OSError, match="bad.jpg"):
        ImageFileArray([bad], 8)[0]


def test_to_rgb_uint8() -> None:
    gray = np.full((3, 16, 16), 77, dtype=np.uint8)
    out = to_rgb_uint8(gray, 28)
    assert out.shape == (3, 28, 28, 3) and out.dtype == np.uint8 and np.all(out == 77)
    rgb = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    rgb[..., 1] = 200
    out = to_rgb_uint8(rgb, 8)
    assert out.shape == (2, 8, 8, 3) and np.all(out[..., 1] == 200) and np.all(out[..., 0] == 0)
    assert to_rgb_uint8(rgb, 32) is rgb
    with pytest.raises(ValueError):
        to_rgb_uint8(rgb.astype(np.float32), 8)


def test_stratified_split() -> None:
    labels = np.repeat(np.arange(4), [10, 5, 2, 1])
    train, test = stratified_split(labels, 0.2, seed=3, key="a")
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(labels)
    assert list(np.bincount(labels[test], minlength=4)) == [2, 1, 1, 0]
    again = stratified_split(labels, 0.2, seed=3, key="a")
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)
    other = [stratified_split(labels, 0.2, seed=s, key="a")[1] for s in range(5)]
    assert any(not np.array_equal(o, test) for o in other)


def test_options_and_domains() -> None:
    known = ["a", "n", "f", "c", "l", "preload", "p"]
    values = {"a": True, "n": 3, "f": 0.3, "c": "x", "l": ["p", "q"], "preload": "auto"}
    opts = Options("ds", values, known)
    assert opts.bool("a", False) is True and opts.int("n", 0, 1, 5) == 3 and opts.fraction("f", 0.2) == 0.3
    assert opts.choice("c", "y", ("x", "y")) == "x" and opts.str_list("l") == ["p", "q"]
    assert opts.preload() == "auto" and opts.path("p") is None and opts.int("missing", 7) == 7
    with pytest.raises(ScenarioError, match=r"^data\.options\.zzz: unknown option for ds \(known: a, b\)$"):
        Options("ds", {"zzz": 1}, ["b", "a"])
    assert select_domains("ds", ["a", "b", "c"], None) == ["a", "b", "c"]
    assert select_domains("ds", ["a", "b", "c"], ["c", "a"]) == ["c", "a"]
    with pytest.raises(ScenarioError, match=r"^data\.domains: unknown domain 'x' for ds \(known: a, b, c\)$"):
        select_domains("ds", ["a", "b", "c"], ["a", "x"])
    with pytest.raises(ScenarioError, match="listed twice"):
        select_domains("ds", ["a", "b"], ["a", "a"])


@pytest.mark.parametrize(
    ("key", "value", "read"),
    [
        ("a", "yes", lambda o: o.bool("a", False)),
        ("n", 9, lambda o: o.int("n", 0, 1, 5)),
        ("n", True, lambda o: o.int("n", 0, 1, 5)),
        ("f", 1.0, lambda o: o.fraction("f", 0.2)),
        ("c", "z", lambda o: o.choice("c", "x", ("x", "y"))),
        ("l", [], lambda o: o.str_list("l")),
        ("preload", "maybe", lambda o: o.preload()),
    ],
)
def test_bad_option_values(key: str, value: object, read: Callable[[Options], object]) -> None:
    with pytest.raises(ScenarioError, match=rf"^data\.options\.{key}: must be .* \(got {re.escape(repr(value))}\)$"):
        read(Options("ds", {key: value}, [key]))


def test_not_found_and_env_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = DataSource("ds", "<root>/x/*.jpg", "https://example.org/ds")
    missing = tmp_path / "nope"
    with pytest.raises(DatasetNotFound) as info:
        resolve_root(DataConfig(root=str(missing)), "ds", source)
    msg = str(info.value)
    assert msg == f"data.root: ds not found at {missing}: expected <root>/x/*.jpg; get it from https://example.org/ds"
    assert "\n" not in msg and isinstance(info.value, ScenarioError)
    monkeypatch.delenv("FEDSIM_DATA", raising=False)
    with pytest.raises(
        DatasetNotFound, match=r"^data\.root: ds not found at <unset> \(set data\.root or \$FEDSIM_DATA\)"
    ):
        resolve_root(DataConfig(), "ds", source)
    (tmp_path / "ds").mkdir()
    monkeypatch.setenv("FEDSIM_DATA", str(tmp_path))
    assert resolve_root(DataConfig(), "ds", source) == tmp_path / "ds"


def test_safe_unpickle() -> None:
    data = {"data": np.arange(6, dtype=np.uint8).reshape(2, 3), "labels": [1, 2], "name": b"x", "f": np.float32(1.5)}
    for protocol in (2, 4, 5):
        out = safe_unpickle(pickle.dumps(data, protocol=protocol))
        assert np.array_equal(out["data"], data["data"]) and out["labels"] == [1, 2] and out["name"] == b"x"
        assert out["f"] == np.float32(1.5)
    with pytest.raises(pickle.UnpicklingError, match="posix.getcwd|nt.getcwd|os.getcwd"):
        safe_unpickle(pickle.dumps(Malicious(), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="forbidden"):
        safe_unpickle(pickle.dumps({"e": eval}, protocol=2))
