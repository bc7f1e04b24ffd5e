"""CIFAR-10-C corruptions: shape, range, determinism, severity ordering."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from fedsim.tta import config
from fedsim.tta.corruptions import CORRUPTIONS, NOT_MONOTONE, corrupt, frost_textures

NAMES = list(config.CORRUPTIONS)  # the 15 of CIFAR-10-C, named once in the schema
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"}
HAS_FROST = importlib.util.find_spec("imagecorruptions") is not None


def _needs(name: str) -> None:
    if name == "frost" and not HAS_FROST:
        pytest.skip("frost needs the imagecorruptions package's photographs (extra 'corruptions')")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.nn.functional.interpolate(torch.rand(8, 3, 8, 8, generator=gen), size=32, mode="bilinear")


def test_registry_and_metadata() -> None:
    assert list(CORRUPTIONS) == NAMES
    for name in NAMES:
        assert "approximate" not in (CORRUPTIONS[name].__doc__ or "")
    with pytest.raises(ValueError):
        corrupt(torch.rand(1, 3, 8, 8), "fog", 6, 0)


def _change(x: torch.Tensor, y: torch.Tensor, name: str) -> float:
    if name == "frost":  # the frost share: 1 - correlation with the clean image
        xf = x.flatten(1) - x.flatten(1).mean(1, keepdim=True)
        yf = y.flatten(1) - y.flatten(1).mean(1, keepdim=True)
        return float((1 - (xf * yf).sum(1) / (xf.norm(dim=1) * yf.norm(dim=1))).mean())
    return float((y - x).abs().mean())


@pytest.mark.parametrize("name", NAMES)
def test_corruption_deterministic_in_range_and_ordered(name: str, images: torch.Tensor) -> None:
    _needs(name)
    changes = []
    for severity in range(1, 6):
        y = CORRUPTIONS[name](images, severity, np.random.default_rng(3))
        again = CORRUPTIONS[name](images, severity, np.random.default_rng(3))
        assert torch.equal(y, again)
        assert y.shape == images.shape and y.dtype == images.dtype
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
        if name not in DETERMINISTIC:
            other = CORRUPTIONS[name](images, severity, np.random.default_rng(4))
            assert not torch.equal(y, other)
        changes.append(_change(images, y, name))
    assert min(changes) > 0
    if name in NOT_MONOTONE and name != "frost":
        if name != "elastic_transform":  # see NOT_MONOTONE for why
            assert changes[-1] > changes[0]
    else:
        assert all(b > a for a, b in zip(changes, changes[1:])), changes


def test_gray_and_other_sizes() -> None:
    gray = torch.rand(2, 1, 24, 40, generator=torch.Generator().manual_seed(1))
    for name in NAMES:
        if name == "frost" and not HAS_FROST:
            continue
        y = corrupt(gray, name, 3, 0)
        assert y.shape == gray.shape and float(y.min()) >= 0 and float(y.max()) <= 1
        assert not torch.equal(y, gray)


@pytest.mark.skipif(not HAS_FROST, reason="needs the imagecorruptions package (extra 'corruptions')")
def test_frost_textures_and_size_limit() -> None:
    textures = frost_textures()
    assert [t.shape for t in textures] == [(120, 180, 3), (63, 112, 3), (63, 112, 3), (70, 105, 3), (99, 132, 3)]
    assert all(t.dtype == np.uint8 for t in textures)
    with pytest.raises(ValueError, match="frost supports images up to 62x104"):
        corrupt(torch.rand(1, 3, 64, 64), "frost", 1, 0)


def test_legacy_random_state_follows_the_same_draws() -> None:
    """A RandomState seeded s draws what the original's global np.random seeded s draws."""
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = corrupt(x, "gaussian_noise", 2, np.random.RandomState(5))
    noise = np.random.RandomState(5).normal(size=(3, 32, 32, 3), scale=0.06)
    assert np.allclose(y.permute(0, 2, 3, 1).numpy(), np.clip(x.permute(0, 2, 3, 1).numpy() + noise, 0, 1))
    with pytest.raises(TypeError):
        CORRUPTIONS["fog"](x, 1, 3)  # type: ignore[arg-type]


def test_noise_matches_formula(images: torch.Tensor) -> None:
    y = corrupt(images, "gaussian_noise", 5, np.random.default_rng(7))
    noise = np.random.default_rng(7).normal(scale=0.10, size=(8, 32, 32, 3)).astype(np.float32)
    expected = np.clip(images.permute(0, 2, 3, 1).numpy() + noise, 0, 1)
    assert np.allclose(y.permute(0, 2, 3, 1).numpy(), expected, atol=1e-6)
    c = corrupt(images, "contrast", 2, 0)
    m = images.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(c, ((images - m) * 0.5 + m).clamp(0, 1), atol=1e-6)


def test_schema_names_every_implemented_corruption() -> None:
    assert config.CORRUPTIONS == tuple(CORRUPTIONS)
