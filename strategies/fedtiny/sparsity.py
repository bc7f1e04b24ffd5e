"""Sparse models: ERK layer densities, magnitude masks, a values+indices wire format,
and FLOPs / memory accounting (used by FedTiny and the magnitude-pruning baseline).

Prunable tensors are the weights of convolutions and linear layers (``*.weight`` with two
or more dimensions); biases and normalization tensors stay dense.

Wire format of a masked tensor ``key`` (only the active weights and their positions):
``key::v`` (float32 values of the active entries, in flat-index order) and ``key::i``
(their flat indices, the smallest unsigned integer type that holds them). Every other
array is sent as is. :func:`encode` / :func:`decode` are exact inverses on masked arrays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

NamedArrays = dict[str, np.ndarray]
VAL = "::v"
IDX = "::i"


def is_prunable(key: str, array: np.ndarray) -> bool:
    return key.endswith("weight") and np.ndim(array) >= 2


def prunable_shapes(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(np.shape(v)) for k, v in arrays.items() if is_prunable(k, v)}


# -- layer densities ----------------------------------------------------------------------


def erk_densities(shapes: Mapping[str, tuple[int, ...]], density: float, power_scale: float = 1.0) -> dict[str, float]:
    """Erdos-Renyi-Kernel densities: layer l gets ``eps * (sum(shape_l) / prod(shape_l)) ** p``,
    with eps chosen so that the parameter-weighted mean density is ``density``; layers
    whose density would exceed 1 are made dense and eps is solved again for the rest."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1] (got {density})")
    n = {k: int(np.prod(s)) for k, s in shapes.items()}
    raw = {k: (sum(s) / np.prod(s)) ** power_scale for k, s in shapes.items()}
    total = sum(n.values())
    dense: set[str] = set()
    while True:
        budget = density * total - sum(n[k] for k in dense)
        free = [k for k in shapes if k not in dense]
        if not free:
            break
        eps = budget / sum(raw[k] * n[k] for k in free)
        over = [k for k in free if eps * raw[k] > 1]
        if not over:
            break
        dense.add(max(over, key=lambda k: raw[k]))
    out = {k: 1.0 for k in dense}
    for k in shapes:
        if k not in dense:
            out[k] = float(eps * raw[k])
    return out


def uniform_densities(shapes: Mapping[str, tuple[int, ...]], density: float) -> dict[str, float]:
    return {k: float(density) for k in shapes}


def active_counts(shapes: Mapping[str, tuple[int, ...]], densities: Mapping[str, float]) -> dict[str, int]:
    """Active weights per layer from densities: largest-remainder rounding of
    ``density * size``, so the total is ``round(sum(density * size))`` exactly; every
    layer keeps at least one weight."""
    size = {k: int(np.prod(s)) for k, s in shapes.items()}
    exact = {k: min(1.0, max(0.0, float(densities[k]))) * size[k] for k in shapes}
    counts = {k: int(math.floor(exact[k] + 1e-9)) for k in shapes}
    short = int(round(sum(exact.values()))) - sum(counts.values())
    for k in sorted(shapes, key=lambda k: (-(exact[k] - counts[k]), k))[: max(short, 0)]:
        counts[k] += 1
    return {k: max(1, min(size[k], c)) for k, c in counts.items()}


def jitter_densities(
    shapes: Mapping[str, tuple[int, ...]],
    base: Mapping[str, float],
    density: float,
    sigma: float,
    rng: np.random.Generator,
) -> dict[str, float]:
    """Random layer-wise densities around ``base`` (log-normal factors), rescaled so the
    parameter-weighted mean is still ``density`` (layers capped at 1)."""
    n = {k: int(np.prod(s)) for k, s in shapes.items()}
    d = {k: base[k] * float(np.exp(sigma * rng.standard_normal())) for k in shapes}
    target = density * sum(n.values())
    for _ in range(100):
        total = sum(min(1.0, d[k]) * n[k] for k in shapes)
        if abs(total - target) < 1e-9 * target:
            break
        free = [k for k in shapes if d[k] < 1.0]
        fixed = sum(n[k] for k in shapes if d[k] >= 1.0)
        s = (target - fixed) / max(sum(d[k] * n[k] for k in free), 1e-30)
        d = {k: (min(1.0, d[k] * s) if k in free else 1.0) for k in shapes}
    return {k: min(1.0, v) for k, v in d.items()}


# -- masks -------------------------------------------------------------------------------


def topk_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the k largest |scores| (ties broken by lower flat index)."""
    flat = np.abs(np.asarray(scores, dtype=np.float64)).ravel()
    k = int(max(0, min(k, flat.size)))
    mask = np.zeros(flat.size, dtype=bool)
    if k:
        order = np.argsort(-flat, kind="stable")[:k]
        mask[order] = True
    return mask.reshape(np.shape(scores))


def magnitude_masks(arrays: Mapping[str, np.ndarray], densities: Mapping[str, float]) -> dict[str, np.ndarray]:
    counts = active_counts({k: np.shape(arrays[k]) for k in densities}, densities)
    return {k: topk_mask(arrays[k], counts[k]) for k in densities}


def apply_masks(arrays: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]) -> NamedArrays:
    return {k: (np.where(masks[k], v, np.zeros((), v.dtype)) if k in masks else v) for k, v in arrays.items()}


def overall_density(masks: Mapping[str, np.ndarray]) -> float:
    total = sum(m.size for m in masks.values())
    return float(sum(int(m.sum()) for m in masks.values()) / max(total, 1))


# -- wire format -------------------------------------------------------------------------


def index_dtype(size: int) -> np.dtype:
    if size <= 2**8:
        return np.dtype(np.uint8)
    if size <= 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def encode(arrays: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray], indices: bool = True) -> NamedArrays:
    """Masked tensors as values (+ flat indices); everything else unchanged."""
    out: NamedArrays = {}
    for k, v in arrays.items():
        if k in masks:
            m = np.asarray(masks[k]).ravel()
            pos = np.flatnonzero(m)
            out[k + VAL] = np.asarray(v).ravel()[pos].astype(np.float32)
            if indices:
                out[k + IDX] = pos.astype(index_dtype(m.size))
        else:
            out[k] = np.asarray(v)
    return out


def decode(
    payload: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    masks: Mapping[str, np.ndarray] | None = None,
    dtype=np.float32,
) -> tuple[NamedArrays, dict[str, np.ndarray]]:
    """Inverse of :func:`encode`: dense arrays (zeros outside the mask) and the masks.
    ``masks`` supplies positions when the payload carries values only."""
    dense: NamedArrays = {}
    got: dict[str, np.ndarray] = {}
    for k, v in payload.items():
        if k.endswith(VAL):
            key = k[: -len(VAL)]
            shape = tuple(shapes[key])
            size = int(np.prod(shape))
            if key + IDX in payload:
                pos = np.asarray(payload[key + IDX]).astype(np.int64)
            elif masks is not None and key in masks:
                pos = np.flatnonzero(np.asarray(masks[key]).ravel())
            else:
                raise KeyError(f"{key}: values without indices and no mask to place them")
            flat = np.zeros(size, dtype=dtype)
            flat[pos] = v
            m = np.zeros(size, dtype=bool)
            m[pos] = True
            dense[key] = flat.reshape(shape)
            got[key] = m.reshape(shape)
        elif k.endswith(IDX):
            continue
        else:
            dense[k] = np.asarray(v)
    return dense, got


def is_sparse_payload(payload: Mapping[str, np.ndarray]) -> bool:
    return any(k.endswith(VAL) for k in payload)


# -- cost accounting ---------------------------------------------------------------------


def forward_flops(
    shapes: Mapping[str, tuple[int, ...]], positions: Mapping[str, int], active: Mapping[str, int] | None = None
) -> int:
    """FLOPs of one forward pass of one sample through the conv / linear layers:
    2 * (active weights) * (output positions) per layer (multiply + add). ``positions``:
    output spatial positions per weight (H_out*W_out for a conv, 1 for a linear layer);
    dense when ``active`` is None."""
    total = 0
    for k, s in shapes.items():
        nnz = int(np.prod(s)) if active is None else int(active[k])
        total += 2 * nnz * int(positions.get(k, 1))
    return int(total)


def model_bytes(
    arrays: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray] | None = None, indices: bool = True
) -> int:
    """Memory of the model's tensors: dense, or values + indices of the masked ones."""
    total = 0
    for k, v in arrays.items():
        v = np.asarray(v)
        if masks is not None and k in masks:
            nnz = int(np.asarray(masks[k]).sum())
            total += nnz * 4 + (nnz * index_dtype(v.size).itemsize if indices else 0)
        else:
            total += v.nbytes
    return int(total)


def cosine_fraction(t: int, t_end: int, alpha: float) -> float:
    """FedTiny / RigL update fraction ``alpha/2 * (1 + cos(pi * t / T_end))`` (0 after T_end)."""
    if t >= t_end:
        return 0.0
    return alpha / 2 * (1 + math.cos(math.pi * t / t_end))


__all__ = [
    "erk_densities",
    "uniform_densities",
    "jitter_densities",
    "active_counts",
    "topk_mask",
    "magnitude_masks",
    "apply_masks",
    "overall_density",
    "encode",
    "decode",
    "is_sparse_payload",
    "forward_flops",
    "model_bytes",
    "cosine_fraction",
    "prunable_shapes",
    "is_prunable",
    "index_dtype",
    "VAL",
    "IDX",
]
