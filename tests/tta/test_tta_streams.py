"""Test streams: protocols, Dirichlet label ordering, hooks, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data.base import DomainSplit, MultiDomainDataset
from fedsim.tta.streams import (
    GRADUAL_SEVERITIES,
    build_stream,
    dirichlet_order,
    domain_sets,
)


def _data(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.random((n, 8, 8, 3)) * 255).astype(np.uint8), rng.integers(0, 10, n)


def _runs(labels: np.ndarray) -> float:
    return len(labels) / (1 + int(np.count_nonzero(np.diff(labels))))


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("delta", [None, float("inf"), 0.0, 1e-3, 0.1, 1.0, 100.0])
def test_dirichlet_order_keeps_every_sample_once(delta: float | None, shuffle: bool) -> None:
    labels = np.random.default_rng(0).integers(0, 10, 1000)
    order = dirichlet_order(labels, 10, delta, np.random.default_rng(1), shuffle)
    assert np.array_equal(np.sort(order), np.arange(1000))
    assert np.array_equal(order, dirichlet_order(labels, 10, delta, np.random.default_rng(1), shuffle))


def _labels_per_window(labels: np.ndarray, window: int = 64) -> float:
    return float(np.mean([len(np.unique(labels[i : i + window])) for i in range(0, len(labels), window)]))


def test_dirichlet_small_delta_gives_long_runs() -> None:
    labels = np.random.default_rng(0).integers(0, 10, 2000)

    def mean_over_seeds(stat, delta, shuffle):  # type: ignore[no-untyped-def]
        return np.mean(
            [stat(labels[dirichlet_order(labels, 10, delta, np.random.default_rng(s), shuffle)]) for s in range(5)]
        )

    # chunks played in order: long runs of one label, longer for smaller delta
    runs = {d: mean_over_seeds(_runs, d, False) for d in (None, 0.01, 0.1, 10.0)}
    assert runs[0.01] > 20 * runs[None]
    assert runs[0.01] > runs[0.1] > runs[10.0] > runs[None]
    # shuffled slots (RoTTA sampler): few labels per 64-sample window for small delta
    diversity = {d: mean_over_seeds(_labels_per_window, d, True) for d in (None, 0.01, 0.1, 100.0)}
    assert diversity[0.01] < 4.5 < 9.5 < diversity[None]
    assert diversity[0.01] <= diversity[0.1] < diversity[100.0]
    sorted_order = dirichlet_order(labels, 10, 0.0, np.random.default_rng(0))
    assert np.all(np.diff(labels[sorted_order]) >= 0)


def _stream_pixels(stream) -> tuple[list[str], np.ndarray, np.ndarray]:
    shifts, xs, ys = [], [], []
    for b in stream:
        shifts += [b.shift] * len(b.y)
        xs.append(np.round(b.x.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8))
        ys.append(b.y.numpy())
    return shifts, np.concatenate(xs), np.concatenate(ys)


def test_protocols_segments_and_counts() -> None:
    x, y = _data()
    dom_x, dom_y = _data(50, seed=1)
    shifts = ["gaussian_noise@5", "fog@2", "dom"]
    kw = dict(images=x, labels=y, domains={"dom": (dom_x, dom_y)}, batch_size=7, samples_per_shift=40, seed=3)
    reset = build_stream(shifts, protocol="reset-each-shift", **kw)
    assert reset.reset_between_shifts and [s["shift"] for s in reset.record()["segments"]] == shifts
    batches = list(reset)
    assert [b.index for b in batches] == list(range(len(batches))) == list(range(len(reset)))
    assert sum(len(b.y) for b in batches) == 120 and max(len(b.y) for b in batches) == 7
    assert not build_stream(shifts, protocol="continual", **kw).reset_between_shifts
    mixed = list(build_stream(shifts, protocol="mixed", **kw))
    assert {b.shift for b in mixed} == {"mixed"} and sum(len(b.y) for b in mixed) == 120
    grad = build_stream(["contrast"], images=x, labels=y, protocol="gradual", batch_size=16, samples_per_shift=10)
    assert [s["shift"] for s in grad.record()["segments"]] == [f"contrast@{k}" for k in GRADUAL_SEVERITIES]


def test_domain_shift_plays_each_domain_image_once() -> None:
    x, y = _data(30)
    stream = build_stream(["a"], domains={"a": (x, y)}, batch_size=4, dirichlet_delta=0.1, seed=0)
    _, xs, ys = _stream_pixels(stream)
    key = lambda arr: sorted(map(bytes, arr.reshape(len(arr), -1)))  # noqa: E731
    assert key(xs) == key(x)
    assert sorted(ys.tolist()) == sorted(y.tolist())


def test_deterministic_given_seed() -> None:
    x, y = _data()
    kw = dict(images=x, labels=y, batch_size=10, samples_per_shift=50, dirichlet_delta=0.1)
    a = _stream_pixels(build_stream(["snow@3", "shot_noise@1"], seed=5, **kw))
    b = _stream_pixels(build_stream(["snow@3", "shot_noise@1"], seed=5, **kw))
    c = _stream_pixels(build_stream(["snow@3", "shot_noise@1"], seed=6, **kw))
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    assert not np.array_equal(a[1], c[1])
    stream = build_stream(["snow@3"], seed=5, **kw)
    assert np.array_equal(_stream_pixels(stream)[1], _stream_pixels(stream)[1])  # re-iterable


def test_corrupted_source_hook_and_batch_size_one() -> None:
    x, y = _data(20)
    calls = []

    def source(corruption: str, severity: int) -> tuple[np.ndarray, np.ndarray]:
        calls.append((corruption, severity))
        return x, y

    stream = build_stream(["fog@4", "fog@4"], corrupted_source=source, batch_size=1, protocol="continual", seed=0)
    batches = list(stream)
    assert calls == [("fog", 4)] and len(batches) == 40 and all(len(b.y) == 1 for b in batches)
    _, xs, _ = _stream_pixels(stream)
    assert sorted(map(bytes, xs.reshape(40, -1))) == sorted(map(bytes, np.concatenate([x, x]).reshape(40, -1)))


def test_domain_sets_and_errors() -> None:
    x, y = _data(10)
    ds = MultiDomainDataset("toy", {"a": DomainSplit(x, y, x, y), "b": DomainSplit(x, y, x[:5], y[:5])}, 10, 8)
    sets = domain_sets(ds, ["b"])
    assert list(sets) == ["b"] and len(sets["b"][1]) == 5
    with pytest.raises(ValueError):
        build_stream(["nope@3"], images=x, labels=y)
    with pytest.raises(ValueError):
        build_stream(["fog"], images=x, labels=y)  # no severity
    with pytest.raises(ValueError):
        build_stream(["fog@3"], images=x, labels=y, protocol="sideways")
