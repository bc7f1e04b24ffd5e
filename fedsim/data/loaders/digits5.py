"""Built-in five-domain digits dataset ``digits5``, generated offline (no download).

The five domains mimic Digits-Five (MNIST, USPS, MNIST-M, SVHN, SynthDigits) so that
domain-shift experiments run anywhere, including machines without network access. Every
image is synthesised from data that installed packages ship:

* scikit-learn's 1,797 real handwritten 8x8 digits (``load_digits``) for the handwritten
  domains ``mnist``, ``usps`` and ``mnistm``;
* scikit-learn's two sample photographs (china.jpg, flower.jpg) as MNIST-M textures;
* Pillow's bundled font and the DejaVu / STIX / Computer Modern TTF fonts that matplotlib
  ships, for the printed domains ``svhn`` and ``syn``.

The handwritten base digits are split into disjoint, stratified base-train / base-test
pools *before* any rendering, so a domain's test images never reuse a base digit seen in
any domain's train images: test accuracy measures generalisation to new writers' digits,
not memorised shapes under new augmentations.

Building is deterministic (numpy ``SeedSequence`` keyed by seed, domain and split), so the
same arguments give byte-identical arrays, and each domain can be built on its own with the
same result as in the full set. Built domains are cached as ``.npz`` files (one per domain)
under ``$FEDSIM_CACHE`` or ``~/.cache/fedsim``; heavy imports (scikit-learn, scipy, Pillow)
happen only when something has to be built, so loading from the cache stays fast.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.data.base import DATASETS, DomainSplit, MultiDomainDataset
from fedsim.data.config import DataConfig
from fedsim.schema import ScenarioError

log = logging.getLogger(__name__)

# Bump whenever the generated pixels change: the version is part of every cache file name,
# so old caches are simply ignored instead of silently mixing two generations.
BUILDER_VERSION = "digits5-v2"
DOMAINS: tuple[str, ...] = ("mnist", "usps", "mnistm", "svhn", "syn")
NUM_CLASSES = 10
# Fraction of the 1,797 base handwritten digits held out for test parts (about 450).
BASE_TEST_FRACTION = 0.25

# Fixed integer keys for seeding: independent of the order or subset of domains requested,
# so building ``domains=["svhn"]`` gives exactly the svhn of the full build.
_DOMAIN_KEYS = {"mnist": 11, "usps": 12, "mnistm": 13, "svhn": 14, "syn": 15}
_SPLIT_KEYS = {"train": 0, "test": 1}
_BASE_SPLIT_KEY = 1000
_OPTION_KEYS = ("train_per_domain", "test_per_domain", "seed")
# Images are rendered in chunks of about this many pixels, which bounds the float64
# temporaries (elastic fields, colour blends) for large image sizes; at 28-32 px a whole
# domain part is one chunk.
_CHUNK_PIXELS = 4_000_000

# Fonts that render all of 0-9 as ordinary digits (checked by eye; the STIX size/NonUni
# fonts, cmex/cmsy/cmmi and LastResort map the digit code points to symbols, old-style
# figures or boxes). "<pillow>" is Pillow's bundled Aileron via ImageFont.load_default.
_PILLOW_FONT = "<pillow>"
_ALL_FONTS: tuple[str, ...] = (
    _PILLOW_FONT,
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmti10.ttf",
)
# House numbers are upright (no italics); SynthDigits uses every font.
_SVHN_FONTS: tuple[str, ...] = (
    _PILLOW_FONT,
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
)


# --------------------------------------------------------------------------------------
# Seeding, labels and the base handwritten pools


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator for one (seed, purpose) pair; purposes never share a stream."""
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


@functools.lru_cache(maxsize=1)
def _base_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits as float32 [1797, 8, 8] in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    images.setflags(write=False)  # shared through the lru_cache: keep it immutable
    labels.setflags(write=False)
    return images, labels


def base_split(seed: int = 0, test_fraction: float = BASE_TEST_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Indices (sorted) of the base-train and base-test pools of the 1,797 handwritten digits.

    Stratified per class and disjoint; the train parts of the handwritten domains draw only
    from the first pool and the test parts only from the second.
    """
    _, labels = _base_digits()
    rng = _rng(seed, _BASE_SPLIT_KEY)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """n labels in shuffled order, as equal per class as possible (first classes get the rest)."""
    counts = np.full(NUM_CLASSES, n // NUM_CLASSES)
    counts[: n % NUM_CLASSES] += 1
    return rng.permutation(np.repeat(np.arange(NUM_CLASSES, dtype=np.int64), counts))


def draw_from_pool(
    pool: np.ndarray, base_labels: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """For each wanted label, the index of a base digit of that class taken from ``pool``.

    Each class's pool members are used in shuffled rounds (every member once before any is
    reused), so a domain covers as many distinct writers as its size allows.
    """
    out = np.empty(len(labels), dtype=np.int64)
    for c in range(NUM_CLASSES):
        slots = np.flatnonzero(labels == c)
        if len(slots) == 0:
            continue
        members = pool[base_labels[pool] == c]
        rounds = -(-len(slots) // len(members))
        order = np.concatenate([rng.permutation(members) for _ in range(rounds)])
        out[slots] = order[: len(slots)]
    return out


# --------------------------------------------------------------------------------------
# Handwritten strokes


def _render_handwritten(
    base: np.ndarray,
    rng: np.random.Generator,
    size: int,
    *,
    box: tuple[float, float],
    rotation_deg: float,
    shift: float,
    elastic: float,
    threshold: tuple[float, float],
    softness: float = 0.07,
) -> np.ndarray:
    """Warp 8x8 base digits into ``size`` x ``size`` stroke images, float32 in [0, 1].

    Each output pixel is mapped back through a random smooth (elastic) displacement and a
    random affine map (rotation, scale ``box`` = digit box / frame, aspect, shear, shift)
    into the zero-padded 8x8 digit, read with cubic-spline interpolation (a smooth field),
    then turned into strokes with a soft threshold whose level sets the stroke thickness.
    """
    from scipy.ndimage import map_coordinates

    n = len(base)
    pad = 2
    padded = np.pad(base, ((0, 0), (pad, pad), (pad, pad)))
    centres = (np.arange(size, dtype=np.float64) + 0.5) / size - 0.5
    uy, ux = np.meshgrid(centres, centres, indexing="ij")  # image coords in [-0.5, 0.5]

    # Elastic displacement: a sum of three random low-frequency plane waves per axis.
    freq = rng.normal(0.0, 1.2, size=(n, 3, 2))
    phase = rng.uniform(0.0, 2 * np.pi, size=(n, 3, 2))
    amp = rng.normal(0.0, elastic, size=(n, 3, 2))
    arg = 2 * np.pi * (freq[..., 0, None, None] * uy + freq[..., 1, None, None] * ux)  # [n,3,H,W]
    dy = (amp[:, :, 0, None, None] * np.sin(arg + phase[:, :, 0, None, None])).sum(axis=1)
    dx = (amp[:, :, 1, None, None] * np.sin(arg + phase[:, :, 1, None, None])).sum(axis=1)
    wy, wx = uy + dy, ux + dx

    # Affine: image = t + s * R(theta) @ Shear @ diag(a, 1/a) @ digit; invert per sample.
    theta = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, n))
    scale = rng.uniform(box[0], box[1], n)
    aspect = np.exp(rng.uniform(-0.12, 0.12, n))
    shear = rng.uniform(-0.15, 0.15, n)
    offset = rng.uniform(-shift, shift, (n, 2))
    cos, sin = np.cos(theta), np.sin(theta)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # (y, x) order
    shr = np.zeros((n, 2, 2))
    shr[:, 0, 0] = shr[:, 1, 1] = 1.0
    shr[:, 1, 0] = shear
    asp = np.zeros((n, 2, 2))
    asp[:, 0, 0], asp[:, 1, 1] = aspect, 1.0 / aspect
    inv = np.linalg.inv(scale[:, None, None] * rot @ shr @ asp)
    qy, qx = wy - offset[:, 0, None, None], wx - offset[:, 1, None, None]
    py = inv[:, 0, 0, None, None] * qy + inv[:, 0, 1, None, None] * qx
    px = inv[:, 1, 0, None, None] * qy + inv[:, 1, 1, None, None] * qx
    sy = (py + 0.5) * 8 - 0.5 + pad  # digit box [-0.5, 0.5] -> padded pixel index
    sx = (px + 0.5) * 8 - 0.5 + pad

    field = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        field[i] = map_coordinates(padded[i], [sy[i], sx[i]], order=3, mode="constant", cval=0.0)

    level = rng.uniform(threshold[0], threshold[1], n).astype(np.float32)[:, None, None]
    strokes = 1.0 / (1.0 + np.exp(-(field - level) / softness))
    floor = 1.0 / (1.0 + np.exp(level / softness))  # sigmoid at field 0: make background exactly 0
    return np.clip((strokes - floor) / (1.0 - floor), 0.0, 1.0).astype(np.float32)


def _blur(images: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Gaussian blur per image ([n, H, W] or [n, H, W, C]) with its own sigma in pixels."""
    from scipy.ndimage import gaussian_filter

    out = np.empty_like(images)
    for i, s in enumerate(sigmas):
        sig = (s, s) + (0,) * (images.ndim - 3)
        out[i] = gaussian_filter(images[i], sigma=sig, mode="nearest") if s > 0.05 else images[i]
    return out


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _gray_to_rgb(x: np.ndarray) -> np.ndarray:
    """[n, H, W] in [0, 1] -> uint8 [n, H, W, 3]."""
    return np.repeat(_to_uint8(255.0 * x)[..., None], 3, axis=-1)


# --------------------------------------------------------------------------------------
# Printed digits


@functools.lru_cache(maxsize=512)
def _font(name: str, size: int) -> Any:
    from PIL import ImageFont

    if name == _PILLOW_FONT:
        return ImageFont.load_default(size=size)
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    return ImageFont.truetype(str(path), size)


@functools.lru_cache(maxsize=64)
def _digit_height_ratio(name: str) -> float:
    """Height of the digits' ink box per unit font size, to size digits exactly per font."""
    _, top, _, bottom = _font(name, 100).getbbox("0123456789")
    return (bottom - top) / 100.0


def _render_printed(
    labels: np.ndarray,
    rng: np.random.Generator,
    size: int,
    fonts: Sequence[str],
    *,
    height: tuple[float, float],
    stroke: tuple[float, float],
    rotation_deg: float,
    shift: float,
    neighbour_prob: float = 0.0,
    gap: tuple[float, float] = (0.02, 0.12),
) -> np.ndarray:
    """Anti-aliased glyph masks float32 [n, size, size] in [0, 1] of each label.

    Drawn at twice the size (for size <= 64) and box-downsampled, so small images still get
    clean edges. ``height`` is the digit ink height / frame; with ``neighbour_prob`` > 0
    further digits are drawn left / right of the centre one and get cut off by the frame,
    like the house-number crops of SVHN, ``gap`` (fraction of the frame) apart.
    """
    from PIL import Image, ImageDraw

    factor = 2 if size <= 64 else 1
    canvas = size * factor
    out = np.empty((len(labels), size, size), dtype=np.float32)
    for i, label in enumerate(labels):
        name = fonts[int(rng.integers(len(fonts)))]
        target = rng.uniform(*height) * canvas
        font = _font(name, max(4, int(round(target / _digit_height_ratio(name)))))
        sw = int(round(rng.uniform(*stroke) * canvas))
        angle = rng.uniform(-rotation_deg, rotation_deg)
        cx = canvas * (0.5 + rng.uniform(-shift, shift))
        cy = canvas * (0.5 + rng.uniform(-shift, shift))
        space = rng.uniform(*gap) * canvas
        left_digit = str(int(rng.integers(10))) if rng.random() < neighbour_prob else None
        right_digit = str(int(rng.integers(10))) if rng.random() < neighbour_prob else None

        mask = Image.new("L", (canvas, canvas), 0)
        draw = ImageDraw.Draw(mask)
        text = str(int(label))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=sw)
        x0, y0 = cx - (left + right) / 2, cy - (top + bottom) / 2
        draw.text((x0, y0), text, font=font, fill=255, stroke_width=sw, stroke_fill=255)
        if left_digit is not None:
            _, _, lr, _ = draw.textbbox((0, 0), left_digit, font=font, stroke_width=sw)
            draw.text((x0 + left - space - lr, y0), left_digit, font=font, fill=255, stroke_width=sw, stroke_fill=255)
        if right_digit is not None:
            rl, _, _, _ = draw.textbbox((0, 0), right_digit, font=font, stroke_width=sw)
            draw.text((x0 + right + space - rl, y0), right_digit, font=font, fill=255, stroke_width=sw, stroke_fill=255)
        if abs(angle) > 0.1:
            mask = mask.rotate(angle, resample=Image.Resampling.BILINEAR, center=(cx, cy))
        if factor > 1:
            mask = mask.reduce(factor)
        out[i] = np.asarray(mask, dtype=np.float32) / 255.0
    return out


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _muted(rng: np.random.Generator, n: int, saturation: tuple[float, float]) -> np.ndarray:
    """Random RGB colours (0-255) pulled towards their own grey by a random factor."""
    colour = rng.uniform(0, 255, (n, 3))
    grey = _luminance(colour)[:, None]
    return grey + rng.uniform(*saturation, (n, 1)) * (colour - grey)


def _contrasting_colours(rng: np.random.Generator, background: np.ndarray, min_contrast: np.ndarray) -> np.ndarray:
    """Random RGB foregrounds (0-255) whose luminance differs from ``background``'s by at
    least ``min_contrast`` (per sample), drawn by rejection so hues stay unconstrained.

    The requested contrast is capped at 80% of what the background allows (a mid-grey
    background cannot be 140 luminance levels away from anything), so rejection ends fast.
    """
    lum_bg = _luminance(background)
    min_contrast = np.minimum(min_contrast, 0.8 * np.maximum(lum_bg, 255.0 - lum_bg))
    fg = rng.uniform(0, 255, background.shape)
    bad = np.abs(_luminance(fg) - _luminance(background)) < min_contrast
    while bad.any():
        fg[bad] = rng.uniform(0, 255, (int(bad.sum()), 3))
        bad = np.abs(_luminance(fg) - _luminance(background)) < min_contrast
    return fg


# --------------------------------------------------------------------------------------
# The five domains: (labels, rng, size, base-pool indices) -> uint8 [n, size, size, 3]

_HANDWRITTEN = {"box": (0.62, 0.78), "rotation_deg": 12.0, "shift": 0.06, "elastic": 0.018, "threshold": (0.3, 0.55)}


def _domain_mnist(labels: np.ndarray, rng: np.random.Generator, size: int, base_idx: np.ndarray) -> np.ndarray:
    """White strokes on black, digit box about 20/28 of the frame, like MNIST."""
    images, _ = _base_digits()
    return _gray_to_rgb(_render_handwritten(images[base_idx], rng, size, **_HANDWRITTEN))


def _domain_usps(labels: np.ndarray, rng: np.random.Generator, size: int, base_idx: np.ndarray) -> np.ndarray:
    """Coarse 16x16 digits filling the frame, blurred slightly, then blown up blockily."""
    images, _ = _base_digits()
    low = min(16, size)
    strokes = _render_handwritten(
        images[base_idx], rng, low, box=(0.9, 1.02), rotation_deg=6.0, shift=0.03, elastic=0.012, threshold=(0.28, 0.48)
    )
    strokes = _blur(strokes, rng.uniform(0.3, 0.5, len(strokes)) * low / 16)
    # Blur lowers the peaks; rescale each image to its own random peak grey level.
    peak = rng.uniform(0.75, 1.0, len(strokes))[:, None, None]
    strokes = strokes / np.maximum(strokes.reshape(len(strokes), -1).max(axis=1), 1e-6)[:, None, None] * peak
    nearest = np.minimum(((np.arange(size) + 0.5) * low / size).astype(np.int64), low - 1)
    return _gray_to_rgb(strokes[:, nearest][:, :, nearest])


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[Any, ...]:
    """scikit-learn's sample photographs (china, flower) as PIL images, for MNIST-M textures."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return tuple(Image.fromarray(np.asarray(img, dtype=np.uint8)) for img in load_sample_images().images)


def _domain_mnistm(labels: np.ndarray, rng: np.random.Generator, size: int, base_idx: np.ndarray) -> np.ndarray:
    """MNIST-style digits blended into random photo crops as |patch - digit| (MNIST-M)."""
    from PIL import Image

    images, _ = _base_digits()
    digit = 255.0 * _render_handwritten(images[base_idx], rng, size, **_HANDWRITTEN)
    photos = _photos()
    patches = np.empty((len(labels), size, size, 3), dtype=np.float32)
    for i in range(len(labels)):
        photo = photos[int(rng.integers(len(photos)))]
        # 1-3 photo pixels per image pixel: textured but still recognisably photographic.
        side = min(rng.uniform(1.0, 3.0) * size, min(photo.size) - 1)
        x0 = rng.uniform(0, photo.size[0] - side)
        y0 = rng.uniform(0, photo.size[1] - side)
        crop = photo.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
        patches[i] = np.asarray(crop, dtype=np.float32)
    return _to_uint8(np.abs(patches - digit[..., None]))


def _domain_svhn(labels: np.ndarray, rng: np.random.Generator, size: int, base_idx: np.ndarray) -> np.ndarray:
    """Printed digit on a coloured gradient with a plate edge, close cut-off neighbour
    digits, uneven lighting, blur, noise and widely varying (often low) contrast, like
    SVHN's cropped house numbers: the hardest domain."""
    n = len(labels)
    mask = _render_printed(
        labels,
        rng,
        size,
        _SVHN_FONTS,
        height=(0.45, 0.8),
        stroke=(0.0, 0.04),
        rotation_deg=8.0,
        shift=0.06,
        neighbour_prob=0.8,
        gap=(0.0, 0.07),
    )
    centres = (np.arange(size) + 0.5) / size - 0.5
    uy, ux = np.meshgrid(centres, centres, indexing="ij")
    # Walls, plates and paint in street photos are muted: desaturate towards grey.
    c1 = _muted(rng, n, (0.15, 0.65))
    c2 = np.clip(c1 + rng.normal(0, 40, (n, 3)), 0, 255)
    direction = rng.uniform(0, 2 * np.pi, n)
    ramp = np.cos(direction)[:, None, None] * ux + np.sin(direction)[:, None, None] * uy
    ramp = np.clip(0.5 + ramp * rng.uniform(0.6, 1.6, n)[:, None, None], 0, 1)[..., None]
    background = c1[:, None, None] * (1 - ramp) + c2[:, None, None] * ramp
    # Edge of a plate / door frame: a band of another colour along one random side.
    side = rng.integers(0, 4, n)[:, None, None]
    width = np.where(rng.random(n) < 0.5, rng.uniform(0.05, 0.25, n), 0.0)[:, None, None]
    along = np.where(side < 2, uy, ux) * np.where(side % 2 == 0, 1.0, -1.0)
    band = (along < width - 0.5)[..., None]
    background = np.where(band, _muted(rng, n, (0.1, 0.6))[:, None, None], background)
    fg = _contrasting_colours(rng, (c1 + c2) / 2, rng.uniform(22, 100, n))
    grey = _luminance(fg)[:, None]
    fg = grey + rng.uniform(0.3, 0.8, (n, 1)) * (fg - grey)  # muted too; keeps its luminance
    img = background * (1 - mask[..., None]) + fg[:, None, None] * mask[..., None]
    # Uneven lighting (shadow across the crop) lowers the contrast on part of the digit.
    light = rng.uniform(0, 2 * np.pi, n)
    shade = np.cos(light)[:, None, None] * ux + np.sin(light)[:, None, None] * uy + 0.5
    img = img * (1.0 - rng.uniform(0.0, 0.6, n)[:, None, None, None] * np.clip(shade, 0, 1)[..., None])
    img = _blur(img, rng.uniform(0.5, 1.3, n) * size / 28)
    img = img + rng.normal(0, 1, img.shape) * rng.uniform(3, 16, n)[:, None, None, None]
    return _to_uint8(img)


def _domain_syn(labels: np.ndarray, rng: np.random.Generator, size: int, base_idx: np.ndarray) -> np.ndarray:
    """One printed digit in one of many fonts / sizes / weights / small rotations on a solid
    background, slight blur: SynthDigits without the clutter."""
    n = len(labels)
    mask = _render_printed(
        labels, rng, size, _ALL_FONTS, height=(0.42, 0.8), stroke=(0.0, 0.05), rotation_deg=15.0, shift=0.08
    )
    bg = rng.uniform(0, 255, (n, 3))
    fg = _contrasting_colours(rng, bg, rng.uniform(60, 140, n))
    img = bg[:, None, None] * (1 - mask[..., None]) + fg[:, None, None] * mask[..., None]
    return _to_uint8(_blur(img, rng.uniform(0.0, 0.5, n) * size / 28))


_BUILDERS: dict[str, Callable[[np.ndarray, np.random.Generator, int, np.ndarray], np.ndarray]] = {
    "mnist": _domain_mnist,
    "usps": _domain_usps,
    "mnistm": _domain_mnistm,
    "svhn": _domain_svhn,
    "syn": _domain_syn,
}
_USES_BASE = {"mnist", "usps", "mnistm"}


def build_domain_split(domain: str, split: str, n: int, image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One domain's train or test part, uncached: uint8 [n, S, S, 3] and int64 labels [n].

    Labels and base digits come from the (seed, domain, split) stream; each render chunk
    has its own stream, so results depend only on the arguments.
    """
    keys = (_DOMAIN_KEYS[domain], _SPLIT_KEYS[split])
    rng = _rng(seed, *keys)
    labels = _balanced_labels(n, rng)
    base_idx = np.zeros(n, dtype=np.int64)
    if domain in _USES_BASE:
        train_pool, test_pool = base_split(seed)
        pool = train_pool if split == "train" else test_pool
        base_idx = draw_from_pool(pool, _base_digits()[1], labels, rng)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    chunk = max(16, _CHUNK_PIXELS // (image_size * image_size))
    for k, start in enumerate(range(0, n, chunk)):
        part = slice(start, start + chunk)
        images[part] = _BUILDERS[domain](labels[part], _rng(seed, *keys, k + 1), image_size, base_idx[part])
    return images, labels


# --------------------------------------------------------------------------------------
# Cache


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$FEDSIM_CACHE``, else ``~/.cache/fedsim``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FEDSIM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedsim"


def cache_file(cache_dir: Path, domain: str, image_size: int, n_train: int, n_test: int, seed: int) -> Path:
    return cache_dir / f"{BUILDER_VERSION}-{domain}-{image_size}px-train{n_train}-test{n_test}-seed{seed}.npz"


def _read_cache(path: Path, image_size: int, n_train: int, n_test: int) -> DomainSplit | None:
    """The cached domain, or None if the file is missing, unreadable or inconsistent."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("digits5: cache file %s is unreadable (%s); rebuilding it", path, exc)
        return None
    expected = {
        "x_train": ((n_train, image_size, image_size, 3), np.uint8),
        "y_train": ((n_train,), np.int64),
        "x_test": ((n_test, image_size, image_size, 3), np.uint8),
        "y_test": ((n_test,), np.int64),
    }
    for key, (shape, dtype) in expected.items():
        if arrays[key].shape != shape or arrays[key].dtype != dtype:
            log.warning("digits5: cache file %s has a bad %s; rebuilding it", path, key)
            return None
    if any(y.min() < 0 or y.max() >= NUM_CLASSES for y in (arrays["y_train"], arrays["y_test"])):
        log.warning("digits5: cache file %s has labels outside 0-9; rebuilding it", path)
        return None
    return DomainSplit(**arrays)


def _write_cache(path: Path, split: DomainSplit) -> None:
    """Write atomically: a temp file in the same folder, then ``os.replace``, so readers
    (and concurrent builders) only ever see a missing or a complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, x_train=split.x_train, y_train=split.y_train, x_test=split.x_test, y_test=split.y_test)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is fine to share read-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------
# Public entry points


def build_digits5(
    image_size: int = 28,
    train_per_domain: int = 1500,
    test_per_domain: int = 400,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    domains: list[str] | None = None,
) -> MultiDomainDataset:
    """Build (or load from the cache) the five-domain digits dataset.

    ``domains`` picks a subset and its order (default: all five). ``seed`` is the dataset
    seed: it fixes the pixels, independently of any experiment seed.
    """
    names = list(DOMAINS) if domains is None else list(domains)
    unknown = [d for d in names if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown digits5 domain '{unknown[0]}' (known: {', '.join(DOMAINS)})")
    if len(set(names)) != len(names) or not names:
        raise ValueError("digits5 domains must be a non-empty list without repeats")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (got {image_size})")
    if train_per_domain < 1 or test_per_domain < 1:
        raise ValueError("train_per_domain and test_per_domain must be >= 1")
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (got {seed})")

    root = cache_root(cache_dir)
    splits: dict[str, DomainSplit] = {}
    for domain in names:
        path = cache_file(root, domain, image_size, train_per_domain, test_per_domain, seed)
        cached = _read_cache(path, image_size, train_per_domain, test_per_domain)
        if cached is None:
            x_train, y_train = build_domain_split(domain, "train", train_per_domain, image_size, seed)
            x_test, y_test = build_domain_split(domain, "test", test_per_domain, image_size, seed)
            cached = DomainSplit(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
            try:
                _write_cache(path, cached)
            except OSError as exc:  # read-only home, full disk: still usable, just slower next time
                log.warning("digits5: cannot write cache file %s (%s)", path, exc)
        splits[domain] = cached

    notes = (
        f"{BUILDER_VERSION}: synthetic Digits-Five look-alike built offline. mnist/usps/mnistm warp "
        "scikit-learn's 1,797 handwritten 8x8 digits (split first into disjoint stratified base-train / "
        f"base-test pools, {BASE_TEST_FRACTION:.0%} test) with random affine + elastic maps and stroke "
        "thickness; usps renders at 16x16 and upsamples blockily; mnistm blends |photo crop - digit| with "
        "scikit-learn's sample photos; svhn and syn draw printed digits with matplotlib's DejaVu/STIX/cm "
        "fonts and Pillow's font (svhn: gradients, cut-off neighbour digits, blur, noise; syn: many fonts "
        f"on solid colours). Dataset seed {seed}; classes balanced."
    )
    return MultiDomainDataset(
        name="digits5",
        domains=splits,
        num_classes=NUM_CLASSES,
        image_size=image_size,
        channels=3,
        class_names=[str(c) for c in range(NUM_CLASSES)],
        notes=notes,
    )


def _int_option(options: dict[str, Any], key: str, default: int, minimum: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(f"data.options.{key}: must be an integer (got {value!r})")
    if value < minimum:
        raise ScenarioError(f"data.options.{key}: must be >= {minimum} (got {value!r})")
    return value


@DATASETS.register("digits5")
def load_digits5(cfg: DataConfig) -> MultiDomainDataset:
    """Scenario entry point: ``data.image_size``, ``data.domains`` and ``data.options``
    (``train_per_domain``, ``test_per_domain``, ``seed``: the dataset seed, default 0, kept
    apart from the experiment seed so partitions vary with the experiment but pixels don't)."""
    for key in cfg.options:
        if key not in _OPTION_KEYS:
            raise ScenarioError(f"data.options.{key}: unknown option for digits5 (known: {', '.join(_OPTION_KEYS)})")
    domains = None
    if cfg.domains is not None:
        if not cfg.domains:
            raise ScenarioError("data.domains: empty list (leave it out to use all digits5 domains)")
        for name in cfg.domains:
            if name not in DOMAINS:
                raise ScenarioError(f"data.domains: unknown domain '{name}' for digits5 (known: {', '.join(DOMAINS)})")
        repeated = sorted({d for d in cfg.domains if cfg.domains.count(d) > 1})
        if repeated:
            raise ScenarioError(f"data.domains: domain '{repeated[0]}' is listed more than once")
        domains = list(cfg.domains)
    return build_digits5(
        image_size=cfg.image_size,
        train_per_domain=_int_option(cfg.options, "train_per_domain", 1500, 1),
        test_per_domain=_int_option(cfg.options, "test_per_domain", 400, 1),
        seed=_int_option(cfg.options, "seed", 0, 0),
        domains=domains,
    )
