"""The CIFAR-10-C corruption set (Hendrycks & Dietterich, ICLR 2019) on float image batches.

Every corruption is a function ``f(x, severity, rng) -> x'`` with ``x`` a float tensor
[B, C, H, W] in [0, 1] (C = 3, or C = 1 where the corruption has a gray form), ``severity`` in
1..5 and ``rng`` a ``numpy.random.Generator`` (or a legacy ``numpy.random.RandomState``), the
only source of randomness. The result has the same shape, dtype and device and is clamped to
[0, 1].

Each function follows the algorithm and the 32x32 constants of the original
``make_cifar_c.py`` (hendrycks/robustness), image by image, drawing its random numbers in the
same order as the original does for each image in turn. Given a ``RandomState`` seeded as the
original's global ``np.random``, the output matches the original's (as floats in [0, 1]; the
original returns [0, 255]) to within one uint8 step; ``tests/tta/test_tta_corruptions_reference.py``
checks this against a transcription of the original running on OpenCV and scikit-image.
Two parts the original took from outside Python come from the ``imagecorruptions`` package
(Michaelis et al. 2019, the original's maintained port): motion blur (in ``motion_blur`` and
``snow``) is its re-implementation of ImageMagick's ``MotionBlurImage`` (the original calls
ImageMagick through Wand), and ``frost`` crops its frost photographs, which fedsim reads from
an installed ``imagecorruptions`` (``pip install 'fedsim[corruptions]'``, or
``pip install --no-deps imagecorruptions``; fedsim does not import that package).

For other image sizes the spatial constants (blur radii and sigmas, glass displacement, motion
radius and sigma, elastic sizes, fractal map size) are scaled by ``s = min(H, W) / 32``;
relative constants (zoom factors, pixelate ratio, intensities) are not.

Differences from the original: intermediate values stay in float where the original holds
them in uint8 only because it receives and returns uint8 images (input conversion, JPEG and
pixelate through PIL; the original's glass-blur and snow-layer uint8 steps are kept), and
the released CIFAR-10-C files were drawn with one global ``np.random`` stream over the whole
test set, so generated images do not equal those files sample by sample.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from functools import lru_cache
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image

Rng = np.random.Generator | np.random.RandomState
CorruptionFn = Callable[[torch.Tensor, int, Rng], torch.Tensor]
NumpyFn = Callable[[np.ndarray, int, Rng], np.ndarray]

CORRUPTIONS: dict[str, CorruptionFn] = {}
"""Corruption name -> ``f(x, severity, rng)``, in the CIFAR-10-C order."""

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

NOT_MONOTONE: dict[str, str] = {
    "glass_blur": "severity 4 blurs with a smaller sigma than 3 (but shuffles twice); same in the original",
    "motion_blur": "severities 3 and 4 share sigma 2 and differ only in the radius (6 vs 8), whose extra "
    "taps weigh below 1e-6 (Gaussian weights), so they blur alike; same in the original",
    "elastic_transform": "the original's severity 1 is a pure affine warp of the largest amplitude; higher "
    "severities trade it for local elastic displacement, so the pixel change falls with severity",
    "frost": "the image weight falls (1 to .75) while the frost weight rises (.2 to .45), so the pixel "
    "distance peaks mid-way; the frost share (1 - correlation with the clean image) grows monotonically",
    "pixelate": "at 32x32 the box resampling sizes are 30/28/27/24/20 px, and 24 px (an exact 4:3 ratio) "
    "loses less than 27 px; severity 5 changes most",
}
"""Corruptions whose mean pixel change is not monotone in severity (also so in the original)."""

FROST_FILES: tuple[str, ...] = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
"""The frost photographs the CIFAR-10-C script draws from (``randint(5)``: the sixth is never used)."""

FROST_MISSING = (
    "corruption 'frost' needs the frost photographs of the imagecorruptions package: "
    "pip install 'fedsim[corruptions]' (or: pip install --no-deps imagecorruptions)"
)


def _register(name: str) -> Callable[[NumpyFn], NumpyFn]:
    """Register a numpy NHWC implementation under ``name`` wrapped for torch NCHW input."""

    def decorator(fn: NumpyFn) -> NumpyFn:
        def corruption(x: torch.Tensor, severity: int, rng: Rng) -> torch.Tensor:
            _check(x, severity, rng)
            # float64 as the original (which divides uint8 images by 255.)
            arr = x.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).numpy().copy()
            out = np.clip(fn(arr, int(severity), rng), 0.0, 1.0)
            return torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2).to(x.device, x.dtype)

        corruption.__name__ = name
        corruption.__doc__ = fn.__doc__
        CORRUPTIONS[name] = corruption
        return fn

    return decorator


def _check(x: torch.Tensor, severity: int, rng: Rng) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError("corruptions take a float tensor [B, C, H, W] in [0, 1]")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"corruptions take 1 or 3 channels, got {x.shape[1]}")
    if int(severity) not in SEVERITIES:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    if not isinstance(rng, (np.random.Generator, np.random.RandomState)):
        raise TypeError("rng must be a numpy.random.Generator or numpy.random.RandomState")


def corrupt(x: torch.Tensor, name: str, severity: int, rng: Rng | int) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity``; ``rng`` may be a Generator, a RandomState or an int seed."""
    if name not in CORRUPTIONS:
        raise KeyError(f"unknown corruption '{name}' (known: {', '.join(CORRUPTIONS)})")
    gen = rng if isinstance(rng, (np.random.Generator, np.random.RandomState)) else np.random.default_rng(rng)
    return CORRUPTIONS[name](x, severity, gen)


# ----------------------------------------------------------------------------- helpers


def _integers(rng: Rng, low: int, high: int, size: int | tuple[int, ...] | None = None) -> np.ndarray | int:
    """Integers in [low, high): ``Generator.integers`` or the original's ``randint``."""
    if isinstance(rng, np.random.RandomState):
        return rng.randint(low, high, size=size)
    return rng.integers(low, high, size=size)


def _scale(x: np.ndarray) -> float:
    """Spatial scale relative to 32x32 images."""
    return min(x.shape[1], x.shape[2]) / 32.0


def _gray(x: np.ndarray) -> np.ndarray:
    """Luma as OpenCV's RGB2GRAY (0.299 R + 0.587 G + 0.114 B), shape [..., 1]."""
    if x.shape[-1] == 1:
        return x
    return (x @ np.array([0.299, 0.587, 0.114]))[..., None]


def _gaussian_blur(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """``skimage.filters.gaussian`` over H and W of a [B, H, W, C] batch (it is this scipy call)."""
    # scipy and matplotlib (0.4 s) are imported where used: every `fedsim run` imports this
    # module for the corruption names, most never corrupt an image
    from scipy import ndimage

    if sigma <= 0:
        return x
    return ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode=mode, truncate=truncate)


def _clipped_zoom(x: np.ndarray, zoom: float) -> np.ndarray:
    """The original's ``clipped_zoom`` on a [B, H, W, C] batch: crop the centre
    ceil(H / zoom) x ceil(W / zoom), zoom it bilinearly to round(size * zoom), trim back to H x W.

    ``scipy.ndimage.zoom(order=1)`` samples output i at input ``i (n - 1) / (m - 1)``, which is
    torch's bilinear ``align_corners=True`` (used for speed; same dtype as the input).
    """
    h, w = x.shape[1], x.shape[2]
    ch, cw = int(np.ceil(h / zoom)), int(np.ceil(w / zoom))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = torch.from_numpy(np.ascontiguousarray(x[:, top : top + ch, left : left + cw])).permute(0, 3, 1, 2)
    size = (round(ch * zoom), round(cw * zoom))
    z = torch.nn.functional.interpolate(crop, size=size, mode="bilinear", align_corners=True)
    z = z.permute(0, 2, 3, 1).numpy()
    th, tw = (z.shape[1] - h) // 2, (z.shape[2] - w) // 2
    return z[:, th : th + h, tw : tw + w]


def _shift(img: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``out[y, x] = img[y - dy, x - dx]`` with edge replication (imagecorruptions' ``shift``)."""
    h, w = img.shape[:2]
    rows = np.clip(np.arange(h) - dy, 0, h - 1)
    cols = np.clip(np.arange(w) - dx, 0, w - 1)
    return img[rows][:, cols]


def _motion_blur_one(img: np.ndarray, radius: float, sigma: float, angle_deg: float) -> np.ndarray:
    """imagecorruptions' ``_motion_blur`` (its port of ImageMagick's MotionBlurImage) on one
    [H, W, ...] image: ``2 radius + 1`` taps i with Gaussian weights exp(-i^2 / 2 sigma^2)
    (normalised), tap i reading the image shifted by round(i (cos a, sin a)) towards the
    origin; stops at the first tap whose shift leaves the image."""
    width = int(radius * 2 + 1)
    kernel = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2)) / (np.sqrt(2 * np.pi) * sigma)
    kernel = kernel / np.sum(kernel)
    sin, cos = np.sin(np.deg2rad(angle_deg)), np.cos(np.deg2rad(angle_deg))
    point = (width * sin, width * cos)
    hypot = float(np.hypot(point[0], point[1]))
    blurred = np.zeros(img.shape, dtype=np.float64)
    for i in range(width):
        dy = -int(np.ceil(((i * point[0]) / hypot) - 0.5))
        dx = -int(np.ceil(((i * point[1]) / hypot) - 0.5))
        if abs(dy) >= img.shape[0] or abs(dx) >= img.shape[1]:
            break  # the motion left the image
        blurred = blurred + kernel[i] * _shift(img, dx, dy)
    return blurred


def _plasma_one(mapsize: int, wibbledecay: float, rng: Rng) -> np.ndarray:
    """The original's diamond-square ``plasma_fractal``: one [mapsize, mapsize] map in [0, 1]."""
    maparray = np.zeros((mapsize, mapsize), dtype=np.float64)
    stepsize = mapsize
    wibble = 100.0

    def wibbled_mean(array: np.ndarray) -> np.ndarray:
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        corner = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        square = corner + np.roll(corner, shift=-1, axis=0)
        square += np.roll(square, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbled_mean(square)
        dr = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        ul = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        lt = dr + np.roll(dr, 1, axis=0) + (ul + np.roll(ul, -1, axis=1))
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbled_mean(lt)
        tt = dr + np.roll(dr, 1, axis=1) + (ul + np.roll(ul, -1, axis=0))
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbled_mean(tt)
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    return maparray / maparray.max()


def plasma_fractal(batch: int, mapsize: int, wibbledecay: float, rng: Rng) -> np.ndarray:
    """Diamond-square plasma fractals in [0, 1], shape [batch, mapsize, mapsize], one map
    after the other (as in CIFAR-10-C)."""
    if mapsize & (mapsize - 1):
        raise ValueError("mapsize must be a power of two")
    return np.stack([_plasma_one(mapsize, wibbledecay, rng) for _ in range(batch)])


def _mapsize(x: np.ndarray) -> int:
    return max(32, 1 << int(np.ceil(np.log2(max(x.shape[1], x.shape[2])))))


# ----------------------------------------------------------------------------- noise


@_register("gaussian_noise")
def gaussian_noise(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Gaussian noise: ``x + N(0, sigma^2)``, sigma = .04/.06/.08/.09/.10."""
    c = (0.04, 0.06, 0.08, 0.09, 0.10)[severity - 1]
    return x + rng.normal(size=x.shape, scale=c)


@_register("shot_noise")
def shot_noise(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Shot (Poisson) noise: ``Poisson(x * lam) / lam``, lam = 500/250/100/75/50."""
    c = (500, 250, 100, 75, 50)[severity - 1]
    return rng.poisson(x * c) / c


@_register("impulse_noise")
def impulse_noise(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Salt-and-pepper noise on a fraction .01/.02/.03/.05/.07 of the values (half salt).

    As ``skimage.util.random_noise(mode='s&p')`` (scikit-image >= 0.17), image by image:
    ``flipped = U <= amount``, then ``salted = U <= 0.5`` (scikit-image 0.14, current when
    CIFAR-10-C was released, sampled the flipped coordinates with ``randint`` instead).
    """
    c = (0.01, 0.02, 0.03, 0.05, 0.07)[severity - 1]
    out = x.copy()
    for img in out:
        flipped = rng.random(img.shape) <= c
        salted = rng.random(img.shape) <= 0.5
        img[flipped & salted] = 1.0
        img[flipped & ~salted] = 0.0
    return out


# ----------------------------------------------------------------------------- blur


def _gaussian_kernel_1d(ksize: int, sigma: float) -> np.ndarray:
    """OpenCV's ``getGaussianKernel(ksize, sigma)`` for sigma > 0, as float32."""
    taps = np.arange(ksize) - (ksize - 1) / 2
    g = np.exp(-(taps**2) / (2.0 * sigma**2))
    return (g / g.sum()).astype(np.float32)


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """The original's ``disk``: a normalised disk, then ``cv2.GaussianBlur`` with a 3x3
    (5x5 for radius > 8) kernel of sigma alias_blur and reflect-101 borders."""
    from scipy import ndimage  # here: see _gaussian_blur

    if radius <= 8:
        grid, ksize = np.arange(-8, 8 + 1), 3
    else:
        grid, ksize = np.arange(-radius, radius + 1), 5
    xx, yy = np.meshgrid(grid, grid)
    disk = np.array((xx**2 + yy**2) <= radius**2, dtype=np.float32)
    disk /= np.sum(disk)
    g = _gaussian_kernel_1d(ksize, alias_blur)
    disk = ndimage.correlate1d(disk, g, axis=0, mode="mirror")
    return ndimage.correlate1d(disk, g, axis=1, mode="mirror")


@_register("defocus_blur")
def defocus_blur(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Defocus blur: ``cv2.filter2D`` (correlation, reflect-101 borders) with the anti-aliased disk.

    (radius, alias sigma) = (.3,.4)/(.4,.5)/(.5,.6)/(1,.2)/(1.5,.1), both scaled by s.
    Deterministic (``rng`` unused).
    """
    from scipy import ndimage  # here: see _gaussian_blur

    radius, alias = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))[severity - 1]
    s = _scale(x)
    kernel = _disk(radius * s, alias * s)
    return ndimage.correlate(x, kernel[None, :, :, None].astype(np.float64), mode="mirror")


@_register("glass_blur")
def glass_blur(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Glass blur: Gaussian blur, truncate to uint8, local pixel moves, Gaussian blur.

    (sigma, max_delta, iterations) = (.05,1,1)/(.25,1,1)/(.4,1,1)/(.25,1,2)/(.4,1,2); sigma
    and max_delta scaled by s. As in the original, rows h and columns w run from
    ``size - max_delta`` down to ``max_delta + 1``, and each position draws
    ``dx, dy = randint(-d, d, size=2)`` (so offsets lie in {-d, .., d-1}). The original's
    "swap" ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` assigns through numpy views: on an RGB
    image it copies pixel (h', w') into (h, w) and leaves (h', w') as it was; this port does
    the same (and a true swap for one channel, where the original's elements are scalars).
    Not monotone in severity by design (severity 4 has a smaller sigma than 3 but two passes).
    """
    sigma, delta, iterations = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))[severity - 1]
    s = _scale(x)
    sigma, delta = sigma * s, max(1, round(delta * s))
    b, h, w, ch = x.shape
    # the original's np.uint8(gaussian(x) * 255): truncation, kept as integer-valued floats
    out = np.floor(_gaussian_blur(x, sigma) * 255)
    positions = [(hh, ww) for hh in range(h - delta, delta, -1) for ww in range(w - delta, delta, -1)]
    # one randint(size=(n, 2)) per image draws what n calls of randint(size=(2,)) do
    offsets = np.stack([_integers(rng, -delta, delta, size=(iterations * len(positions), 2)) for _ in range(b)])
    rows = np.arange(b)
    for it in range(iterations):
        for j, (hh, ww) in enumerate(positions):
            dx, dy = offsets[:, it * len(positions) + j].T
            h2, w2 = hh + dy, ww + dx
            moved = out[rows, h2, w2].copy()
            if ch == 1:
                out[rows, h2, w2] = out[rows, hh, ww]
            out[rows, hh, ww] = moved
    return _gaussian_blur(out / 255.0, sigma)


@_register("motion_blur")
def motion_blur(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Motion blur: a one-sided Gaussian line kernel at an angle uniform in [-45, 45] degrees per image.

    (radius, sigma) = (6,1)/(6,1.5)/(6,2)/(8,2)/(9,2.5), scaled by s. The original calls
    ImageMagick's MotionBlurImage through Wand; this is imagecorruptions' numpy port of it
    (taps at integer offsets, edge replication), with the CIFAR-10-C constants.
    """
    radius, sigma = ((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5))[severity - 1]
    s = _scale(x)
    angles = [rng.uniform(-45, 45) for _ in range(x.shape[0])]
    return np.stack([_motion_blur_one(img, round(radius * s), sigma * s, a) for img, a in zip(x, angles)])


@_register("zoom_blur")
def zoom_blur(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Zoom blur: mean of the image and its centre zooms by 1, 1.01, ..., z_max (bilinear).

    z_max = 1.05/1.10/1.15/1.20/1.25 (factors ``arange(1, z_max + .01, .01)``).
    Deterministic (``rng`` unused).
    """
    top = (1.06, 1.11, 1.16, 1.21, 1.26)[severity - 1]
    factors = np.arange(1, top, 0.01)
    x = x.astype(np.float32)  # as the original
    out = np.zeros_like(x)
    for z in factors:
        out += _clipped_zoom(x, float(z))
    return (x + out) / (len(factors) + 1)


# ----------------------------------------------------------------------------- weather


@_register("snow")
def snow(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Snow: a thresholded, zoomed, motion-blurred noise layer added twice.

    (loc, scale, zoom, threshold, blur radius, blur sigma, blend) =
    (.1,.2,1,.6,8,3,.95)/(.1,.2,1,.5,10,4,.9)/(.15,.3,1.75,.55,10,4,.9)/
    (.25,.3,2.25,.6,12,6,.85)/(.3,.3,1.25,.65,14,12,.8); radius and sigma scaled by s.
    Per image: layer ~ N(loc, scale^2) [H, W], clipped zoom, zero below the threshold,
    clip to [0, 1] and truncate to uint8 (the original's PIL 'L' image), motion blur at an
    angle uniform in [-135, -45] (as in :func:`motion_blur`), round to uint8 (the original
    reads the blurred layer back from PNG); then
    ``x = blend * x + (1 - blend) * max(x, 1.5 * gray(x) + .5)`` and
    ``x + layer + rot180(layer)``.
    """
    loc, scale, zoom, thr, radius, sigma, blend = (
        (0.1, 0.2, 1.0, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1.0, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    )[severity - 1]
    s = _scale(x)
    b, h, w = x.shape[:3]
    x = x.astype(np.float32)  # as the original
    layers = []
    for _ in range(b):
        layer = rng.normal(size=(h, w), loc=loc, scale=scale)
        layer = _clipped_zoom(layer[None, :, :, None], zoom)[0]
        layer[layer < thr] = 0
        layer_u8 = np.floor(np.clip(layer[..., 0], 0, 1) * 255)
        blurred = _motion_blur_one(layer_u8, round(radius * s), sigma * s, rng.uniform(-135, -45))
        layers.append(np.round(blurred)[..., None] / 255.0)
    layer = np.stack(layers)
    x = blend * x + (1 - blend) * np.maximum(x, _gray(x).astype(np.float32) * 1.5 + 0.5)
    return x + layer + np.rot90(layer, k=2, axes=(1, 2))


def _frost_dir() -> Path:
    # find_spec only locates the package: importing imagecorruptions would pull OpenCV and scikit-image
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None or spec.origin is None:
        raise ImportError(FROST_MISSING)
    folder = Path(spec.origin).parent / "frost"
    if not all((folder / name).is_file() for name in FROST_FILES):
        raise ImportError(FROST_MISSING)
    return folder


@lru_cache(maxsize=1)
def frost_textures() -> tuple[np.ndarray, ...]:
    """The five frost photographs as the CIFAR-10-C script uses them: RGB uint8, resized by
    ``cv2.resize(fx=0.2, fy=0.2)``; at that factor OpenCV's bilinear resize samples pixels
    2, 7, 12, ... exactly, so this is that sampling (sizes rounded as OpenCV does)."""
    folder = _frost_dir()
    textures = []
    for name in FROST_FILES:
        with Image.open(folder / name) as img:
            rgb = np.asarray(img.convert("RGB"))
        h, w = int(np.rint(rgb.shape[0] * 0.2)), int(np.rint(rgb.shape[1] * 0.2))
        textures.append(np.ascontiguousarray(rgb[2::5, 2::5][:h, :w]))
    return tuple(textures)


@_register("frost")
def frost(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Frost: ``a * x + b * crop``, crop a random H x W window of a frost photograph.

    (a, b) = (1,.2)/(1,.3)/(.9,.4)/(.85,.4)/(.75,.45). Per image, as the original:
    ``idx = randint(5)``, then ``randint(0, th - H)``, ``randint(0, tw - W)`` for the window's
    top and left in the photograph (see :func:`frost_textures`; needs the imagecorruptions
    package's photographs). Gray images use the crop's luma. Images must be smaller than the
    textures (at most 62 x 104).
    """
    a, bw = ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))[severity - 1]
    textures = frost_textures()
    b, h, w = x.shape[:3]
    if any(t.shape[0] <= h or t.shape[1] <= w for t in textures):
        smallest = (min(t.shape[0] for t in textures) - 1, min(t.shape[1] for t in textures) - 1)
        raise ValueError(f"frost supports images up to {smallest[0]}x{smallest[1]}, got {h}x{w}")
    layers = []
    for _ in range(b):
        tex = textures[int(_integers(rng, 0, 5))]
        top = int(_integers(rng, 0, tex.shape[0] - h))
        left = int(_integers(rng, 0, tex.shape[1] - w))
        layers.append(tex[top : top + h, left : left + w].astype(np.float64) / 255.0)
    layer = np.stack(layers)
    if x.shape[-1] == 1:
        layer = _gray(layer)
    return a * x + bw * layer


@_register("fog")
def fog(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Fog: add ``a * plasma_fractal(wibbledecay=d)`` and rescale by ``max / (max + a)``.

    (a, d) = (.2,3)/(.5,3)/(.75,2.5)/(1,2)/(1.5,1.75); fractal map 32 (the next power of two
    at or above the image size for larger images); max is the image's own maximum.
    """
    a, decay = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))[severity - 1]
    b, h, w = x.shape[:3]
    max_val = x.max(axis=(1, 2, 3), keepdims=True)
    x = x + a * plasma_fractal(b, _mapsize(x), decay, rng)[:, :h, :w, None]
    return x * max_val / (max_val + a)


# ----------------------------------------------------------------------------- digital


@_register("brightness")
def brightness(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Brightness: add .05/.1/.15/.2/.3 to V in HSV (clipped). Deterministic."""
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv  # here: see _gaussian_blur

    c = (0.05, 0.1, 0.15, 0.2, 0.3)[severity - 1]
    if x.shape[-1] == 1:
        return x + c
    hsv = rgb_to_hsv(np.clip(x, 0, 1))
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return hsv_to_rgb(hsv)


@_register("contrast")
def contrast(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Contrast: ``(x - m) * c + m`` with m the per-image, per-channel mean, c = .75/.5/.4/.3/.15."""
    c = (0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1]
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * c + means


def affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """``cv2.getAffineTransform``: the 2x3 M (double) with ``M [src_i; 1] = dst_i`` for 3 points."""
    a = np.hstack([src.astype(np.float64), np.ones((3, 1))])
    return np.linalg.solve(a, dst.astype(np.float64)).T


def warp_affine_reflect101(img: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``cv2.warpAffine(img, m, (W, H), INTER_LINEAR, BORDER_REFLECT_101)`` on [H, W, C].

    As OpenCV (up to 4.10, which made CIFAR-10-C) computes it: the inverse map in fixed
    point (10 fractional bits, rounded to nearest even), source coordinates quantised to
    1/32 pixel, bilinear weights from those, out-of-image neighbours reflected (101).
    """
    h, w = img.shape[:2]
    det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    det = 1.0 / det if det != 0 else 0.0
    a11, a22, a12, a21 = m[1, 1] * det, m[0, 0] * det, -m[0, 1] * det, -m[1, 0] * det
    b1 = -a11 * m[0, 2] - a12 * m[1, 2]
    b2 = -a21 * m[0, 2] - a22 * m[1, 2]
    ab_scale, inter_bits, round_delta = 1024, 5, 1024 // 32 // 2
    xs, ys = np.arange(w), np.arange(h)
    adelta, bdelta = np.rint(a11 * xs * ab_scale).astype(np.int64), np.rint(a21 * xs * ab_scale).astype(np.int64)
    x0 = np.rint((a12 * ys + b1) * ab_scale).astype(np.int64) + round_delta
    y0 = np.rint((a22 * ys + b2) * ab_scale).astype(np.int64) + round_delta
    fx_full = (x0[:, None] + adelta[None, :]) >> (10 - inter_bits)
    fy_full = (y0[:, None] + bdelta[None, :]) >> (10 - inter_bits)
    sx, sy = fx_full >> inter_bits, fy_full >> inter_bits
    ax = ((fx_full & 31) / 32.0).astype(np.float32)[..., None]
    ay = ((fy_full & 31) / 32.0).astype(np.float32)[..., None]

    def reflect(p: np.ndarray, n: int) -> np.ndarray:
        if n == 1:
            return np.zeros_like(p)
        period = 2 * n - 2
        p = np.abs(p) % period
        return np.where(p >= n, period - p, p)

    x_lo, x_hi, y_lo, y_hi = reflect(sx, w), reflect(sx + 1, w), reflect(sy, h), reflect(sy + 1, h)
    return (
        img[y_lo, x_lo] * ((1 - ax) * (1 - ay))
        + img[y_lo, x_hi] * (ax * (1 - ay))
        + img[y_hi, x_lo] * ((1 - ax) * ay)
        + img[y_hi, x_hi] * (ax * ay)
    )


@_register("elastic_transform")
def elastic_transform(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Elastic transform: a random affine warp, then a smooth random displacement field.

    With S = min(H, W): (alpha, sigma, affine) = S * (0,0,.08)/(.05,.2,.07)/(.08,.06,.06)/
    (.1,.04,.05)/(.1,.03,.03). Per image, as the original: three float32 points around the
    centre moved by U(-affine, affine) (float32), the affine map through them applied with
    OpenCV's bilinear ``warpAffine`` and reflect-101 borders (:func:`warp_affine_reflect101`);
    then ``dx, dy = alpha * gaussian(U(-1, 1), sigma, mode='reflect', truncate=3)`` (float32)
    and bilinear resampling at (y + dy, x + dx) with reflect borders. Not monotone in
    severity by design (the original's severity 1 is a pure affine warp of the largest
    amplitude).
    """
    from scipy import ndimage  # here: see _gaussian_blur

    size = min(x.shape[1], x.shape[2])
    alpha, sigma, affine = (
        (size * 0, size * 0, size * 0.08),
        (size * 0.05, size * 0.2, size * 0.07),
        (size * 0.08, size * 0.06, size * 0.06),
        (size * 0.1, size * 0.04, size * 0.05),
        (size * 0.1, size * 0.03, size * 0.03),
    )[severity - 1]
    b, h, w, ch = x.shape
    centre = np.float32((h, w)) // 2  # used as (x, y) points, as the original does
    sq = min(h, w) // 3
    pts1 = np.float32([centre + sq, [centre[0] + sq, centre[1] - sq], centre - sq])
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    out = np.empty_like(x)
    for i in range(b):
        pts2 = pts1 + rng.uniform(-affine, affine, size=pts1.shape).astype(np.float32)
        warped = warp_affine_reflect101(x[i].astype(np.float32), affine_from_points(pts1, pts2))
        dx = ndimage.gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha
        dy = ndimage.gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha
        coords = [yy + dy.astype(np.float32), xx + dx.astype(np.float32)]
        out[i] = np.stack(
            [ndimage.map_coordinates(warped[:, :, c], coords, order=1, mode="reflect") for c in range(ch)], axis=-1
        )
    return out


@_register("pixelate")
def pixelate(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """Pixelate: PIL box-downsample to a fraction .95/.9/.85/.75/.65 of the size, box-upsample
    back, on the uint8 image as the original (so the input is rounded to 1/255 steps). Deterministic."""
    c = (0.95, 0.9, 0.85, 0.75, 0.65)[severity - 1]
    b, h, w, ch = x.shape
    small = (max(1, int(w * c)), max(1, int(h * c)))
    u8 = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    out = np.empty_like(x)
    for i in range(b):
        img = Image.fromarray(u8[i, :, :, 0] if ch == 1 else u8[i])
        img = img.resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.BOX)
        out[i] = (np.asarray(img, dtype=np.float64) / 255.0).reshape(x.shape[1:])
    return out


@_register("jpeg_compression")
def jpeg_compression(x: np.ndarray, severity: int, rng: Rng) -> np.ndarray:
    """JPEG compression at quality 80/65/58/50/40 (PIL, via uint8). Deterministic."""
    q = (80, 65, 58, 50, 40)[severity - 1]
    u8 = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        img = Image.fromarray(u8[i, :, :, 0] if x.shape[-1] == 1 else u8[i])
        buf = BytesIO()
        img.save(buf, "JPEG", quality=q)
        dec = np.asarray(Image.open(buf), dtype=np.float32) / 255.0
        out[i] = dec.reshape(x.shape[1:])
    return out
