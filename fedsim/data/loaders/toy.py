"""``toy``: a tiny instant multi-domain dataset for tests and smoke runs.

Each class is a fixed random 8x8 pattern upsampled to the image size; each domain applies
its own colour tint, contrast and noise level, so domains differ in feature statistics
(the multi-domain setting) while sharing labels. Generated in milliseconds from a seed.
"""

from __future__ import annotations

import numpy as np

from fedsim.data.base import DATASETS, DomainSplit, MultiDomainDataset
from fedsim.data.config import DataConfig
from fedsim.data.loaders._files import Options
from fedsim.schema import ScenarioError

DOMAINS = ("red", "green", "blue", "gray")
_OPTIONS = {"train_per_domain", "test_per_domain", "num_classes", "seed", "mix_domains"}
_CHUNK = 16_384  # images generated at a time


def make_toy(
    image_size: int = 16,
    train_per_domain: int = 200,
    test_per_domain: int = 60,
    num_classes: int = 4,
    seed: int = 0,
    domains: tuple[str, ...] = DOMAINS,
) -> MultiDomainDataset:
    rng = np.random.default_rng([seed, 7])
    protos = rng.random((num_classes, 8, 8)) > 0.5
    reps = -(-image_size // 8)
    protos = np.kron(protos, np.ones((reps, reps)))[:, :image_size, :image_size].astype(np.float32)
    out = {}
    for k, name in enumerate(DOMAINS):
        if name not in domains:
            continue
        tint = np.eye(3)[k] * 0.6 + 0.4 if k < 3 else np.full(3, 0.7)
        noise = 0.1 + 0.1 * k
        drng = np.random.default_rng([seed, 11, k])

        def sample(
            n: int, drng: np.random.Generator = drng, tint: np.ndarray = tint, noise: float = noise
        ) -> tuple[np.ndarray, np.ndarray]:
            y = np.arange(n) % num_classes
            drng.shuffle(y)
            contrast = 0.5 + 0.5 * drng.random((n, 1, 1, 1))
            x = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
            # In chunks: the float64 intermediates of all n images at once were several
            # times the images' own bytes. The noise is drawn chunk after chunk from the
            # same generator, which gives the same numbers as one draw of all of it.
            for a in range(0, n, _CHUNK):
                b = min(n, a + _CHUNK)
                base = protos[y[a:b]][..., None] * tint[None, None, None, :] * contrast[a:b]
                x[a:b] = (np.clip(base + noise * drng.standard_normal(base.shape), 0, 1) * 255).astype(np.uint8)
            return x, y.astype(np.int64)

        xtr, ytr = sample(train_per_domain)
        xte, yte = sample(test_per_domain)
        out[name] = DomainSplit(xtr, ytr, xte, yte)
    return MultiDomainDataset(
        "toy",
        out,
        num_classes,
        image_size,
        3,
        [str(i) for i in range(num_classes)],
        "random class patterns, per-domain tint and noise",
    )


@DATASETS.register("toy")
def load_toy(cfg: DataConfig) -> MultiDomainDataset:
    opts = Options("toy", cfg.options, _OPTIONS)
    if cfg.domains:
        for d in cfg.domains:
            if d not in DOMAINS:
                raise ScenarioError(f"data.domains: unknown domain '{d}' for toy (known: {', '.join(DOMAINS)})")
    # Bounds keep a typo from allocating tens of gigabytes. 1,000,000 per domain is what
    # 100,000-client population benchmarks need (4 domains x 25,000 clients x 20 images:
    # 1.5 GB of uint8 at image_size 16).
    train = opts.int("train_per_domain", 200, low=1, high=1_000_000)
    test = opts.int("test_per_domain", 60, low=1, high=100_000)
    classes = opts.int("num_classes", 4, low=2, high=1000)
    seed = opts.int("seed", 0, low=0, high=2**32 - 1)
    return make_toy(cfg.image_size, train, test, classes, seed, tuple(cfg.domains or DOMAINS))
