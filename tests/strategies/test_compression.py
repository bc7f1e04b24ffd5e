"""Tests for fedsim.strategies.compressed.compressors (and the flat-vector layout of .base): wire formats, operator properties, byte counts, factory."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsim.strategies.compressed.base import flatten, unflatten
from fedsim.strategies.compressed.compressors import (
    QSGD,
    Compressor,
    Identity,
    RandK,
    ScaledSign,
    TopK,
    index_dtype,
    make_compressor,
)


def _x(d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(d).astype(np.float32)


# ------------------------------------------------------------------------------ index dtype


@pytest.mark.parametrize(
    ("d", "dtype"),
    [
        (1, np.uint8),
        (256, np.uint8),
        (257, np.uint16),
        (65536, np.uint16),
        (65537, np.uint32),
        (2**32, np.uint32),
        (2**32 + 1, np.uint64),
    ],
)
def test_index_dtype_is_smallest(d: int, dtype: type) -> None:
    assert index_dtype(d) == np.dtype(dtype)


# ------------------------------------------------------------------------------ identity


def test_identity_roundtrip_and_bytes() -> None:
    x = _x(100)
    c = Identity()
    payload = c.encode(x)
    assert payload["values"].dtype == np.float32
    np.testing.assert_array_equal(c.decode(payload, 100), x)
    assert c.nbytes(payload) == 400
    assert c.contractive and c.delta(100) == 1.0


# ------------------------------------------------------------------------------ top-k


@pytest.mark.parametrize("d", [50, 1000, 70000])
def test_topk_keeps_exactly_k_largest(d: int) -> None:
    x = _x(d, seed=d)
    c = TopK(fraction=0.05)
    k = max(1, round(0.05 * d))
    payload = c.encode(x)
    out = c.decode(payload, d)
    assert out.dtype == np.float32 and out.shape == (d,)
    assert payload["values"].shape == (k,)
    assert payload["indices"].dtype == index_dtype(d)
    expected_idx = np.sort(np.argsort(-np.abs(x))[:k])
    np.testing.assert_array_equal(np.sort(payload["indices"].astype(np.int64)), expected_idx)
    ref = np.zeros_like(x)
    ref[expected_idx] = x[expected_idx]
    np.testing.assert_array_equal(out, ref)
    assert np.count_nonzero(out) == k
    # every kept magnitude >= every dropped magnitude
    dropped = np.setdiff1d(np.arange(d), expected_idx)
    assert np.abs(x[expected_idx]).min() >= np.abs(x[dropped]).max()


@pytest.mark.parametrize(("d", "dtype"), [(200, np.uint8), (1000, np.uint16), (100_000, np.uint32)])
def test_topk_index_dtype_smallest(d: int, dtype: type) -> None:
    payload = TopK(count=7).encode(_x(d))
    assert payload["indices"].dtype == np.dtype(dtype)
    assert payload["values"].dtype == np.float32


def test_topk_count_and_edge_cases() -> None:
    x = _x(10)
    np.testing.assert_array_equal(TopK(count=10).compress(x), x)
    np.testing.assert_array_equal(TopK(count=50).compress(x), x)  # capped at d
    np.testing.assert_array_equal(TopK(fraction=1.0).compress(x), x)
    assert np.count_nonzero(TopK(fraction=1e-9).compress(x)) == 1  # at least one entry
    assert TopK(count=3).delta(10) == pytest.approx(0.3)


def test_topk_contraction() -> None:
    c = TopK(fraction=0.1)
    for seed in range(20):
        x = _x(500, seed)
        err = np.sum((c.compress(x) - x).astype(np.float64) ** 2)
        assert err <= (1 - c.delta(500)) * np.sum(x.astype(np.float64) ** 2) + 1e-9


def test_topk_nbytes_one_percent_of_a_million() -> None:
    d = 1_000_000
    c = TopK(fraction=0.01)
    payload = c.encode(_x(d))
    k = 10_000
    assert payload["values"].size == k and payload["indices"].dtype == np.uint32
    nb = c.nbytes(payload)
    assert abs(nb - k * (4 + 4)) <= 0.03 * k * 8
    assert nb < 0.021 * 4 * d


# ------------------------------------------------------------------------------ rand-k


def test_randk_same_seed_same_indices() -> None:
    x = _x(1000)
    c = RandK(fraction=0.05)
    p1 = c.encode(x, np.random.default_rng(7))
    p2 = c.encode(x, np.random.default_rng(7))
    assert set(p1) == {"values", "seed"}
    assert p1["seed"].dtype == np.uint64 and p1["seed"].shape == (1,)
    np.testing.assert_array_equal(p1["seed"], p2["seed"])
    np.testing.assert_array_equal(p1["values"], p2["values"])
    out1, out2 = c.decode(p1, 1000), c.decode(p2, 1000)
    np.testing.assert_array_equal(out1, out2)
    idx = np.flatnonzero(out1)
    assert idx.size == 50
    np.testing.assert_array_equal(idx, RandK.indices_from_seed(int(p1["seed"][0]), 1000, 50))
    np.testing.assert_array_equal(out1[idx], x[idx])  # biased: values untouched
    # a different seed draws a different set
    p3 = c.encode(x, np.random.default_rng(8))
    assert not np.array_equal(np.flatnonzero(c.decode(p3, 1000)), idx)
    assert c.nbytes(p1) == 50 * 4 + 8
    assert c.contractive and c.delta(1000) == pytest.approx(0.05)


def test_randk_unbiased_mean() -> None:
    d, k, draws = 20, 5, 20000
    x = _x(d, 3)
    c = RandK(count=k, unbiased=True)
    assert not c.contractive and c.omega(d) == pytest.approx(d / k - 1)
    rng = np.random.default_rng(0)
    acc = np.zeros(d)
    for _ in range(draws):
        out = c.compress(x, rng)
        assert np.count_nonzero(out) == k
        acc += out
    mean = acc / draws
    # per-coordinate std of the mean: |x_j| sqrt((d/k - 1) / draws) ~ 0.012 |x_j|
    np.testing.assert_allclose(mean, x, atol=6 * math.sqrt(3 / draws) * np.abs(x).max())


def test_randomised_compressors_need_rng() -> None:
    with pytest.raises(ValueError, match="rng"):
        RandK(fraction=0.1).encode(_x(10))
    with pytest.raises(ValueError, match="rng"):
        QSGD(4).encode(_x(10))


# ------------------------------------------------------------------------------ qsgd


@pytest.mark.parametrize(("s", "bits"), [(1, 1), (2, 2), (3, 2), (4, 3), (16, 5), (127, 7), (128, 8), (1000, 10)])
def test_qsgd_levels_and_bytes(s: int, bits: int) -> None:
    d = 300
    x = _x(d, s)
    c = QSGD(s)
    assert c.level_bits == bits == math.ceil(math.log2(s + 1))
    payload = c.encode(x, np.random.default_rng(1))
    assert set(payload) == {"norm", "codes"}
    assert payload["norm"].dtype == np.float32 and payload["norm"].shape == (1,)
    levels = c.unpack(payload["codes"], d)
    assert np.abs(levels).max() <= s
    norm = np.linalg.norm(x.astype(np.float64))
    r = s * np.abs(x.astype(np.float64)) / norm
    lev = np.abs(levels)
    # each level is floor(r) or floor(r) + 1, sign preserved
    assert np.all((lev == np.floor(r)) | (lev == np.floor(r) + 1))
    assert np.all((np.sign(levels) == np.sign(x)) | (levels == 0))
    out = c.decode(payload, d)
    np.testing.assert_allclose(out, norm * levels / s, rtol=1e-6)
    # a sign bit and b level bits per coordinate, bit-packed, plus the float32 norm
    assert c.nbytes(payload) == 4 + math.ceil(d * (1 + bits) / 8)


@pytest.mark.parametrize(("s", "d"), [(1, 1), (2, 7), (4, 64), (16, 1001), (255, 33)])
def test_qsgd_encoder_round_trip_and_byte_count(s: int, d: int) -> None:
    """The payload is a real encoding: its bytes, parsed back on their own, give the same
    quantized values as the quantizer drew, and the reported bytes are their length."""
    x = _x(d, d + s)
    c = QSGD(s)
    norm, levels = c.quantize(x, np.random.default_rng(3))
    payload = c.encode(x, np.random.default_rng(3))
    wire = payload["norm"].tobytes() + payload["codes"].tobytes()
    assert c.nbytes(payload) == len(wire)
    # receiver side: only the bytes and (s, d) are known
    got_norm = np.frombuffer(wire[:4], dtype=np.float32)[0]
    got_levels = c.unpack(np.frombuffer(wire[4:], dtype=np.uint8), d)
    assert got_norm == norm
    np.testing.assert_array_equal(got_levels, levels)
    np.testing.assert_array_equal(
        c.decode({"norm": np.array([got_norm]), "codes": np.frombuffer(wire[4:], np.uint8)}, d),
        c.compress(x, np.random.default_rng(3)),
    )


def test_qsgd_bit_layout() -> None:
    """s = 2 (b = 2): levels [-1, 2, 0] are sign|level bits 1|01 0|10 0|00, MSB first, zero padded."""
    c = QSGD(2)
    assert c.pack(np.array([-1, 2, 0])).tolist() == [0b10101000, 0b00000000]
    np.testing.assert_array_equal(c.unpack(np.array([0b10101000, 0], np.uint8), 3), [-1, 2, 0])
    with pytest.raises(ValueError):
        c.unpack(np.zeros(3, np.uint8), 3)


def test_qsgd_unbiased() -> None:
    d, draws = 16, 20000
    x = _x(d, 5)
    c = QSGD(2)
    rng = np.random.default_rng(0)
    mean = np.mean([c.compress(x, rng) for _ in range(draws)], axis=0)
    bound = np.linalg.norm(x) / 2  # |C(x)_j - x_j| <= ||x|| / s
    np.testing.assert_allclose(mean, x, atol=6 * bound / math.sqrt(draws))
    assert not c.contractive and c.unbiased


def test_qsgd_zero_vector() -> None:
    out = QSGD(4).compress(np.zeros(9, np.float32), np.random.default_rng(0))
    np.testing.assert_array_equal(out, np.zeros(9, np.float32))


# ------------------------------------------------------------------------------ scaled sign


@pytest.mark.parametrize("d", [1, 8, 13, 1001])
def test_scaled_sign(d: int) -> None:
    x = _x(d, d)
    x[0] = 0.0
    c = ScaledSign()
    payload = c.encode(x)
    assert payload["signs"].dtype == np.uint8 and payload["signs"].size == math.ceil(d / 8)
    assert payload["scale"].dtype == np.float32
    np.testing.assert_allclose(payload["scale"][0], np.mean(np.abs(x)), rtol=1e-6)
    out = c.decode(payload, d)
    scale = np.float32(payload["scale"][0])
    np.testing.assert_array_equal(out, np.where(x >= 0, scale, -scale))
    assert c.nbytes(payload) == 4 + math.ceil(d / 8)
    # contraction identity ||C(x) - x||^2 = ||x||^2 - ||x||_1^2 / d
    x64 = x.astype(np.float64)
    lhs = np.sum((out.astype(np.float64) - x64) ** 2)
    np.testing.assert_allclose(lhs, np.sum(x64**2) - np.sum(np.abs(x64)) ** 2 / d, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ common


@pytest.mark.parametrize(
    "comp", [Identity(), TopK(fraction=0.1), RandK(count=3), RandK(count=3, unbiased=True), QSGD(8), ScaledSign()]
)
def test_compress_is_decode_encode(comp: Compressor) -> None:
    x = _x(64, 11)
    out = comp.compress(x, np.random.default_rng(4))
    ref = comp.decode(comp.encode(x, np.random.default_rng(4)), 64)
    assert out.dtype == np.float32 and out.shape == (64,)
    np.testing.assert_array_equal(out, ref)
    assert make_compressor(comp.spec()) == comp


# ------------------------------------------------------------------------------ factory


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("topk:0.01", TopK(fraction=0.01)),
        ("topk:100", TopK(count=100)),
        ({"name": "topk", "fraction": 0.01}, TopK(fraction=0.01)),
        ({"name": "TopK", "count": 5}, TopK(count=5)),
        ("randk:0.1", RandK(fraction=0.1)),
        ("randk:0.1:unbiased", RandK(fraction=0.1, unbiased=True)),
        ({"name": "randk", "count": 4, "unbiased": True}, RandK(count=4, unbiased=True)),
        ("qsgd:16", QSGD(16)),
        ({"name": "qsgd", "levels": 4}, QSGD(4)),
        ("sign", ScaledSign()),
        ("scaled_sign", ScaledSign()),
        ("identity", Identity()),
        ("none", Identity()),
    ],
)
def test_make_compressor(spec: object, expected: Compressor) -> None:
    got = make_compressor(spec)  # type: ignore[arg-type]
    assert type(got) is type(expected) and got == expected


@pytest.mark.parametrize(
    "spec",
    [
        "foo",
        "topk",
        "topk:abc",
        "topk:0",
        "topk:1.5",
        "topk:0.1:2",
        "qsgd",
        "qsgd:x",
        "qsgd:0",
        "sign:3",
        "randk:0.1:maybe",
        {"name": "topk"},
        {"name": "topk", "fraction": 0.1, "count": 3},
        {"name": "qsgd"},
        {"name": "sign", "scale": 1},
        {"fraction": 0.1},
        {"name": "bogus"},
        {"name": "topk", "fraction": "0.1"},
        {"name": "randk", "fraction": 0.1, "unbiased": "yes"},
        {"name": "qsgd", "levels": 2.5},
        3,
    ],
)
def test_make_compressor_errors(spec: object) -> None:
    with pytest.raises(ValueError) as info:
        make_compressor(spec)  # type: ignore[arg-type]
    msg = str(info.value)
    assert msg and "\n" not in msg


# ------------------------------------------------------------------------------ flatten


def test_flatten_unflatten_roundtrip() -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float32),
        "fc.weight": rng.standard_normal((2, 5)).astype(np.float64),
        "bn.num_batches_tracked": np.array(12, dtype=np.int64),
    }
    vec, layout = flatten(arrays)
    assert vec.dtype == np.float32 and vec.shape == (108 + 4 + 10 + 1,)
    assert layout.size == vec.size and layout.names == tuple(arrays)
    back = unflatten(vec, layout)
    assert list(back) == list(arrays)
    for name, arr in arrays.items():
        assert back[name].shape == arr.shape and back[name].dtype == arr.dtype
        np.testing.assert_allclose(back[name], arr, rtol=1e-6)
    with pytest.raises(ValueError):
        unflatten(vec[:-1], layout)
